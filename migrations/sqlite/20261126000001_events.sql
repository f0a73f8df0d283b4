-- The embedded store (`outpost dev`, `[sqlite]`): the same events and
-- client records as migrations/postgres, in SQLite's types. Times are
-- integers: `ts_us` microseconds since the epoch (millisecond precision, as
-- in PostgreSQL), `received_ms` milliseconds. JSON is text.
CREATE TABLE IF NOT EXISTS events (
    id           INTEGER PRIMARY KEY,
    client_id    TEXT    NOT NULL,
    event_id     TEXT    NOT NULL,
    batch_id     TEXT    NOT NULL,
    edge_id      TEXT    NOT NULL,
    ts_us        INTEGER NOT NULL,
    received_ms  INTEGER NOT NULL,
    kind         TEXT    NOT NULL,
    name         TEXT,
    message      TEXT,
    level        TEXT,
    user_id      TEXT,
    anonymous_id TEXT,
    session_id   TEXT,
    properties   TEXT    NOT NULL DEFAULT '{}',
    context      TEXT    NOT NULL DEFAULT '{}',
    app_version  TEXT,
    platform     TEXT,
    trace_id     TEXT,
    span_id      TEXT,
    seq          INTEGER,
    priority     TEXT    NOT NULL,
    client_ip    TEXT,
    user_agent   TEXT,
    pop          TEXT,
    country      TEXT,
    region       TEXT,
    city         TEXT,
    latitude     REAL,
    longitude    REAL,
    time_zone    TEXT,
    asn          INTEGER,
    as_org       TEXT,
    UNIQUE (client_id, event_id)
);

CREATE INDEX IF NOT EXISTS events_client_ts ON events (client_id, ts_us, id);
CREATE INDEX IF NOT EXISTS events_ts ON events (ts_us, id);
CREATE INDEX IF NOT EXISTS events_name_ts ON events (client_id, name, ts_us);
CREATE INDEX IF NOT EXISTS events_user_ts ON events (client_id, user_id, ts_us) WHERE user_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_session_ts ON events (client_id, session_id, ts_us) WHERE session_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_country_ts ON events (client_id, country, ts_us);

-- Client records; `record` is the shared ClientRecord JSON.
CREATE TABLE IF NOT EXISTS clients (
    id         TEXT    PRIMARY KEY,
    record     TEXT    NOT NULL,
    updated_at INTEGER NOT NULL
);
