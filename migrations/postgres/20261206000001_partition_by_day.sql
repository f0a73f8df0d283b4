-- `events` and `event_counts` become tables partitioned by range on their
-- time column (`ts`; `minute`), one partition per UTC day, so retention
-- drops whole days (`postgres.retention_days`) instead of deleting rows,
-- and a query over a time span reads only that span's partitions.
--
-- The aggregator creates the days ahead of time and drops expired ones
-- (sinks/postgres/partitions.rs): partitions `events_pYYYYMMDD` and
-- `event_counts_pYYYYMMDD`. A row no day partition holds (a day not yet
-- created, or dropped) goes to `events_default` / `event_counts_default`;
-- the aggregator moves such rows into their day when it creates it.
--
-- A unique key of a partitioned table must hold the partition key, so the
-- events' key is now (client_id, event_id, ts): see ARCHITECTURE.md,
-- "Duplicates", for what that leaves to Redis. The primary key is (ts, id),
-- which also serves the time-ordered scans the old `events_ts` index did.
--
-- An existing table is not copied: it is renamed `events_legacy` (and
-- `event_counts_legacy`) and attached as the partition of everything
-- before the second UTC midnight after its newest row, so the migration
-- costs two index builds on it (the new primary and unique keys), not a
-- rewrite. Retention deletes its expired rows in chunks and drops it once
-- it holds nothing younger than the cut-off. An empty table (a new
-- install) is simply replaced.

-- The old table and its indexes move out of the way of the new names.
ALTER TABLE events RENAME TO events_legacy;
ALTER TABLE events_legacy RENAME CONSTRAINT events_pkey TO events_legacy_pkey;
ALTER TABLE events_legacy RENAME CONSTRAINT events_client_event_unique TO events_legacy_client_event_unique;
ALTER INDEX events_client_ts RENAME TO events_legacy_client_ts;
ALTER INDEX events_ts RENAME TO events_legacy_ts;
ALTER INDEX events_name_ts RENAME TO events_legacy_name_ts;
ALTER INDEX events_user_ts RENAME TO events_legacy_user_ts;
ALTER INDEX events_session_ts RENAME TO events_legacy_session_ts;
ALTER INDEX events_country_ts RENAME TO events_legacy_country_ts;

ALTER TABLE event_counts RENAME TO event_counts_legacy;
ALTER TABLE event_counts_legacy RENAME CONSTRAINT event_counts_key TO event_counts_legacy_key;
ALTER INDEX event_counts_dim_minute RENAME TO event_counts_legacy_dim_minute;

-- The same columns in the same order (the id keeps its sequence).
CREATE TABLE events (LIKE events_legacy INCLUDING DEFAULTS) PARTITION BY RANGE (ts);
ALTER SEQUENCE events_id_seq OWNED BY events.id;
ALTER TABLE events ADD CONSTRAINT events_pkey PRIMARY KEY (ts, id);
ALTER TABLE events ADD CONSTRAINT events_client_event_unique UNIQUE (client_id, event_id, ts);
CREATE INDEX events_client_ts ON events (client_id, ts, id);
CREATE INDEX events_name_ts ON events (client_id, name, ts);
CREATE INDEX events_user_ts ON events (client_id, user_id, ts) WHERE user_id IS NOT NULL;
CREATE INDEX events_session_ts ON events (client_id, session_id, ts) WHERE session_id IS NOT NULL;
CREATE INDEX events_country_ts ON events (client_id, country, ts);
CREATE TABLE events_default PARTITION OF events DEFAULT;

CREATE TABLE event_counts (LIKE event_counts_legacy) PARTITION BY RANGE (minute);
ALTER TABLE event_counts ADD CONSTRAINT event_counts_key
    UNIQUE NULLS NOT DISTINCT (client_id, dim, minute, value);
CREATE INDEX event_counts_dim_minute ON event_counts (dim, minute);
-- Counters updated in place many times a minute: room on each page keeps
-- the updates HOT (set per partition; a partitioned table has no storage).
CREATE TABLE event_counts_default PARTITION OF event_counts DEFAULT WITH (fillfactor = 50);

DO $$
DECLARE
    bound timestamptz;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM events_legacy) AND NOT EXISTS (SELECT 1 FROM event_counts_legacy) THEN
        DROP TABLE events_legacy;
        DROP TABLE event_counts_legacy;
        RETURN;
    END IF;
    -- Rows go on arriving for the newest days already held (and up to an
    -- hour ahead): the legacy partition keeps them until the second UTC
    -- midnight after the newest of its rows or of now.
    SELECT date_trunc('day', greatest(max(ts), now()), 'UTC') + interval '2 days'
      INTO bound FROM events_legacy;
    -- The keys the partitioned table replaces (and the index its primary
    -- key makes redundant) would only slow the legacy table's writes.
    ALTER TABLE events_legacy DROP CONSTRAINT events_legacy_pkey;
    ALTER TABLE events_legacy DROP CONSTRAINT events_legacy_client_event_unique;
    DROP INDEX events_legacy_ts;
    EXECUTE format('ALTER TABLE events ATTACH PARTITION events_legacy FOR VALUES FROM (MINVALUE) TO (%L)', bound);
    EXECUTE format('ALTER TABLE event_counts ATTACH PARTITION event_counts_legacy FOR VALUES FROM (MINVALUE) TO (%s)',
                   floor(extract(epoch FROM bound) / 60)::int8);
END $$;
