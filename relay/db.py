"""Opening relay connections to MySQL/MariaDB. Statements themselves live in ``relay.store``."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiomysql

from relay import config, store

Connection = Any  # aiomysql.Connection is untyped
ConnectionContext = contextlib.AbstractAsyncContextManager[Connection]


async def connect(
    settings: config.Settings, *, autocommit: bool = True, lock_wait_timeout_s: float | None = None
) -> Connection:
    """A connection set up for the relay: READ COMMITTED, UTC, a bounded lock wait (by default
    ``RELAY_WORKER__LOCK_WAIT_TIMEOUT_S``)."""
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
            conn, lock_wait_timeout_s=lock_wait_timeout_s or settings.worker.lock_wait_timeout_s
        )
    except BaseException:
        conn.close()
        raise
    return conn


@contextlib.asynccontextmanager
async def connection(
    settings: config.Settings, *, autocommit: bool = True, lock_wait_timeout_s: float | None = None
) -> AsyncIterator[Connection]:
    """``async with db.connection(settings) as conn:`` a relay connection, closed afterwards."""
    conn = await connect(settings, autocommit=autocommit, lock_wait_timeout_s=lock_wait_timeout_s)
    try:
        yield conn
    finally:
        close(conn)


def close(conn: Connection | None) -> None:
    """Close without waiting on a server that may be gone."""
    if conn is not None:
        conn.close()
