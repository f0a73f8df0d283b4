-- Per-minute event counts behind GET /v1/stats: one row per (client,
-- dimension, minute, value), kept by the PostgreSQL sink in the same
-- statement that inserts the events, from the rows that statement really
-- inserted (a duplicate or a replayed batch adds nothing), so the counts
-- are exact. `dim` is '' for all of a client's events (value NULL), or one
-- of the stats dimensions; `minute` is whole minutes since the Unix epoch
-- (UTC), so hour and day buckets are sums.
--
-- Retention: delete the same minutes when deleting events
-- (`DELETE FROM event_counts WHERE minute < extract(epoch from <cut-off>) / 60`).
CREATE TABLE IF NOT EXISTS event_counts (
    client_id TEXT   NOT NULL,
    dim       TEXT   NOT NULL,
    minute    BIGINT NOT NULL,
    value     TEXT,
    events    BIGINT NOT NULL,
    CONSTRAINT event_counts_key UNIQUE NULLS NOT DISTINCT (client_id, dim, minute, value)
);

-- The counts of what is stored already.
INSERT INTO event_counts (client_id, dim, minute, value, events)
SELECT e.client_id, d.dim, floor(extract(epoch from e.ts) / 60)::int8, d.value, count(*)
FROM events e,
     LATERAL (VALUES ('', NULL), ('kind', e.kind), ('name', e.name), ('country', e.country),
                     ('platform', e.platform), ('app_version', e.app_version),
                     ('level', e.level), ('priority', e.priority)) AS d(dim, value)
GROUP BY 1, 2, 3, 4
ON CONFLICT ON CONSTRAINT event_counts_key DO NOTHING;

-- Callers who may read every client (admin:events) ask without client_id.
CREATE INDEX IF NOT EXISTS event_counts_dim_minute ON event_counts (dim, minute);
