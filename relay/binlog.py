"""Push instead of polling, for writers in any language: follow the server's binary log and wake
a worker when a transaction that inserted outbox rows commits.

Optional (``RELAY_WAKEUP__BINLOG``) and advisory: polling stays the source of truth, so a wake-up
missed, late or spurious costs at most a poll interval or one empty look. It needs what a
replica needs (REPLICATION SLAVE, and BINLOG MONITOR on MariaDB or REPLICATION CLIENT on MySQL)
and a binary log in ROW format; without them the follower logs why and retries with a capped
backoff while the relay polls as usual.

The stream is read with aiomysql's packet layer (``COM_BINLOG_DUMP`` from the current position,
under a random replica server id, so two relays never evict each other). Only event headers are
decoded: a table map naming the outbox table, a write-rows event of that table id, and the
transaction's XID (commit) event. Updates of the outbox (the relay's own marks) wake nobody.
Every event of every table crosses the network to the relay: at high rates this costs CPU for no
gain (the workers are busy anyway), which is why it is off by default.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
import time
from typing import Any

import pymysql.err
import structlog

from relay import config, db, errors, metrics, pacing

log = structlog.get_logger(__name__)

COM_BINLOG_DUMP = 0x12
HEADER = struct.Struct("<IBIIIH")  # timestamp, type, server id, size, next position, flags
XID_EVENT = 16
TABLE_MAP_EVENT = 19
# WRITE_ROWS v1 (MariaDB), v2 (MySQL), MariaDB's compressed ones (v1 and v0)
WRITE_ROWS_EVENTS = frozenset({23, 30, 166, 169})
HEARTBEAT_S = 2.0  # the server sends a heartbeat after this much silence
STALE_AFTER_S = 3 * HEARTBEAT_S  # no packet for this long: the connection is dropped


class Events:
    """Decodes event headers; says when a transaction that wrote outbox rows commits."""

    def __init__(self, schema: str, table: str) -> None:
        self._names = (schema.encode(), table.encode())
        self._table_ids: set[int] = set()
        self._wrote = False

    def commit_with_outbox_rows(self, packet: bytes) -> bool:
        """One packet of the dump (an OK byte, then an event)."""
        if len(packet) < 1 + HEADER.size or packet[0] != 0:
            return False
        kind = packet[5]
        body = packet[1 + HEADER.size :]
        if kind == TABLE_MAP_EVENT and len(body) > 9:
            table_id = int.from_bytes(body[:6], "little")
            schema_end = 9 + body[8]  # the schema name, then a NUL, then the table's length
            if len(body) <= schema_end + 1:
                return False
            schema = bytes(body[9:schema_end])
            table = bytes(body[schema_end + 2 : schema_end + 2 + body[schema_end + 1]])
            if (schema, table) == self._names:
                self._table_ids.add(table_id)
            else:
                self._table_ids.discard(table_id)  # ids are reused after a table changes
        elif kind in WRITE_ROWS_EVENTS and len(body) >= 6:
            self._wrote = self._wrote or int.from_bytes(body[:6], "little") in self._table_ids
        elif kind == XID_EVENT:
            wrote, self._wrote = self._wrote, False
            return wrote
        return False


class Follower:
    """The task behind ``RELAY_WAKEUP__BINLOG``: follow, nudge, reconnect; never raises an
    expected failure (a bug propagates)."""

    def __init__(self, settings: config.Settings, waker: pacing.Waker, stop: asyncio.Event) -> None:
        self._settings = settings
        self._waker = waker
        self._nudges = pacing.Nudges(waker, settings.wakeup.min_interval_s)
        self._stop = stop
        self._conn: Any = None
        self._last_packet = 0.0

    @property
    def following(self) -> bool:
        """Streaming from the current position: the workers rely on its wake-ups meanwhile."""
        return self._waker.pushing

    async def run(self) -> None:
        backoff = pacing.Backoff(1.0, 60.0)
        watchdog = asyncio.create_task(self._watch(), name="binlog-watchdog")
        failures = 0
        try:
            while not self._stop.is_set():
                try:
                    await self._follow()
                except Exception as exc:
                    if self._stop.is_set():
                        break
                    # any server error ends the stream, not the relay (a purged log, an
                    # evicted replica id, a checksum the server insists on); a bug of ours
                    # propagates
                    mysql = isinstance(exc, pymysql.err.MySQLError)
                    if not mysql and errors.classify(exc) is errors.Kind.BUG:
                        raise
                    failures += 1
                    if failures == 1 or failures % 10 == 0:
                        log.warning(
                            "binlog_wakeup_failed", error=errors.one_line(exc), failures=failures
                        )
                    self._close()
                    await pacing.sleep_unless(self._stop, backoff.next_delay_s())
        finally:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
            self._close()
            self._nudges.close()

    async def _follow(self) -> None:
        self._conn = conn = await db.connect(self._settings)
        async with asyncio.timeout(self._settings.db.call_timeout_s):  # the stream is dropped
            position = await self._position(conn)
            async with conn.cursor() as cur:
                await cur.execute("SET @master_binlog_checksum = @@global.binlog_checksum")
                await cur.execute("SET @mariadb_slave_capability = 4")  # MariaDB: GTID-aware
                await cur.execute("SET @master_heartbeat_period = %s", (int(HEARTBEAT_S * 1e9),))
        server_id = random.randint(1 << 30, (1 << 31) - 1)  # noqa: S311 - not a secret
        file, offset = position
        # aiomysql has no public binlog API: its command and packet layer, as PyMySQL-based
        # replication clients use it
        await conn._execute_command(
            COM_BINLOG_DUMP, struct.pack("<IHI", offset, 0, server_id) + file.encode()
        )
        events = Events(self._settings.db.name, self._settings.outbox.table)
        self._last_packet = time.monotonic()
        log.info("binlog_following", file=file, position=offset)
        self._waker.pushing = True
        try:
            while not self._stop.is_set():
                packet = await conn._read_packet()
                self._last_packet = time.monotonic()
                if events.commit_with_outbox_rows(packet.get_all_data()):
                    metrics.binlog_commits.inc()
                    self._nudges.nudge()
        finally:
            self._waker.pushing = False

    @staticmethod
    async def _position(conn: Any) -> tuple[str, int]:
        """Where the log ends now (MySQL 8.4 renamed the statement)."""
        async with conn.cursor() as cur:
            for statement in ("SHOW MASTER STATUS", "SHOW BINARY LOG STATUS"):
                try:
                    await cur.execute(statement)
                except pymysql.err.ProgrammingError as exc:
                    if errors.mysql_errno(exc) != 1064:  # not a syntax error: denied, say
                        raise
                    continue
                row = await cur.fetchone()
                if row is None:
                    raise pymysql.err.OperationalError(1381, "the binary log is off")
                return str(row[0]), int(row[1])
        raise pymysql.err.OperationalError(1064, "no statement gives the binary log position")

    async def _watch(self) -> None:
        """Close the stream on a stop, or when the server has been silent for longer than its
        heartbeats allow (a cut network): the reader then fails and reconnects."""
        while not self._stop.is_set():
            await pacing.sleep_unless(self._stop, HEARTBEAT_S)
            stale = time.monotonic() - self._last_packet > STALE_AFTER_S
            if self._stop.is_set() or (self.following and stale):
                self._close()

    def _close(self) -> None:
        db.close(self._conn)
        self._conn = None
