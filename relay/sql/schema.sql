-- The outbox schema. Applied idempotently by `relay migrate`; printed by `relay schema`.
-- {outbox}, {outbox_shard}, {outbox_hold} and {outbox_meta} are replaced by the configured table
-- names (RELAY_OUTBOX__TABLE plus a suffix; validated identifiers), backtick-quoted.
-- Runs on MySQL 8.0+ and MariaDB 10.6+. Schema version 2 (see upgrade.sql for version 1).

-- name: create_outbox
-- One row per domain event, inserted by Service A inside its own domain transaction.
-- published_at: when the row was published; until then, when it was inserted. Never NULL from
-- the insert on, so the mark rewrites it in place instead of growing the row (an update that
-- grows a row moves it within or out of its page: measured, 37% of the mark's server CPU).
CREATE TABLE IF NOT EXISTS {outbox} (
    id              BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    message_id      CHAR(36) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    aggregate_type  VARCHAR(255) NOT NULL,
    aggregate_id    VARCHAR(255) NOT NULL,
    event_type      VARCHAR(255) NOT NULL,
    op              CHAR(1) CHARACTER SET ascii NOT NULL DEFAULT 'u',
    before_state    JSON NULL,
    after_state     JSON NULL,
    payload         MEDIUMBLOB NULL,
    headers         JSON NULL,
    topic           VARCHAR(249) NULL,
    source_table    VARCHAR(64) NULL,
    event_time      TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    shard           TINYINT UNSIGNED AS (CRC32(aggregate_id) % 64) STORED,
    status          ENUM('new', 'published', 'failed', 'held', 'skipped') NOT NULL DEFAULT 'new',
    attempts        INT UNSIGNED NOT NULL DEFAULT 0,
    published_at    TIMESTAMP(6) NULL DEFAULT CURRENT_TIMESTAMP(6),
    last_error      VARCHAR(1024) NULL,
    resolved_by     VARCHAR(255) NULL,
    resolved_at     TIMESTAMP(6) NULL,
    PRIMARY KEY (id),
    UNIQUE KEY ux_message_id (message_id),
    KEY ix_claim (status, shard, id),
    KEY ix_clean (status, published_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin

-- name: create_outbox_shard
-- One row per shard of aggregate ids; a worker owns a shard while it holds the row lock.
CREATE TABLE IF NOT EXISTS {outbox_shard} (
    shard TINYINT UNSIGNED NOT NULL,
    holds INT UNSIGNED NOT NULL DEFAULT 0,
    PRIMARY KEY (shard)
) ENGINE = InnoDB

-- name: seed_outbox_shard
-- The 64 shards; matches `CRC32(aggregate_id) % 64` above.
INSERT IGNORE INTO {outbox_shard} (shard)
WITH RECURSIVE n (shard) AS (SELECT 0 UNION ALL SELECT shard + 1 FROM n WHERE shard < 63)
SELECT shard FROM n

-- name: create_outbox_hold
-- Aggregates whose rows wait: behind a poison row (kind poison, released by `relay skip` or
-- `relay replay`) or after an operational error that concerned only their records (kind timed,
-- retried at retry_at; NULL retry_at: on trial, rows flowing). Written only by the owner of the
-- aggregate's shard (or by the CLI holding that shard's lock); the shard row counts its holds.
CREATE TABLE IF NOT EXISTS {outbox_hold} (
    aggregate_type  VARCHAR(255) NOT NULL,
    aggregate_id    VARCHAR(255) NOT NULL,
    shard           TINYINT UNSIGNED NOT NULL,
    kind            ENUM('poison', 'timed') NOT NULL,
    failed_id       BIGINT UNSIGNED NULL,
    reason          VARCHAR(1024) NULL,
    attempts        INT UNSIGNED NOT NULL DEFAULT 1,
    retry_at        TIMESTAMP(6) NULL DEFAULT NULL,
    created_at      TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (aggregate_id, aggregate_type),
    KEY ix_hold_shard (shard),
    KEY ix_hold_due (retry_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin

-- name: create_outbox_meta
-- Facts about the schema itself: schema_version.
CREATE TABLE IF NOT EXISTS {outbox_meta} (
    name  VARCHAR(64) CHARACTER SET ascii NOT NULL,
    value VARCHAR(255) NOT NULL,
    PRIMARY KEY (name)
) ENGINE = InnoDB

-- name: record_schema_version
-- The version this file creates; `relay run` refuses a version it does not know.
INSERT INTO {outbox_meta} (name, value) VALUES ('schema_version', '2')
ON DUPLICATE KEY UPDATE value = '2'
