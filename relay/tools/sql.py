"""Every SQL statement of the tools (``relay demo``, ``relay bench`` and the test harness).

Values are always bound by the driver (``%s`` / ``%(name)s``). The only text substituted is
identifiers, ``{database}`` and ``{outbox}``, validated and backtick-quoted by :func:`render`.
The daemon's own statements live in ``relay/sql/`` and run through ``relay.store`` only.
"""

from __future__ import annotations

from relay import queries

# -- databases (on a server connection) ---------------------------------------------------------

CREATE_DATABASE = "CREATE DATABASE {database} CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
CREATE_DATABASE_IF_MISSING = (
    "CREATE DATABASE IF NOT EXISTS {database} CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
)
DROP_DATABASE = "DROP DATABASE IF EXISTS {database}"

# -- the daemon's least privilege (README.md "Grants"), for `relay demo --relay-db-user` ---------

USER_HOSTS = "SELECT Host FROM mysql.user WHERE User = %s"
# per suffix of the outbox table's name: the privileges
RELAY_GRANTS = (
    ("", "SELECT, UPDATE, DELETE"),
    ("_shard", "SELECT, UPDATE"),
    ("_hold", "SELECT, INSERT, UPDATE, DELETE"),
    ("_meta", "SELECT"),
)
GRANT_ON_TABLE = "GRANT {privileges} ON {database}.{table} TO %s@%s"

# -- the simulated domain of Service A ------------------------------------------------------------

DOMAIN_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS demo_account (
        id BIGINT NOT NULL PRIMARY KEY,
        balance BIGINT NOT NULL DEFAULT 0,
        version BIGINT NOT NULL DEFAULT 0
    ) ENGINE = InnoDB""",
    """CREATE TABLE IF NOT EXISTS demo_ledger (
        id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        account_id BIGINT NOT NULL,
        amount BIGINT NOT NULL,
        created_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
        KEY ix_account (account_id)
    ) ENGINE = InnoDB""",
)
# executemany: the driver sends these as multi-row INSERTs
INSERT_ACCOUNT = "INSERT IGNORE INTO demo_account (id) VALUES (%s)"
# locks the aggregate: its outbox rows follow in commit order
CHANGE_ACCOUNT = (
    "UPDATE demo_account SET balance = balance + %s, version = version + %s WHERE id = %s"
)
READ_ACCOUNT = "SELECT balance, version FROM demo_account WHERE id = %s"
INSERT_LEDGER = "INSERT INTO demo_ledger (account_id, amount) VALUES (%s, %s)"

# -- the outbox table ---------------------------------------------------------------------------

# how many of a transaction's message ids exist: resolves a commit whose outcome is unknown
COUNT_MESSAGE_IDS = "SELECT COUNT(*) FROM {outbox} WHERE message_id IN %(ids)s"
# The plain-SQL writer (``relay bench --writer sql``: Service A in any language, README.md "Plain
# SQL") and the preloads; executemany sends one multi-row INSERT. event_time: the column default.
INSERT_NEW = (
    "INSERT INTO {outbox} (message_id, aggregate_type, aggregate_id, event_type, op, "
    "before_state, after_state, source_table) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
)
INSERT_PUBLISHED = (
    "INSERT INTO {outbox} (message_id, aggregate_type, aggregate_id, event_type, after_state, "
    "source_table, status, published_at, attempts) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
)
ID_RANGE = "SELECT MIN(id), MAX(id) FROM {outbox}"
# copies published rows [first, last] with fresh message ids: prefix, index of the first copy
COPY_PUBLISHED = (
    "INSERT INTO {outbox} (message_id, aggregate_type, aggregate_id, event_type, after_state, "
    "source_table, status, published_at, attempts) "
    "SELECT CONCAT(%(prefix)s, '-', LPAD(HEX(id - %(first)s + %(index)s), 12, '0')), "
    "aggregate_type, aggregate_id, event_type, after_state, source_table, status, published_at, "
    "attempts FROM {outbox} WHERE status = 'published' AND id BETWEEN %(first)s AND %(last)s"
)


def render(template: str, **identifiers: str) -> str:
    """``template`` with each ``{name}`` replaced by the quoted identifier (ValueError if bad)."""
    statement = template
    for name, value in identifiers.items():
        statement = statement.replace(f"{{{name}}}", queries.quote(value))
    return statement
