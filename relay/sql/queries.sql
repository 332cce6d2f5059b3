-- Named queries of the relay; only relay/store.py executes them.
-- Each block: a "-- name: <name>" line, comment lines, the statement. Parameters are %(name)s.
-- {outbox} and {outbox_shard} are the configured table names (validated, backtick-quoted).

-- name: session_isolation
-- Every relay connection reads committed data and never waits for gap locks.
SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED

-- name: session_time_zone
-- TIMESTAMP columns are read and written in UTC.
SET time_zone = '+00:00'

-- name: session_lock_wait
SET SESSION innodb_lock_wait_timeout = %(seconds)s

-- name: ready_shards
-- Shards that have new rows, with the id of their oldest one: one ix_claim dive per shard
-- (64 in all) whatever the table holds, published rows and backlog alike.
SELECT shard, head FROM (
    SELECT s.shard,
           (SELECT o.id FROM {outbox} AS o WHERE o.status = 'new' AND o.shard = s.shard
            ORDER BY o.id LIMIT 1) AS head
    FROM {outbox_shard} AS s
) AS heads
WHERE head IS NOT NULL

-- name: lock_shards
-- Take ownership of up to %(limit)s of the given shards, skipping those another worker owns.
-- Primary-key order with LIMIT: only the returned rows are locked.
SELECT shard FROM {outbox_shard}
WHERE shard IN %(shards)s
ORDER BY shard
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED

-- name: claim_shard_rows
-- One owned shard's oldest new rows, in id order: a ref on ix_claim (status, shard) read in index
-- order, so it touches exactly the rows it returns. No FOR UPDATE: the lock on the shard row
-- already makes this worker the only claimer of the shard, and a READ COMMITTED read sees only
-- committed rows (a writer's uncommitted insert is invisible, not waited for). The store repeats
-- this block once per owned shard, joined with UNION ALL.
(SELECT id, message_id, aggregate_type, aggregate_id, event_type, op, before_state, after_state,
        payload, headers, topic, source_table,
        CAST(UNIX_TIMESTAMP(event_time) * 1000000 AS SIGNED) AS event_us
 FROM {outbox}
 WHERE status = 'new' AND shard = %(shard)s
 ORDER BY id
 LIMIT %(limit)s)

-- name: mark_published
-- The whole published part of a batch in one statement.
UPDATE {outbox}
SET status = 'published', published_at = CURRENT_TIMESTAMP(6), attempts = attempts + 1,
    last_error = NULL
WHERE id IN %(ids)s AND status = 'new'

-- name: mark_failed
-- A poison row: it can never be published as it is; `relay replay` puts it back.
UPDATE {outbox}
SET status = 'failed', attempts = attempts + 1, last_error = %(error)s
WHERE id = %(id)s

-- name: note_attempt
-- Rows whose publish failed for a passing reason stay new; the attempt is recorded.
UPDATE {outbox}
SET attempts = attempts + 1, last_error = %(error)s
WHERE id IN %(ids)s

-- name: backlog_count
-- New rows, counted through ix_claim and capped so the sample stays cheap.
SELECT COUNT(*) FROM (SELECT 1 FROM {outbox} WHERE status = 'new' LIMIT %(cap)s) AS backlog

-- name: failed_count
SELECT COUNT(*) FROM (SELECT 1 FROM {outbox} WHERE status = 'failed' LIMIT %(cap)s) AS failed

-- name: backlog_oldest_age
-- Age in seconds of the oldest new row: the oldest of the 64 shard heads (ix_claim dives).
SELECT TIMESTAMPDIFF(MICROSECOND, MIN(o.event_time), CURRENT_TIMESTAMP(6)) / 1000000
FROM {outbox} AS o
JOIN (
    SELECT (SELECT x.id FROM {outbox} AS x WHERE x.status = 'new' AND x.shard = s.shard
            ORDER BY x.id LIMIT 1) AS id
    FROM {outbox_shard} AS s
) AS heads ON o.id = heads.id

-- name: cleaner_lock
-- One cleaner at a time across all replicas; the lock lives as long as this connection.
SELECT GET_LOCK(%(name)s, 0)

-- name: cleaner_unlock
SELECT RELEASE_LOCK(%(name)s)

-- name: expired_ids
-- Published rows older than the retention, oldest first, through ix_clean only.
SELECT id FROM {outbox}
WHERE status = 'published'
  AND published_at < TIMESTAMPADD(MICROSECOND, -%(retention_us)s, CURRENT_TIMESTAMP(6))
ORDER BY published_at
LIMIT %(limit)s

-- name: delete_ids
-- Delete a chunk in primary-key order; never an unpublished or failed row.
DELETE FROM {outbox} WHERE id IN %(ids)s AND status = 'published' ORDER BY id

-- name: replay_failed
-- Put failed rows back to new (all of them, or up to %(limit)s).
UPDATE {outbox} SET status = 'new', last_error = NULL
WHERE status = 'failed'
ORDER BY id
LIMIT %(limit)s

-- name: replay_failed_ids
UPDATE {outbox} SET status = 'new', last_error = NULL
WHERE status = 'failed' AND id IN %(ids)s

-- name: insert_event
-- Used by relay.writer inside the caller's own transaction. event_ts: epoch seconds or NULL
-- (FROM_UNIXTIME keeps it right whatever the session time zone).
INSERT INTO {outbox}
    (message_id, aggregate_type, aggregate_id, event_type, op, before_state, after_state,
     payload, headers, topic, source_table, event_time)
VALUES
    (%(message_id)s, %(aggregate_type)s, %(aggregate_id)s, %(event_type)s, %(op)s,
     %(before_state)s, %(after_state)s, %(payload)s, %(headers)s, %(topic)s, %(source_table)s,
     COALESCE(FROM_UNIXTIME(%(event_ts)s), CURRENT_TIMESTAMP(6)))

-- name: ping
SELECT 1

-- name: server_version
SELECT VERSION()

-- name: table_indexes
-- Index names of a table in the current database (for `relay check`).
SELECT DISTINCT INDEX_NAME FROM information_schema.STATISTICS
WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %(table)s

-- name: table_columns
SELECT COLUMN_NAME FROM information_schema.COLUMNS
WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %(table)s

-- name: shard_rows
SELECT COUNT(*) FROM {outbox_shard}

-- name: topics_of_new_rows
-- Distinct routing inputs of new rows (for `relay check`), capped.
SELECT DISTINCT aggregate_type, event_type, source_table, topic
FROM (SELECT aggregate_type, event_type, source_table, topic FROM {outbox}
      WHERE status = 'new' LIMIT %(cap)s) AS recent
