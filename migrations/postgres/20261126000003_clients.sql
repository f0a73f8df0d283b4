-- Client records: the one source of truth the edges read through
-- GET /internal/v1/clients/{id}. `record` is the shared ClientRecord JSON.
CREATE TABLE IF NOT EXISTS clients (
    id         TEXT        PRIMARY KEY,
    record     JSONB       NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
