-- The outbox schema. Applied idempotently by `relay migrate`; printed by `relay schema`.
-- {outbox} and {outbox_shard} are replaced by the configured table names (validated identifiers,
-- RELAY_OUTBOX__TABLE), backtick-quoted. Runs on MySQL 8.0+ and MariaDB 10.6+.

-- name: create_outbox
-- One row per domain event, inserted by Service A inside its own domain transaction.
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
    status          ENUM('new', 'published', 'failed') NOT NULL DEFAULT 'new',
    attempts        INT UNSIGNED NOT NULL DEFAULT 0,
    published_at    TIMESTAMP(6) NULL DEFAULT NULL,
    last_error      VARCHAR(1024) NULL,
    PRIMARY KEY (id),
    UNIQUE KEY ux_message_id (message_id),
    KEY ix_claim (status, shard, id),
    KEY ix_clean (status, published_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin

-- name: create_outbox_shard
-- One row per shard of aggregate ids; a worker owns a shard while it holds the row lock.
CREATE TABLE IF NOT EXISTS {outbox_shard} (
    shard TINYINT UNSIGNED NOT NULL,
    PRIMARY KEY (shard)
) ENGINE = InnoDB

-- name: seed_outbox_shard
-- The 64 shards; matches `CRC32(aggregate_id) % 64` above.
INSERT IGNORE INTO {outbox_shard} (shard)
WITH RECURSIVE n (shard) AS (SELECT 0 UNION ALL SELECT shard + 1 FROM n WHERE shard < 63)
SELECT shard FROM n
