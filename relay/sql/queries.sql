-- Named queries of the relay; only relay/store.py executes them.
-- Each block: a "-- name: <name>" line, comment lines, the statement. Parameters are %(name)s.
-- {outbox}, {outbox_shard}, {outbox_hold} and {outbox_meta} are the configured table names
-- (validated, backtick-quoted).

-- name: session_isolation
-- Every relay connection reads committed data and never waits for gap locks.
SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED

-- name: session_time_zone
-- TIMESTAMP columns are read and written in UTC.
SET time_zone = '+00:00'

-- name: session_lock_wait
SET SESSION innodb_lock_wait_timeout = %(seconds)s

-- name: session_idle_transaction_timeout
-- MariaDB: end a session idle inside a transaction this long (its locks are released).
SET SESSION idle_transaction_timeout = %(seconds)s

-- name: session_wait_timeout
-- MySQL (no idle_transaction_timeout): end a session idle this long.
SET SESSION wait_timeout = %(seconds)s

-- name: has_work
-- The idle look: whether any row is new or any timed hold is due. One dive on an index led by
-- status (ix_claim or ix_clean: the optimizer's pick, either stops at the first new row) and
-- one ix_hold_due dive, run in autocommit mode: no transaction, so an idle relay keeps no lock
-- of any kind (not even a metadata lock) between looks.
SELECT EXISTS (SELECT 1 FROM {outbox} WHERE status = 'new')
       OR EXISTS (SELECT 1 FROM {outbox_hold} WHERE retry_at <= CURRENT_TIMESTAMP(6))

-- name: claim_shards
-- Find and own shards in one statement: up to %(limit)s shards of [%(low)s, %(high)s) that
-- have new rows (one ix_claim dive each) or a due timed hold (looked up only when the shard
-- counts holds), skipping those another worker owns. Primary-key order with LIMIT, READ
-- COMMITTED: only the returned rows stay locked (rows the WHERE rejects are released at once),
-- and the subqueries are plain reads that lock nothing. holds > 0: the shard has held
-- aggregates, whose rows the claim must set aside.
SELECT s.shard, s.holds FROM {outbox_shard} AS s
WHERE s.shard >= %(low)s AND s.shard < %(high)s
  AND ((SELECT o.id FROM {outbox} AS o WHERE o.status = 'new' AND o.shard = s.shard
        ORDER BY o.id LIMIT 1) IS NOT NULL
       OR (s.holds > 0
           AND (SELECT h.shard FROM {outbox_hold} AS h
                WHERE h.shard = s.shard AND h.retry_at <= CURRENT_TIMESTAMP(6)
                LIMIT 1) IS NOT NULL))
ORDER BY s.shard
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED

-- name: claim_shard_heads
-- One owned shard's oldest new rows, in id order, with their size: a ref on ix_claim
-- (status, shard) read in index order, so it touches exactly the rows it returns. No FOR UPDATE:
-- the lock on the shard row already makes this worker the only claimer of the shard, and a READ
-- COMMITTED read sees only committed rows (a writer's uncommitted insert is invisible, not
-- waited for). The store repeats this block once per owned shard, joined with UNION ALL, as
-- {candidates} of claim_rows.
(SELECT id,
        COALESCE(OCTET_LENGTH(before_state), 0) + COALESCE(OCTET_LENGTH(after_state), 0)
        + COALESCE(OCTET_LENGTH(payload), 0) + COALESCE(OCTET_LENGTH(headers), 0) AS bytes
 FROM {outbox}
 WHERE status = 'new' AND shard = %(shard)s
 ORDER BY id
 LIMIT %(limit)s)

-- name: claim_rows
-- The candidates of the owned shards, cut in id order where their running size passes
-- %(max_bytes)s (the oldest row is always taken, alone if needed): each shard's rows stay a
-- prefix of its new rows. Only the rows kept are read in full, by primary key. Unordered: the
-- store sorts the (at most batch_size) rows by id, sparing the server a filesort.
SELECT o.id, o.message_id, o.aggregate_type, o.aggregate_id, o.event_type, o.op,
       o.before_state, o.after_state, o.payload, o.headers, o.topic, o.source_table,
       CAST(UNIX_TIMESTAMP(o.event_time) * 1000000 AS SIGNED) AS event_us, o.shard
FROM (
    SELECT id, bytes, SUM(bytes) OVER (ORDER BY id) AS running
    FROM ({candidates}) AS candidates
) AS sized
JOIN {outbox} AS o ON o.id = sized.id
WHERE sized.running <= %(max_bytes)s OR sized.running = sized.bytes

-- name: due_holds
-- Timed holds of owned shards whose retry time has come (ix_hold_due range; holds are few).
SELECT aggregate_type, aggregate_id, shard, kind, failed_id, attempts, 1 AS due, 0 AS open
FROM {outbox_hold}
WHERE retry_at <= CURRENT_TIMESTAMP(6) AND shard IN %(shards)s

-- name: holds_of
-- The holds of the claimed rows' aggregates (primary-key range on aggregate_id; the caller
-- keeps the exact (type, id) pairs). retry_at NULL on a timed hold: on trial, rows flowing.
SELECT aggregate_type, aggregate_id, shard, kind, failed_id, attempts,
       COALESCE(retry_at <= CURRENT_TIMESTAMP(6), 0) AS due,
       kind = 'timed' AND retry_at IS NULL AS open
FROM {outbox_hold}
WHERE aggregate_id IN %(aggregate_ids)s

-- name: park_rows
-- Rows of held aggregates leave the new range (and the claim's budget) until their hold ends.
UPDATE {outbox} SET status = 'held' WHERE id IN %(ids)s AND status = 'new'

-- name: unpark_aggregate
-- A hold ends: its aggregate's rows go back to new, to be claimed in id order (held rows of the
-- shard through ix_claim, then filtered by aggregate).
UPDATE {outbox} SET status = 'new'
WHERE status = 'held' AND shard = %(shard)s
  AND aggregate_type = %(aggregate_type)s AND aggregate_id = %(aggregate_id)s

-- name: insert_hold
-- retry_in_us NULL: a poison hold, released by an operator.
INSERT INTO {outbox_hold}
    (aggregate_type, aggregate_id, shard, kind, failed_id, reason, retry_at)
VALUES
    (%(aggregate_type)s, %(aggregate_id)s, %(shard)s, %(kind)s, %(failed_id)s, %(reason)s,
     TIMESTAMPADD(MICROSECOND, %(retry_in_us)s, CURRENT_TIMESTAMP(6)))

-- name: update_hold
UPDATE {outbox_hold}
SET kind = %(kind)s, failed_id = %(failed_id)s, reason = %(reason)s, attempts = attempts + 1,
    retry_at = TIMESTAMPADD(MICROSECOND, %(retry_in_us)s, CURRENT_TIMESTAMP(6))
WHERE aggregate_type = %(aggregate_type)s AND aggregate_id = %(aggregate_id)s

-- name: open_hold
-- A timed hold's retry time has come: its rows flow again, on trial, until they are published
-- (the hold is deleted) or fail again (the hold is renewed with a longer delay).
UPDATE {outbox_hold} SET retry_at = NULL
WHERE aggregate_type = %(aggregate_type)s AND aggregate_id = %(aggregate_id)s

-- name: delete_hold
DELETE FROM {outbox_hold}
WHERE aggregate_type = %(aggregate_type)s AND aggregate_id = %(aggregate_id)s

-- name: count_shard_holds
-- Keep the shard row's count exact after holds of the shard changed.
UPDATE {outbox_shard}
SET holds = (SELECT COUNT(*) FROM {outbox_hold} WHERE shard = %(shard)s)
WHERE shard = %(shard)s

-- name: mark_published
-- The whole published part of a batch in one statement.
UPDATE {outbox}
SET status = 'published', published_at = CURRENT_TIMESTAMP(6), attempts = attempts + 1,
    last_error = NULL
WHERE id IN %(ids)s AND status = 'new'

-- name: mark_published_commit
-- The same and the COMMIT that ends the cycle, in one round trip (the common cycle: every row
-- published, no hold involved). The driver reads both results; a failed COMMIT raises.
UPDATE {outbox}
SET status = 'published', published_at = CURRENT_TIMESTAMP(6), attempts = attempts + 1,
    last_error = NULL
WHERE id IN %(ids)s AND status = 'new';
COMMIT

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

-- name: held_count
SELECT COUNT(*) FROM (SELECT 1 FROM {outbox} WHERE status = 'held' LIMIT %(cap)s) AS held

-- name: hold_counts
SELECT kind, COUNT(*) FROM {outbox_hold} GROUP BY kind

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

-- name: expired_skipped_ids
-- Skipped rows resolved before the retention (ix_claim range on status = 'skipped'; few rows).
SELECT id FROM {outbox}
WHERE status = 'skipped'
  AND resolved_at < TIMESTAMPADD(MICROSECOND, -%(retention_us)s, CURRENT_TIMESTAMP(6))
LIMIT %(limit)s

-- name: delete_ids
-- Delete a chunk in primary-key order; only rows still in the given final status.
DELETE FROM {outbox} WHERE id IN %(ids)s AND status = %(status)s ORDER BY id

-- name: failed_rows
-- Failed rows, oldest first (ix_claim range on status = 'failed'; failed rows are few).
SELECT id, message_id, aggregate_type, aggregate_id, event_type, shard, attempts, last_error
FROM {outbox}
WHERE status = 'failed'
ORDER BY id
LIMIT %(limit)s

-- name: row_by_id
SELECT id, aggregate_type, aggregate_id, shard, status FROM {outbox} WHERE id = %(id)s

-- name: hold_of
SELECT aggregate_type, aggregate_id, shard, kind, failed_id
FROM {outbox_hold}
WHERE aggregate_type = %(aggregate_type)s AND aggregate_id = %(aggregate_id)s

-- name: holds_list
-- Every hold with the number of rows waiting behind it (for `relay failed`).
SELECT h.aggregate_type, h.aggregate_id, h.shard, h.kind, h.failed_id, h.reason, h.attempts,
       h.retry_at, h.created_at,
       (SELECT COUNT(*) FROM {outbox} AS o
        WHERE o.status = 'held' AND o.shard = h.shard
          AND o.aggregate_type = h.aggregate_type AND o.aggregate_id = h.aggregate_id) AS held
FROM {outbox_hold} AS h
ORDER BY h.created_at
LIMIT %(limit)s

-- name: lock_shard_wait
-- The CLI releasing a hold waits for the shard's owner to finish its cycle (no SKIP LOCKED).
SELECT shard FROM {outbox_shard} WHERE shard = %(shard)s FOR UPDATE

-- name: replay_row
UPDATE {outbox} SET status = 'new', last_error = NULL WHERE id = %(id)s AND status = 'failed'

-- name: skip_row
-- Give up on a failed row, recording who and when.
UPDATE {outbox}
SET status = 'skipped', resolved_by = %(who)s, resolved_at = CURRENT_TIMESTAMP(6)
WHERE id = %(id)s AND status = 'failed'

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

-- name: column_default
-- NULL when the column has no default (or a NULL one).
SELECT COLUMN_DEFAULT FROM information_schema.COLUMNS
WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %(table)s AND COLUMN_NAME = %(column)s

-- name: shard_rows
SELECT COUNT(*) FROM {outbox_shard}

-- name: current_grants
-- The relay user's grants (for `relay check`'s warning about privileges it does not need).
SHOW GRANTS FOR CURRENT_USER()

-- name: schema_version
SELECT value FROM {outbox_meta} WHERE name = 'schema_version'

-- name: column_type
SELECT COLUMN_TYPE FROM information_schema.COLUMNS
WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %(table)s AND COLUMN_NAME = %(column)s

-- name: table_names
-- Which of the relay's tables exist (for start-up checks).
SELECT TABLE_NAME FROM information_schema.TABLES
WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME IN %(tables)s

-- name: topics_of_new_rows
-- Distinct routing inputs of new rows (for `relay check`), capped.
SELECT DISTINCT aggregate_type, event_type, source_table, topic
FROM (SELECT aggregate_type, event_type, source_table, topic FROM {outbox}
      WHERE status = 'new' LIMIT %(cap)s) AS recent
