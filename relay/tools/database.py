"""The tools' database work: scratch databases, the simulated domain, preloads, look-ups.

The only module of :mod:`relay.tools` that executes SQL; the statements are in
:mod:`relay.tools.sql`. The outbox schema itself comes from ``relay.store`` (``relay migrate``).
"""

from __future__ import annotations

import datetime
import warnings
from collections.abc import Sequence
from typing import Any

import aiomysql
import pymysql

from relay import config, db, queries, store
from relay.tools import sql

Cursor = Any  # aiomysql.Cursor


async def _server_connection(settings: config.Settings) -> Any:
    """A connection to the server, no database selected (to create or drop one)."""
    d = settings.db
    return await aiomysql.connect(
        host=d.host,
        port=d.port,
        user=d.user,
        password=d.password.get_secret_value(),
        autocommit=True,
        connect_timeout=d.connect_timeout_s,
        charset="utf8mb4",
        ssl=db.ssl_context(d),  # RELAY_DB__SSL_* as the relay uses them
    )


async def create(settings: config.Settings, name: str, *, exist_ok: bool) -> None:
    template = sql.CREATE_DATABASE_IF_MISSING if exist_ok else sql.CREATE_DATABASE
    conn = await _server_connection(settings)
    try:
        async with conn.cursor() as cur:
            with warnings.catch_warnings():  # "database exists" is the IF NOT EXISTS case
                warnings.simplefilter("ignore", pymysql.Warning)
                await cur.execute(sql.render(template, database=name))
    finally:
        conn.close()


async def drop(settings: config.Settings, name: str) -> None:
    conn = await _server_connection(settings)
    try:
        async with conn.cursor() as cur:
            await cur.execute(sql.render(sql.DROP_DATABASE, database=name))
    finally:
        conn.close()


async def prepare(settings: config.Settings, aggregates: int) -> None:
    """``relay migrate`` plus the domain tables with accounts ``1..aggregates``."""
    async with db.connection(settings) as conn:
        await store.Store(settings.outbox.table).migrate(conn)
        async with conn.cursor() as cur:
            for statement in sql.DOMAIN_SCHEMA:
                await cur.execute(statement)
            await cur.executemany(sql.INSERT_ACCOUNT, [(i,) for i in range(1, aggregates + 1)])


async def grant_relay(settings: config.Settings, user: str) -> None:
    """README's daemon grants (``Grants``) on the outbox tables of ``settings`` to ``user``, at
    each host it is defined for; run as a user that may grant, after :func:`prepare`."""
    async with db.connection(settings) as conn, conn.cursor() as cur:
        await cur.execute(sql.USER_HOSTS, (user,))
        hosts = [str(host) for (host,) in await cur.fetchall()]
        if not hosts:
            raise ValueError(f"no database user {user!r}")
        for suffix, privileges in sql.RELAY_GRANTS:
            template = sql.GRANT_ON_TABLE.replace("{privileges}", privileges)
            statement = sql.render(
                template, database=settings.db.name, table=settings.outbox.table + suffix
            )
            for host in hosts:
                await cur.execute(statement, (user, host))


async def change_account(cur: Cursor, account: int, amount: int, events: int) -> tuple[int, int]:
    """Service A's domain change: lock the account (``UPDATE``; its version grows by one per
    event), read it back, add a ledger row. Returns (balance, version)."""
    await cur.execute(sql.CHANGE_ACCOUNT, (amount, events, account))
    await cur.execute(sql.READ_ACCOUNT, (account,))
    balance, version = await cur.fetchone()
    await cur.execute(sql.INSERT_LEDGER, (account, amount))
    return int(balance), int(version)


async def count_message_ids(conn: db.Connection, table: str, ids: Sequence[str]) -> int:
    statement, params = queries.bind(sql.render(sql.COUNT_MESSAGE_IDS, outbox=table), {"ids": ids})
    async with conn.cursor() as cur:
        await cur.execute(statement, params)
        (found,) = await cur.fetchone()
    return int(found)


async def insert_new(cur: Cursor, table: str, rows: Sequence[Sequence[object]]) -> None:
    """New outbox rows: (message_id, aggregate_type, aggregate_id, event_type, op,
    before_state, after_state, source_table)."""
    await cur.executemany(sql.render(sql.INSERT_NEW, outbox=table), rows)


async def insert_published(cur: Cursor, table: str, rows: Sequence[Sequence[object]]) -> None:
    """Rows already published: (message_id, aggregate_type, aggregate_id, event_type,
    after_state, source_table); published now, one attempt."""
    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)  # relay sessions are UTC
    await cur.executemany(
        sql.render(sql.INSERT_PUBLISHED, outbox=table),
        [(*row, "published", now, 1) for row in rows],
    )


async def id_range(cur: Cursor, table: str) -> tuple[int, int]:
    await cur.execute(sql.render(sql.ID_RANGE, outbox=table))
    first, last = await cur.fetchone()
    return int(first), int(last)


async def copy_published(
    cur: Cursor, table: str, *, prefix: str, index: int, first: int, last: int
) -> None:
    """Copy the published rows with ids ``first..last``; the copy of row ``first`` gets message
    id index ``index`` of ``prefix`` (see :func:`relay.tools.stats.message_id`)."""
    await cur.execute(
        sql.render(sql.COPY_PUBLISHED, outbox=table),
        {"prefix": prefix, "index": index, "first": first, "last": last},
    )
