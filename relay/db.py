"""Opening relay connections to MySQL/MariaDB. Statements themselves live in ``relay.store``."""

from __future__ import annotations

from typing import Any

import aiomysql

from relay import config, store

Connection = Any  # aiomysql.Connection is untyped

# Errors meaning "the database went away or refused us for now": reconnect and retry later.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    aiomysql.OperationalError,
    aiomysql.InterfaceError,
    ConnectionError,
    OSError,
    TimeoutError,
)


async def connect(settings: config.Settings, *, autocommit: bool = True) -> Connection:
    """A connection set up for the relay: READ COMMITTED, UTC, a bounded lock wait."""
    db = settings.db
    conn = await aiomysql.connect(
        host=db.host,
        port=db.port,
        user=db.user,
        password=db.password.get_secret_value(),
        db=db.name,
        autocommit=autocommit,
        connect_timeout=db.connect_timeout_s,
        charset="utf8mb4",
    )
    try:
        await store.Store(settings.outbox.table).prepare_session(
            conn, lock_wait_timeout_s=settings.worker.lock_wait_timeout_s
        )
    except BaseException:
        conn.close()
        raise
    return conn


def close(conn: Connection | None) -> None:
    """Close without waiting on a server that may be gone."""
    if conn is not None:
        conn.close()
