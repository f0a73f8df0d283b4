-- Events and logs, one row per (client, event id).
--
-- Retention: delete by time (`DELETE FROM events WHERE ts < now() - interval
-- '90 days'`) or, for large deployments, convert to a table partitioned by
-- range on received_at (the unique key must then include it); see README,
-- "Operating".
CREATE TABLE IF NOT EXISTS events (
    id           BIGSERIAL   PRIMARY KEY,
    client_id    TEXT        NOT NULL,
    event_id     TEXT        NOT NULL,
    batch_id     UUID        NOT NULL,
    edge_id      TEXT        NOT NULL,
    ts           TIMESTAMPTZ NOT NULL,
    received_at  TIMESTAMPTZ NOT NULL,
    kind         TEXT        NOT NULL,
    name         TEXT,
    message      TEXT,
    level        TEXT,
    user_id      TEXT,
    anonymous_id TEXT,
    session_id   TEXT,
    properties   JSONB       NOT NULL DEFAULT '{}',
    context      JSONB       NOT NULL DEFAULT '{}',
    app_version  TEXT,
    platform     TEXT,
    trace_id     TEXT,
    span_id      TEXT,
    seq          BIGINT,
    priority     TEXT        NOT NULL,
    client_ip    INET,
    user_agent   TEXT,
    pop          TEXT,
    country      TEXT,
    CONSTRAINT events_client_event_unique UNIQUE (client_id, event_id)
);

CREATE INDEX IF NOT EXISTS events_client_ts ON events (client_id, ts, id);
CREATE INDEX IF NOT EXISTS events_ts ON events (ts, id);
CREATE INDEX IF NOT EXISTS events_name_ts ON events (client_id, name, ts);
CREATE INDEX IF NOT EXISTS events_user_ts ON events (client_id, user_id, ts) WHERE user_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_session_ts ON events (client_id, session_id, ts) WHERE session_id IS NOT NULL;
