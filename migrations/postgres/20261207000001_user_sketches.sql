-- Distinct users behind GET /v1/stats?users=true: one HyperLogLog sketch
-- (aggregator/src/sinks/postgres/hll.rs: 2^14 registers, ~0.8 % standard
-- error) per (client, dimension, hour, value), `dim` and `value` as in
-- event_counts; `hour` is whole hours since the Unix epoch (UTC). The
-- PostgreSQL sink merges the users it stored into them every second; the
-- stats reader merges the hours of a bucket. Small sketches are kept as
-- their non-zero registers, large ones as all 16,384 (16 KiB).
CREATE TABLE IF NOT EXISTS user_sketches (
    client_id TEXT   NOT NULL,
    dim       TEXT   NOT NULL,
    hour      BIGINT NOT NULL,
    value     TEXT,
    registers BYTEA  NOT NULL,
    CONSTRAINT user_sketches_key UNIQUE NULLS NOT DISTINCT (client_id, dim, hour, value)
);
-- Callers who may read every client (admin:events) ask without client_id.
CREATE INDEX IF NOT EXISTS user_sketches_dim_hour ON user_sketches (dim, hour);

-- The first hour from which the sketches hold the user of every stored
-- event. Events stored before this release have none: on a database that
-- has events already, that is the hour after this migration, and earlier
-- hours are counted from the rows until `outpost backfill-users --from …`
-- builds their sketches and moves it back.
CREATE TABLE IF NOT EXISTS user_sketches_since (
    only_row BOOLEAN PRIMARY KEY DEFAULT true CHECK (only_row),
    hour     BIGINT  NOT NULL
);
INSERT INTO user_sketches_since (hour)
SELECT CASE WHEN EXISTS (SELECT 1 FROM events)
            THEN floor(extract(epoch from now()) / 3600)::int8 + 1
            ELSE -9223372036854775808 END
ON CONFLICT (only_row) DO NOTHING;
