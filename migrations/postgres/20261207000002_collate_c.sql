-- The text columns that fill the b-tree keys, and the dimensions
-- `/v1/stats` groups by, compare bytes (the "C" collation) instead of the
-- database's locale. Equality is unchanged (a database's own collation is
-- always deterministic), but each comparison in an index becomes a memcmp
-- instead of the locale's strcoll: on `events`' seven indexes about an
-- eighth of what a `COPY` costs (BENCHMARKS.md, issue 18). Groups in
-- `/v1/stats` answers, and anything else ordered by these columns, come in
-- byte order, as they always did on SQLite.
--
-- Only the collation changes, so no table is rewritten; the indexes that
-- hold these columns are rebuilt, under a lock: writes wait (in the spool)
-- and reads wait until the migration commits (README, "Operating", says
-- how long it takes). Partitions follow their parent, and partitions made
-- later copy it (`CREATE TABLE … (LIKE events …)`).
ALTER TABLE events
    ALTER COLUMN client_id  TYPE text COLLATE "C",
    ALTER COLUMN event_id   TYPE text COLLATE "C",
    ALTER COLUMN name       TYPE text COLLATE "C",
    ALTER COLUMN user_id    TYPE text COLLATE "C",
    ALTER COLUMN session_id TYPE text COLLATE "C",
    ALTER COLUMN country    TYPE text COLLATE "C",
    -- In no index (nothing rebuilt), but grouped by `/v1/stats`: every
    -- dimension in one order, whether the rollups or the rows answer.
    ALTER COLUMN kind        TYPE text COLLATE "C",
    ALTER COLUMN level       TYPE text COLLATE "C",
    ALTER COLUMN platform    TYPE text COLLATE "C",
    ALTER COLUMN app_version TYPE text COLLATE "C",
    ALTER COLUMN priority    TYPE text COLLATE "C";

ALTER TABLE event_counts
    ALTER COLUMN client_id TYPE text COLLATE "C",
    ALTER COLUMN dim       TYPE text COLLATE "C",
    ALTER COLUMN value     TYPE text COLLATE "C";

ALTER TABLE user_sketches
    ALTER COLUMN client_id TYPE text COLLATE "C",
    ALTER COLUMN dim       TYPE text COLLATE "C",
    ALTER COLUMN value     TYPE text COLLATE "C";
