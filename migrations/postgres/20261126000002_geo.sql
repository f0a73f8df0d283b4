-- GeoIP enrichment of the client IP (country already exists: GeoIP's
-- answer, else the edge platform's hint).
ALTER TABLE events
    ADD COLUMN IF NOT EXISTS region    TEXT,
    ADD COLUMN IF NOT EXISTS city      TEXT,
    ADD COLUMN IF NOT EXISTS latitude  DOUBLE PRECISION,
    ADD COLUMN IF NOT EXISTS longitude DOUBLE PRECISION,
    ADD COLUMN IF NOT EXISTS time_zone TEXT,
    ADD COLUMN IF NOT EXISTS asn       BIGINT,
    ADD COLUMN IF NOT EXISTS as_org    TEXT;

CREATE INDEX IF NOT EXISTS events_country_ts ON events (client_id, country, ts);
