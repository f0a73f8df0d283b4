-- The rollup counters are updated in place many times a minute: leave room
-- on each page so the updates stay HOT (no new index entries, prompt
-- pruning) instead of bloating the unique key the upserts look up.
ALTER TABLE event_counts SET (fillfactor = 50);
