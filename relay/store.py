"""Every SQL statement the relay runs, and nothing else.

Statements come from ``sql/queries.sql`` and ``sql/schema.sql`` (see ``relay.queries``). Methods
take the connection (or, for writers, the caller's cursor) to run on; transactions are the
caller's business, except where a method says it commits.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pymysql

from relay import envelope, queries

Connection = Any  # aiomysql.Connection
Cursor = Any  # aiomysql.Cursor or pymysql.cursors.Cursor

EXPECTED_INDEXES = frozenset({"PRIMARY", "ux_message_id", "ix_claim", "ix_clean"})
SHARDS = 64


@dataclasses.dataclass(frozen=True)
class Store:
    table: str

    @property
    def sql(self) -> queries.Queries:
        return queries.load("queries.sql", self.table)

    @property
    def schema(self) -> queries.Queries:
        return queries.load("schema.sql", self.table)

    # -- session and schema ------------------------------------------------------------------

    async def prepare_session(self, conn: Connection, *, lock_wait_timeout_s: float) -> None:
        await self._execute(conn, "session_isolation", {})
        await self._execute(conn, "session_time_zone", {})
        await self._execute(conn, "session_lock_wait", {"seconds": math.ceil(lock_wait_timeout_s)})

    async def migrate(self, conn: Connection) -> None:
        """Create the tables if missing and seed the shard rows; safe to run again."""
        async with conn.cursor() as cur:
            with warnings.catch_warnings():
                # "table already exists" and "duplicate entry" notes are the idempotent case
                warnings.simplefilter("ignore", pymysql.Warning)
                for statement in self.schema.statements.values():
                    await cur.execute(statement)
        await conn.commit()

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

    async def shard_rows(self, conn: Connection) -> int:
        return int(await self._scalar(conn, "shard_rows", {}))

    async def routing_of_new_rows(
        self, conn: Connection, cap: int
    ) -> list[tuple[str, str, str | None, str | None]]:
        return list(await self._rows(conn, "topics_of_new_rows", {"cap": cap}))

    # -- claim, publish, mark ----------------------------------------------------------------

    async def ready_shards(self, conn: Connection) -> list[int]:
        """Shards with new rows, the one with the oldest head first."""
        rows = await self._rows(conn, "ready_shards", {})
        return [shard for shard, _head in sorted(rows, key=lambda r: r[1])]

    async def lock_shards(self, conn: Connection, ready: Sequence[int], limit: int) -> list[int]:
        """Lock up to ``limit`` of the ``ready`` shards for this transaction, skipping owned ones.

        Shards are taken in shard order starting at ``ready[0]`` (the oldest head) and wrapping
        around, so every shard gets its turn whatever its number.
        """
        if len(ready) <= limit:  # no choice to make: one statement
            return [
                r[0]
                for r in await self._rows(
                    conn, "lock_shards", {"shards": tuple(ready), "limit": limit}
                )
            ]
        start = ready[0]
        above = tuple(s for s in ready if s >= start)
        locked = [
            r[0] for r in await self._rows(conn, "lock_shards", {"shards": above, "limit": limit})
        ]
        below = tuple(s for s in ready if s < start)
        if below and len(locked) < limit:
            params = {"shards": below, "limit": limit - len(locked)}
            locked += [r[0] for r in await self._rows(conn, "lock_shards", params)]
        return locked

    async def claim_rows(
        self, conn: Connection, shards: Sequence[int], limit: int
    ) -> list[envelope.Row]:
        """The oldest new rows of the owned ``shards``, each shard a prefix of its new rows, in
        id order; about ``limit`` rows in all (the limit is shared out between the shards)."""
        per_shard = -(-limit // len(shards))
        sql = queries.union_all(self.sql["claim_shard_rows"], "shard", len(shards))
        params: dict[str, object] = {f"shard__{i}": s for i, s in enumerate(shards)}
        params["limit"] = per_shard
        async with conn.cursor() as cur:
            await cur.execute(sql, params)
            rows = await cur.fetchall()
        return sorted((envelope.Row(*r) for r in rows), key=operator.attrgetter("id"))

    async def mark_published(self, conn: Connection, ids: Sequence[int]) -> int:
        return await self._execute(conn, "mark_published", {"ids": tuple(ids)})

    async def mark_failed(self, conn: Connection, row_id: int, error: str) -> None:
        await self._execute(conn, "mark_failed", {"id": row_id, "error": error[:1024]})

    async def note_attempt(self, conn: Connection, ids: Sequence[int], error: str) -> None:
        await self._execute(conn, "note_attempt", {"ids": tuple(ids), "error": error[:1024]})

    # -- observation -------------------------------------------------------------------------

    async def backlog(self, conn: Connection, cap: int) -> tuple[int, float, int]:
        """(new rows up to ``cap``, age in seconds of the oldest new row, failed rows up to cap)."""
        count = int(await self._scalar(conn, "backlog_count", {"cap": cap}))
        age = await self._scalar(conn, "backlog_oldest_age", {}) if count else None
        failed = int(await self._scalar(conn, "failed_count", {"cap": cap}))
        return count, float(age or 0.0), failed

    # -- cleaner -----------------------------------------------------------------------------

    async def try_cleaner_lock(self, conn: Connection, name: str) -> bool:
        return bool(await self._scalar(conn, "cleaner_lock", {"name": name}))

    async def release_cleaner_lock(self, conn: Connection, name: str) -> None:
        await self._scalar(conn, "cleaner_unlock", {"name": name})

    async def delete_expired(self, conn: Connection, retention_s: float, limit: int) -> int:
        """Delete one chunk of expired published rows; commits. Returns rows deleted."""
        params = {"retention_us": int(retention_s * 1_000_000), "limit": limit}
        ids = [r[0] for r in await self._rows(conn, "expired_ids", params)]
        if not ids:
            return 0
        deleted = await self._execute(conn, "delete_ids", {"ids": tuple(sorted(ids))})
        await conn.commit()
        return deleted

    # -- replay ------------------------------------------------------------------------------

    async def replay(self, conn: Connection, ids: Sequence[int] | None, limit: int) -> int:
        """Failed rows back to new; commits. Returns rows changed."""
        if ids:
            changed = await self._execute(conn, "replay_failed_ids", {"ids": tuple(ids)})
        else:
            changed = await self._execute(conn, "replay_failed", {"limit": limit})
        await conn.commit()
        return changed

    # -- writers (Service A), on the caller's cursor inside the caller's transaction ---------

    async def insert_events(self, cur: Cursor, events: Iterable[Mapping[str, object]]) -> None:
        await cur.executemany(self.sql["insert_event"], list(events))

    def insert_events_sync(self, cur: Cursor, events: Iterable[Mapping[str, object]]) -> None:
        cur.executemany(self.sql["insert_event"], list(events))

    # -- helpers -----------------------------------------------------------------------------

    async def _execute(self, conn: Connection, name: str, params: Mapping[str, object]) -> int:
        sql, bound = queries.bind(self.sql[name], params)
        async with conn.cursor() as cur:
            return int(await cur.execute(sql, bound))

    async def _rows(
        self, conn: Connection, name: str, params: Mapping[str, object]
    ) -> Sequence[tuple[Any, ...]]:
        sql, bound = queries.bind(self.sql[name], params)
        async with conn.cursor() as cur:
            await cur.execute(sql, bound)
            rows: Sequence[tuple[Any, ...]] = await cur.fetchall()
            return rows

    async def _scalar(self, conn: Connection, name: str, params: Mapping[str, object]) -> Any:
        rows = await self._rows(conn, name, params)
        return rows[0][0] if rows else None
