"""Every SQL statement the relay runs, and nothing else.

Statements come from ``sql/queries.sql`` and ``sql/schema.sql`` (see ``relay.queries``). Methods
take the connection (or, for writers, the caller's cursor) to run on; transactions are the
caller's business, except where a method says it commits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import operator
import re
import warnings
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, Protocol

import pymysql

from relay import envelope, queries

Connection = Any  # aiomysql.Connection
Cursor = Any  # aiomysql.Cursor or pymysql.cursors.Cursor

EXPECTED_INDEXES = frozenset({"PRIMARY", "ux_message_id", "ix_claim", "ix_clean"})
SHARDS = 64
SCHEMA_VERSION = 2  # what schema.sql creates and this relay knows
_PASSWORD = re.compile(r"IDENTIFIED (BY PASSWORD|VIA|WITH) .*?(?= WITH |$)", re.IGNORECASE)


@dataclasses.dataclass(frozen=True, slots=True)
class Hold:
    """A held aggregate of an owned shard, as the claim sees it."""

    aggregate_type: str
    aggregate_id: str
    shard: int
    kind: str  # "poison" or "timed"
    failed_id: int | None
    attempts: int
    due: bool  # timed, and its retry time has come
    open: bool  # timed, and on trial: its rows flow

    @property
    def key(self) -> envelope.AggregateKey:
        return (self.aggregate_type, self.aggregate_id)

    @property
    def holding(self) -> bool:
        """Whether the aggregate's rows must be set aside now."""
        return self.kind == "poison" or not (self.due or self.open)


@dataclasses.dataclass(frozen=True, slots=True)
class Backlog:
    new: int
    oldest_age_s: float
    failed: int
    held: int
    holds: dict[str, int]  # by kind


@dataclasses.dataclass(frozen=True, slots=True)
class FailedRow:
    id: int
    message_id: str
    aggregate_type: str
    aggregate_id: str
    event_type: str
    shard: int
    attempts: int
    last_error: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class HoldInfo:
    aggregate_type: str
    aggregate_id: str
    shard: int
    kind: str
    failed_id: int | None
    reason: str | None
    attempts: int
    retry_at: object
    created_at: object
    held_rows: int


class Claiming(Protocol):
    """What a worker needs of the store (the real one, or an in-memory fake in unit tests)."""

    async def has_work(self, conn: Connection) -> bool: ...
    async def claim_shards(self, conn: Connection, start: int, limit: int) -> dict[int, int]: ...
    async def due_holds(self, conn: Connection, shards: Sequence[int]) -> list[Hold]: ...
    async def holds_of(
        self, conn: Connection, aggregates: Collection[envelope.AggregateKey]
    ) -> list[Hold]: ...
    async def claim_rows(
        self, conn: Connection, shards: Sequence[int], limit: int, max_bytes: int
    ) -> list[envelope.Row]: ...
    async def park(self, conn: Connection, ids: Sequence[int]) -> None: ...
    async def add_hold(
        self,
        conn: Connection,
        key: envelope.AggregateKey,
        shard: int,
        *,
        kind: str,
        failed_id: int | None,
        reason: str,
        retry_in_s: float | None,
        exists: bool,
    ) -> None: ...
    async def open_hold(self, conn: Connection, hold: Hold) -> None: ...
    async def delete_hold(
        self, conn: Connection, key: envelope.AggregateKey, shard: int
    ) -> None: ...
    async def count_holds(self, conn: Connection, shard: int) -> None: ...
    async def mark_published(
        self, conn: Connection, ids: Sequence[int], *, commit: bool = False
    ) -> int: ...
    async def mark_failed(self, conn: Connection, row_id: int, error: str) -> None: ...
    async def note_attempt(self, conn: Connection, ids: Sequence[int], error: str) -> None: ...


class Observing(Protocol):
    """What the backlog sampler needs of the store."""

    async def backlog(self, conn: Connection, cap: int) -> Backlog: ...


@dataclasses.dataclass(frozen=True)
class Store:
    table: str
    timeout_s: float | None = None  # bound of each statement (None: the server's own limits)

    @property
    def sql(self) -> queries.Queries:
        return queries.load("queries.sql", self.table)

    @property
    def schema(self) -> queries.Queries:
        return queries.load("schema.sql", self.table)

    @property
    def upgrades(self) -> queries.Queries:
        return queries.load("upgrade.sql", self.table)

    # -- session and schema ------------------------------------------------------------------

    async def prepare_session(
        self, conn: Connection, *, lock_wait_timeout_s: float, idle_timeout_s: float | None = None
    ) -> None:
        """READ COMMITTED, UTC, a bounded lock wait; and with ``idle_timeout_s`` the server ends
        the session when it idles that long inside a transaction (MariaDB's
        ``idle_transaction_timeout``; MySQL has only ``wait_timeout``, for any idle session), so
        that a relay gone silent (a network black hole) does not keep its shard locks."""
        await self._execute(conn, "session_isolation", {})
        await self._execute(conn, "session_time_zone", {})
        await self._execute(conn, "session_lock_wait", {"seconds": math.ceil(lock_wait_timeout_s)})
        if idle_timeout_s is not None:
            seconds = {"seconds": math.ceil(idle_timeout_s)}
            if "mariadb" in str(conn.get_server_info()).lower():
                await self._execute(conn, "session_idle_transaction_timeout", seconds)
            else:
                await self._execute(conn, "session_wait_timeout", seconds)

    async def migrate(self, conn: Connection) -> list[str]:
        """Create missing tables, upgrade existing ones in place, record the schema version.

        Safe to run again; returns the names of the upgrade steps that ran (none when the schema
        was current or new).
        """
        steps: list[str] = []
        async with conn.cursor() as cur:
            with warnings.catch_warnings():
                # "table already exists" and "duplicate entry" notes are the idempotent case
                warnings.simplefilter("ignore", pymysql.Warning)
                for name, statement in self.schema.statements.items():
                    if name != "record_schema_version":
                        await cur.execute(statement)
                for name in await self.missing_upgrades(conn):
                    await cur.execute(self.upgrades[name])
                    steps.append(name)
                await cur.execute(self.schema["record_schema_version"])
        await conn.commit()
        return steps

    async def missing_upgrades(self, conn: Connection) -> list[str]:
        """The upgrade steps (upgrade.sql) an existing schema still lacks, in order."""
        status = await self._scalar(conn, "column_type", {"table": self.table, "column": "status"})
        missing = []
        if "'skipped'" not in str(status):
            missing.append("outbox_statuses_v2")
        if "resolved_by" not in await self.columns(conn):
            missing.append("outbox_resolved_v2")
        shard_columns = await self._rows(conn, "table_columns", {"table": f"{self.table}_shard"})
        if "holds" not in {r[0] for r in shard_columns}:
            missing.append("shard_holds_v2")
        stamp = await self._scalar(
            conn, "column_default", {"table": self.table, "column": "published_at"}
        )
        if stamp is None or str(stamp).upper() == "NULL":  # MariaDB shows a NULL default as 'NULL'
            missing.append("published_at_default")
        return missing

    async def schema_version(self, conn: Connection) -> int | None:
        """The recorded schema version; None when the schema predates versions (version 1)."""
        tables = await self._rows(conn, "table_names", {"tables": (f"{self.table}_meta",)})
        if not tables:
            return None
        value = await self._scalar(conn, "schema_version", {})
        return int(value) if value is not None else None

    async def existing_tables(self, conn: Connection) -> set[str]:
        names = tuple(self.table + suffix for suffix in queries.TABLE_SUFFIXES)
        return {str(r[0]) for r in await self._rows(conn, "table_names", {"tables": names})}

    async def ping(self, conn: Connection) -> None:
        async with conn.cursor() as cur:
            await cur.execute(self.sql["ping"])
            await cur.fetchall()

    async def server_version(self, conn: Connection) -> str:
        return str(await self._scalar(conn, "server_version", {}))

    async def indexes(self, conn: Connection) -> set[str]:
        return {r[0] for r in await self._rows(conn, "table_indexes", {"table": self.table})}

    async def columns(self, conn: Connection) -> set[str]:
        return {r[0] for r in await self._rows(conn, "table_columns", {"table": self.table})}

    async def grants(self, conn: Connection) -> list[str]:
        """The current user's GRANT statements, password hashes removed."""
        rows = await self._rows(conn, "current_grants", {})
        return [_PASSWORD.sub("IDENTIFIED BY PASSWORD <hidden>", str(r[0])) for r in rows]

    async def shard_rows(self, conn: Connection) -> int:
        return int(await self._scalar(conn, "shard_rows", {}))

    async def routing_of_new_rows(
        self, conn: Connection, cap: int
    ) -> list[tuple[str, str, str | None, str | None]]:
        return list(await self._rows(conn, "topics_of_new_rows", {"cap": cap}))

    # -- claim, publish, mark ----------------------------------------------------------------

    async def has_work(self, conn: Connection) -> bool:
        """Whether a row is new or a timed hold is due (for an autocommit connection)."""
        return bool(await self._scalar(conn, "has_work", {}))

    async def claim_shards(self, conn: Connection, start: int, limit: int) -> dict[int, int]:
        """Find and lock, in one statement, up to ``limit`` shards that have new rows or a due
        timed hold, skipping those another worker owns: from shard ``start`` up, then wrapping
        around to the shards below it (a second statement, only when the first came back
        short). Returns {shard: number of held aggregates} in claim order.
        """
        params: dict[str, object] = {"low": start, "high": SHARDS, "limit": limit}
        owned = {r[0]: int(r[1]) for r in await self._rows(conn, "claim_shards", params)}
        if start > 0 and len(owned) < limit:
            params = {"low": 0, "high": start, "limit": limit - len(owned)}
            owned.update((r[0], int(r[1])) for r in await self._rows(conn, "claim_shards", params))
        return owned

    async def due_holds(self, conn: Connection, shards: Sequence[int]) -> list[Hold]:
        """Timed holds of owned ``shards`` whose retry time has come."""
        return _holds(await self._rows(conn, "due_holds", {"shards": tuple(shards)}))

    async def holds_of(
        self, conn: Connection, aggregates: Collection[envelope.AggregateKey]
    ) -> list[Hold]:
        """The holds of these aggregates (owned by the caller), if any."""
        ids = tuple(sorted({aggregate_id for _, aggregate_id in aggregates}))
        rows = await self._rows(conn, "holds_of", {"aggregate_ids": ids})
        return [h for h in _holds(rows) if h.key in aggregates]

    async def claim_rows(
        self, conn: Connection, shards: Sequence[int], limit: int, max_bytes: int
    ) -> list[envelope.Row]:
        """The oldest new rows of the owned ``shards``, each shard a prefix of its new rows, in
        id order: about ``limit`` rows in all (shared out between the shards) and at most
        ``max_bytes`` of JSON and payload (the oldest row always, alone if needed)."""
        per_shard = -(-limit // len(shards))
        heads = queries.union_all(self.sql["claim_shard_heads"], "shard", len(shards))
        sql = queries.nest(self.sql["claim_rows"], "{candidates}", heads)
        params: dict[str, object] = {f"shard__{i}": s for i, s in enumerate(shards)}
        params["limit"] = per_shard
        params["max_bytes"] = max_bytes
        rows = await self._fetch(conn, sql, params)
        return sorted((envelope.Row(*r) for r in rows), key=operator.attrgetter("id"))

    async def park(self, conn: Connection, ids: Sequence[int]) -> None:
        """Rows of held aggregates leave the new range until their hold ends."""
        await self._execute(conn, "park_rows", {"ids": tuple(ids)})

    async def add_hold(
        self,
        conn: Connection,
        key: envelope.AggregateKey,
        shard: int,
        *,
        kind: str,
        failed_id: int | None,
        reason: str,
        retry_in_s: float | None,
        exists: bool,
    ) -> None:
        """Hold an aggregate (or renew its hold). Caller owns the shard; recount after."""
        params = {
            "aggregate_type": key[0],
            "aggregate_id": key[1],
            "shard": shard,
            "kind": kind,
            "failed_id": failed_id,
            "reason": reason[:1024],
            "retry_in_us": None if retry_in_s is None else int(retry_in_s * 1_000_000),
        }
        if exists:
            await self._execute(conn, "update_hold", params)
        else:
            await self._execute(conn, "insert_hold", params)

    async def open_hold(self, conn: Connection, hold: Hold) -> None:
        """A due timed hold: its rows back to new, the hold on trial."""
        await self._unpark(conn, hold.key, hold.shard)
        await self._execute(conn, "open_hold", _key_params(hold.key))

    async def delete_hold(self, conn: Connection, key: envelope.AggregateKey, shard: int) -> None:
        """End a hold: its rows back to new. Caller owns the shard; recount after."""
        await self._unpark(conn, key, shard)
        await self.drop_hold(conn, key)

    async def drop_hold(self, conn: Connection, key: envelope.AggregateKey) -> None:
        """Only the hold's row (its rows, if any, stay held)."""
        await self._execute(conn, "delete_hold", _key_params(key))

    async def count_holds(self, conn: Connection, shard: int) -> None:
        await self._execute(conn, "count_shard_holds", {"shard": shard})

    async def _unpark(self, conn: Connection, key: envelope.AggregateKey, shard: int) -> None:
        params = {**_key_params(key), "shard": shard}
        await self._execute(conn, "unpark_aggregate", params)

    async def mark_published(
        self, conn: Connection, ids: Sequence[int], *, commit: bool = False
    ) -> int:
        """Mark rows published; with ``commit``, commit in the same round trip."""
        if commit:
            return await self._execute(conn, "mark_published_commit", {"ids": tuple(ids)})
        return await self._execute(conn, "mark_published", {"ids": tuple(ids)})

    async def mark_failed(self, conn: Connection, row_id: int, error: str) -> None:
        await self._execute(conn, "mark_failed", {"id": row_id, "error": error[:1024]})

    async def note_attempt(self, conn: Connection, ids: Sequence[int], error: str) -> None:
        await self._execute(conn, "note_attempt", {"ids": tuple(ids), "error": error[:1024]})

    # -- observation -------------------------------------------------------------------------

    async def backlog(self, conn: Connection, cap: int) -> Backlog:
        """New, failed and held rows (each up to ``cap``), the oldest new row's age, holds."""
        count = int(await self._scalar(conn, "backlog_count", {"cap": cap}))
        age = await self._scalar(conn, "backlog_oldest_age", {}) if count else None
        failed = int(await self._scalar(conn, "failed_count", {"cap": cap}))
        held = int(await self._scalar(conn, "held_count", {"cap": cap}))
        holds = {str(k): int(n) for k, n in await self._rows(conn, "hold_counts", {})}
        return Backlog(count, float(age or 0.0), failed, held, holds)

    # -- cleaner -----------------------------------------------------------------------------

    async def try_cleaner_lock(self, conn: Connection, name: str) -> bool:
        return bool(await self._scalar(conn, "cleaner_lock", {"name": name}))

    async def release_cleaner_lock(self, conn: Connection, name: str) -> None:
        await self._scalar(conn, "cleaner_unlock", {"name": name})

    async def delete_expired(
        self, conn: Connection, retention_s: float, limit: int, status: str = "published"
    ) -> int:
        """Delete one chunk of expired rows in a final ``status`` (published or skipped);
        commits. Returns rows deleted. One statement per status keeps each on its index."""
        params = {"retention_us": int(retention_s * 1_000_000), "limit": limit}
        if status == "published":
            rows = await self._rows(conn, "expired_ids", params)
        else:
            rows = await self._rows(conn, "expired_skipped_ids", params)
        ids = [r[0] for r in rows]
        if not ids:
            return 0
        deleted = await self._execute(
            conn, "delete_ids", {"ids": tuple(sorted(ids)), "status": status}
        )
        await conn.commit()
        return deleted

    async def delete_ids(self, conn: Connection, ids: Sequence[int]) -> int:
        """Delete published rows by id, without committing (``relay check`` uses it)."""
        return await self._execute(conn, "delete_ids", {"ids": tuple(ids), "status": "published"})

    # -- operator actions (relay failed | replay | skip) --------------------------------------

    async def failed_rows(self, conn: Connection, limit: int) -> list[FailedRow]:
        rows = await self._rows(conn, "failed_rows", {"limit": limit})
        return [FailedRow(*r) for r in rows]

    async def hold_list(self, conn: Connection, limit: int) -> list[HoldInfo]:
        rows = await self._rows(conn, "holds_list", {"limit": limit})
        return [
            HoldInfo(
                aggregate_type=str(r[0]),
                aggregate_id=str(r[1]),
                shard=int(r[2]),
                kind=str(r[3]),
                failed_id=r[4],
                reason=r[5],
                attempts=int(r[6]),
                retry_at=r[7],
                created_at=r[8],
                held_rows=int(r[9]),
            )
            for r in rows
        ]

    async def row(self, conn: Connection, row_id: int) -> tuple[int, str, str, int, str] | None:
        """(id, aggregate_type, aggregate_id, shard, status) of one row."""
        rows = await self._rows(conn, "row_by_id", {"id": row_id})
        if not rows:
            return None
        id_, aggregate_type, aggregate_id, shard, status = rows[0]
        return int(id_), str(aggregate_type), str(aggregate_id), int(shard), str(status)

    async def hold_of(
        self, conn: Connection, key: envelope.AggregateKey
    ) -> tuple[str, int | None, int] | None:
        """(kind, failed_id, shard) of the aggregate's hold, if it has one."""
        rows = await self._rows(conn, "hold_of", _key_params(key))
        return (str(rows[0][3]), rows[0][4], int(rows[0][2])) if rows else None

    async def lock_shard_wait(self, conn: Connection, shard: int) -> None:
        """Wait for the shard's owner to finish its cycle, then own the shard."""
        await self._rows(conn, "lock_shard_wait", {"shard": shard})

    async def replay_row(self, conn: Connection, row_id: int) -> int:
        return await self._execute(conn, "replay_row", {"id": row_id})

    async def skip_row(self, conn: Connection, row_id: int, who: str) -> int:
        return await self._execute(conn, "skip_row", {"id": row_id, "who": who[:255]})

    # -- writers (Service A), on the caller's cursor inside the caller's transaction ---------

    async def insert_events(self, cur: Cursor, events: Iterable[Mapping[str, object]]) -> None:
        await cur.executemany(self.sql["insert_event"], list(events))

    def insert_events_sync(self, cur: Cursor, events: Iterable[Mapping[str, object]]) -> None:
        cur.executemany(self.sql["insert_event"], list(events))

    # -- helpers -----------------------------------------------------------------------------

    async def _execute(self, conn: Connection, name: str, params: Mapping[str, object]) -> int:
        sql, bound = queries.bind(self.sql[name], params)
        async with asyncio.timeout(self.timeout_s), conn.cursor() as cur:
            return int(await cur.execute(sql, bound))

    async def _rows(
        self, conn: Connection, name: str, params: Mapping[str, object]
    ) -> Sequence[tuple[Any, ...]]:
        sql, bound = queries.bind(self.sql[name], params)
        return await self._fetch(conn, sql, bound)

    async def _fetch(
        self, conn: Connection, sql: str, params: Mapping[str, object]
    ) -> Sequence[tuple[Any, ...]]:
        """Run one statement and fetch its rows, within ``timeout_s`` (a connection whose call
        timed out is in an unknown state: the caller drops it)."""
        async with asyncio.timeout(self.timeout_s), conn.cursor() as cur:
            await cur.execute(sql, params)
            rows: Sequence[tuple[Any, ...]] = await cur.fetchall()
            return rows

    async def _scalar(self, conn: Connection, name: str, params: Mapping[str, object]) -> Any:
        rows = await self._rows(conn, name, params)
        return rows[0][0] if rows else None


def _holds(rows: Sequence[tuple[Any, ...]]) -> list[Hold]:
    return [
        Hold(str(t), str(a), int(s), str(k), f, int(n), bool(due), bool(open_))
        for t, a, s, k, f, n, due, open_ in rows
    ]


def _key_params(key: envelope.AggregateKey) -> dict[str, object]:
    return {"aggregate_type": key[0], "aggregate_id": key[1]}
