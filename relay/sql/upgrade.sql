-- Upgrades of an existing schema, applied by `relay migrate` after schema.sql (whose CREATE TABLE
-- IF NOT EXISTS statements leave existing tables as they are). Each block runs only when the
-- store finds its change missing; every change is online on MariaDB 10.6+ and MySQL 8.0
-- (appending ENUM values and adding trailing nullable columns are metadata-only changes).

-- name: outbox_statuses_v2
-- Version 1 -> 2: statuses held (waiting behind a hold) and skipped (given up by an operator).
ALTER TABLE {outbox}
    MODIFY status ENUM('new', 'published', 'failed', 'held', 'skipped') NOT NULL DEFAULT 'new'

-- name: outbox_resolved_v2
-- Version 1 -> 2: who skipped a failed row, and when.
ALTER TABLE {outbox}
    ADD COLUMN resolved_by VARCHAR(255) NULL,
    ADD COLUMN resolved_at TIMESTAMP(6) NULL

-- name: shard_holds_v2
-- Version 1 -> 2: the number of held aggregates of each shard (0: the claim ignores holds).
ALTER TABLE {outbox_shard} ADD COLUMN holds INT UNSIGNED NOT NULL DEFAULT 0

-- name: published_at_default
-- Version 2, tables created before published_at had a default: stamp new rows at insert, so that
-- the mark updates published_at in place. A metadata-only change; old rows keep their NULL.
ALTER TABLE {outbox} ALTER COLUMN published_at SET DEFAULT CURRENT_TIMESTAMP(6), ALGORITHM = INSTANT
