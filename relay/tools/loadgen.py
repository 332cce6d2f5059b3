"""Simulated Service A for ``relay demo``, ``relay bench`` and the end-to-end tests: the
workload, concurrent writers, preloads, and the raw Kafka ceiling.

A writer transaction changes a domain row (``demo_account``, which locks the aggregate), adds a
``demo_ledger`` row and 1-3 outbox events (the workload's ``events_per_tx``), then commits, or
rolls back on purpose (the workload's ``rollback_ratio``). The account's ``version`` grows by one
per event and each event carries its own version as the aggregate's sequence, so the committed
sequences of an aggregate are exactly ``1..n``. Every message id encodes a run-wide index
(:func:`relay.tools.stats.message_id`).

Two kinds of writer insert the events (``Writers(kind=...)``):

* ``sql``: plain SQL, as a Service A in any language writes it (README.md, "Plain SQL"): one
  literal ``INSERT INTO outbox (...) VALUES (...), (...)`` of the transaction's events (values
  bound by the driver), and nothing after the commit: no wake-up. It never imports
  ``relay.writer``.
* ``helper``: the Python writer helper (``relay.writer.OutboxWriter``), which sends a wake-up
  datagram after the commit when given ``notify_to``.

Writers survive a database that goes away: a transaction broken before its commit is rolled back
by the server; one whose COMMIT got no answer is resolved by looking its message ids up after
reconnecting. Whatever happened is reported to the :class:`relay.tools.stats.Tracker`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import math
import os
import random
import time
import uuid
from collections.abc import Sequence
from typing import Any, Protocol

import aiokafka
import orjson
import pymysql
import structlog

from relay import config, db, envelope, publisher
from relay.tools import database, stats

log = structlog.get_logger(__name__)

_rng = random.Random()

AGGREGATE_TYPE = "account"
EVENT_TYPE = "AccountBalanceChanged"
SOURCE_TABLE = "demo_account"
WRITER_KINDS = ("sql", "helper")
MAX_FILLERS, MIN_FILLERS, FILLER_POOL_BYTES = 512, 16, 32 * 2**20

# "the database connection is gone or the statement was refused": reconnect and carry on
DB_ERRORS: tuple[type[BaseException], ...] = (pymysql.MySQLError, OSError, asyncio.TimeoutError)
RECONNECT_MAX_DELAY_S = 1.0
PACER_MIN_WAIT_S = 0.001  # the pacer wakes at most this often (tickets due meanwhile go together)
PACER_SLEEP_S = 0.05  # shorter waits sleep; longer ones also watch for stop
ERROR_PAUSE_S = 0.05


# -- workload ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Workload:
    """Shape of the generated events; hands out message indexes."""

    aggregates: int = 1000
    event_bytes: int = 1024
    rollback_ratio: float = 0.05
    events_per_tx: tuple[int, int] = (1, 3)  # uniform in this closed range
    prefix: str = dataclasses.field(default_factory=lambda: str(uuid.uuid4())[:23])
    next_index: int = 0
    fillers: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        low, high = self.events_per_tx
        if not 1 <= low <= high:
            raise ValueError(f"events per transaction: need 1 <= low <= high, not {low}-{high}")
        if not self.fillers:
            # Random hex: compresses about like real data does with lz4 (not to nothing). Up to
            # 512 distinct fillers, fewer for big events (the pool stays within FILLER_POOL_BYTES).
            size = max(0, self.event_bytes - 120) // 2
            count = max(MIN_FILLERS, min(MAX_FILLERS, FILLER_POOL_BYTES // max(1, 2 * size)))
            self.fillers = [os.urandom(size).hex() for _ in range(count)]

    @property
    def mean_events_per_tx(self) -> float:
        low, high = self.events_per_tx
        return (low + high) / 2.0

    def take(self) -> int:
        index = self.next_index
        self.next_index += 1
        return index

    def message_id(self, index: int) -> str:
        return stats.message_id(self.prefix, index)

    def states(self, account: int, balance: int, version: int) -> tuple[dict[str, Any], ...]:
        """(before, after) of the aggregate; ``after`` is ~``event_bytes`` of JSON."""
        before = {"id": account, "version": version - 1}
        after = {
            "id": account,
            "balance": balance,
            "version": version,
            "note": _rng.choice(self.fillers),
        }
        return before, after


def with_database(settings: config.Settings, name: str) -> config.Settings:
    return settings.model_copy(update={"db": settings.db.model_copy(update={"name": name})})


def with_topic(settings: config.Settings, topic: str) -> config.Settings:
    outbox = settings.outbox.model_copy(update={"topic_template": topic})
    return settings.model_copy(update={"outbox": outbox})


# -- Service A --------------------------------------------------------------------------------


@dataclasses.dataclass
class WriterStats:
    transactions: int = 0  # ended by a commit or a deliberate rollback
    rollbacks: int = 0  # on purpose
    failed_before_commit: int = 0  # broken by an error: rolled back for sure
    unknown_commits: int = 0  # connection lost during COMMIT, resolved afterwards
    unknown_committed: int = 0  # ... of which had committed
    reconnects: int = 0
    skipped: int = 0  # pacing ticks dropped because the writers lagged behind


@dataclasses.dataclass(frozen=True, slots=True)
class _Sent:
    index: int
    account: int
    sequence: int


class UnknownOutcomeError(Exception):
    """The commit may or may not have happened (the connection broke during COMMIT)."""

    def __init__(self, sent: Sequence[_Sent]) -> None:
        super().__init__(f"{len(sent)} events of unknown outcome")
        self.sent = list(sent)


@dataclasses.dataclass(frozen=True, slots=True)
class _Event:
    """One outbox event of a writer transaction, before either kind of writer inserts it."""

    message_id: str
    account: int
    before: dict[str, Any]
    after: dict[str, Any]


class _Outbox(Protocol):
    """How a writer inserts its events (on the transaction's cursor) and what it does after the
    commit."""

    async def add(self, cur: database.Cursor, events: Sequence[_Event]) -> None: ...

    def notify(self) -> None: ...

    def close(self) -> None: ...


class _SqlOutbox:
    """Plain SQL: one literal multi-row INSERT (``relay.tools.sql.INSERT_NEW``), no wake-up."""

    def __init__(self, table: str) -> None:
        self._table = table

    async def add(self, cur: database.Cursor, events: Sequence[_Event]) -> None:
        rows = [
            (
                e.message_id,
                AGGREGATE_TYPE,
                str(e.account),
                EVENT_TYPE,
                "u",
                orjson.dumps(e.before).decode(),
                orjson.dumps(e.after).decode(),
                SOURCE_TABLE,
            )
            for e in events
        ]
        await database.insert_new(cur, self._table, rows)

    def notify(self) -> None:
        """Nothing: a writer in another language sends no wake-up."""

    def close(self) -> None:
        pass


class _HelperOutbox:
    """The writer helper ``relay.writer.OutboxWriter``; a wake-up after each commit when given
    ``notify_to``."""

    def __init__(self, table: str, notify_to: str | None) -> None:
        from relay import writer  # noqa: PLC0415 - the plain-SQL writer must not load it

        self._outbox: writer.OutboxWriter = writer.OutboxWriter(table, notify_to=notify_to)

    async def add(self, cur: database.Cursor, events: Sequence[_Event]) -> None:
        from relay import writer  # noqa: PLC0415 - loaded by __init__ already

        await self._outbox.add(
            cur,
            *(
                writer.Event(
                    AGGREGATE_TYPE,
                    str(e.account),
                    EVENT_TYPE,
                    before=e.before,
                    after=e.after,
                    source_table=SOURCE_TABLE,
                    message_id=e.message_id,
                )
                for e in events
            ),
        )

    def notify(self) -> None:
        self._outbox.notify()

    def close(self) -> None:
        self._outbox.close()


class Sink(Protocol):
    """Where writers record their events' outcomes: a :class:`stats.Tracker`, or a writer
    process's reporter (:mod:`relay.tools.writerpool`)."""

    @property
    def committed_count(self) -> int: ...

    def committed(
        self, index: int, aggregate: int, sequence: int, t_start: float, t_commit: float
    ) -> None: ...

    def rolled_back(self, index: int) -> None: ...


class ServiceA(Protocol):
    """What ``relay bench`` drives: :class:`Writers`, or a :class:`writerpool.WriterPool` of
    them in child processes."""

    kind: str
    stats: WriterStats
    errors: list[str]

    @property
    def process_cpu_s(self) -> float:
        """CPU seconds of writer processes of their own (the bench's CPU counts the rest)."""
        ...

    async def start(self, writers: int) -> None: ...

    async def stop(self) -> None: ...


class Writers:
    """Concurrent writers, each with its own connection, of ``kind`` ``sql`` (plain SQL, no
    wake-up) or ``helper`` (``relay.writer``, wake-ups to ``notify_to``).

    With a rate, an open-loop pacer hands out one ticket per transaction at its due time
    (``relay demo|bench``): ``tx_rate`` in transactions/s (committed or rolled back on purpose),
    or ``rate`` in committed events/s (converted with the workload's mean events per transaction
    and rollback ratio). Without, each writer runs transactions back to back with an optional
    jittered ``pause_s``, until :meth:`stop` or ``target_events`` committed events.
    """

    def __init__(
        self,
        settings: config.Settings,
        workload: Workload,
        tracker: Sink,
        *,
        kind: str = "helper",
        rate: float | None = None,
        tx_rate: float | None = None,
        notify_to: str | None = None,
        pause_s: float = 0.0,
        reconnect_deadline_s: float = 120.0,
    ) -> None:
        if rate is not None and tx_rate is not None:
            raise ValueError("give rate (events/s) or tx_rate (transactions/s), not both")
        if kind not in WRITER_KINDS:
            raise ValueError(f"writer kind must be one of {WRITER_KINDS}, not {kind!r}")
        if kind == "sql" and notify_to is not None:
            raise ValueError("the plain-SQL writer sends no wake-up")
        self._settings = settings
        self._workload = workload
        self._tracker = tracker
        if rate is not None:
            tx_rate = rate / (workload.mean_events_per_tx * (1.0 - workload.rollback_ratio))
        self._rate = tx_rate
        self._pause_s = pause_s
        self._reconnect_deadline_s = reconnect_deadline_s
        self.kind = kind
        table = settings.outbox.table
        self._outbox: _Outbox = (
            _SqlOutbox(table) if kind == "sql" else _HelperOutbox(table, notify_to)
        )
        self._tickets: asyncio.Queue[float] = asyncio.Queue()
        self._stop = asyncio.Event()
        self._target: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._pacer: asyncio.Task[None] | None = None
        self.stats = WriterStats()
        self.errors: list[str] = []

    @property
    def committed_count(self) -> int:
        return self._tracker.committed_count

    @property
    def process_cpu_s(self) -> float:
        return 0.0  # they run in the caller's process

    async def start(self, writers: int, target_events: int | None = None) -> None:
        """Connect ``writers`` connections, then start writing (and pacing, with a rate)."""
        self._target = target_events
        conns: list[db.Connection] = []
        try:
            while len(conns) < writers:
                conns.append(await self._connect())
        except BaseException:
            for conn in conns:
                db.close(conn)
            raise
        self._tasks = [
            asyncio.create_task(self._run(i, conn), name=f"service-a-{i}")
            for i, conn in enumerate(conns)
        ]
        if self._rate is not None:
            self._pacer = asyncio.create_task(self._pace(self._rate), name="service-a-pacer")

    async def stop(self) -> None:
        """Stop; transactions in flight finish. Raises what a writer died of."""
        self._stop.set()
        try:
            if self._pacer is not None:
                await self._pacer
                for _ in self._tasks:
                    self._tickets.put_nowait(math.nan)  # one end marker per writer
            await self.join()
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._outbox.close()

    async def join(self) -> None:
        """Until every writer has finished (``target_events`` reached, or stopped)."""
        await asyncio.gather(*self._tasks)

    def _finished(self) -> bool:
        return self._stop.is_set() or (
            self._target is not None and self.committed_count >= self._target
        )

    async def _pace(self, tx_rate: float) -> None:
        """Open loop: a ticket per transaction at its due time; tickets pile up if writers lag
        (up to 10 per writer, then ticks are skipped and counted). Wakes at most every
        ``PACER_MIN_WAIT_S``, handing out every ticket due by then."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        issued = 0
        while not self._stop.is_set():
            due = int((loop.time() - started) * tx_rate) + 1
            for _ in range(due - issued):
                if self._tickets.qsize() > 10 * len(self._tasks):
                    self.stats.skipped += 1  # writers saturated: no unbounded queue
                else:
                    self._tickets.put_nowait(loop.time())
            issued = due
            wait = max(PACER_MIN_WAIT_S, started + issued / tx_rate - loop.time())
            if wait <= PACER_SLEEP_S:
                await asyncio.sleep(wait)  # cheaper than wait_for; stop is seen right after
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), wait)

    async def _next(self) -> bool:
        """Whether to run another transaction (waits for its ticket when paced)."""
        if self._rate is not None:
            ticket = await self._tickets.get()
            return not math.isnan(ticket)  # NaN: end marker
        return not self._finished()

    async def _run(self, index: int, conn: db.Connection | None) -> None:
        rng = random.Random(f"{self._workload.prefix}-{index}")
        unresolved: list[_Sent] = []
        try:
            while True:
                try:
                    if conn is None:
                        conn = await self._connect()
                        self.stats.reconnects += 1
                    if unresolved:
                        await self._resolve(conn, unresolved)
                        unresolved = []
                    if not await self._next():
                        return
                    await self._transaction(conn, rng)
                except UnknownOutcomeError as exc:
                    unresolved = exc.sent
                    self.stats.unknown_commits += 1
                    db.close(conn)
                    conn = None
                except DB_ERRORS as exc:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    log.warning("service_a_failed", error=self.errors[-1])
                    db.close(conn)
                    conn = None
                    await asyncio.sleep(ERROR_PAUSE_S)
                if self._pause_s:
                    await asyncio.sleep(self._pause_s * rng.uniform(0.5, 1.5))
        finally:
            db.close(conn)

    async def _connect(self) -> db.Connection:
        """Connect, retrying while the server is away (bounded by the reconnect deadline)."""
        deadline = time.monotonic() + self._reconnect_deadline_s
        delay = ERROR_PAUSE_S
        while True:
            try:
                return await db.connect(self._settings, autocommit=False)
            except DB_ERRORS:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_DELAY_S)

    async def _resolve(self, conn: db.Connection, sent: Sequence[_Sent]) -> None:
        """Did the transaction with these events commit? All or none of its ids exist."""
        ids = [self._workload.message_id(s.index) for s in sent]
        found = await database.count_message_ids(conn, self._settings.outbox.table, ids)
        await conn.rollback()  # end the read's transaction
        if found not in (0, len(ids)):
            raise RuntimeError(f"a transaction committed {found} of its {len(ids)} events")
        if found:
            self._committed(sent, math.nan, time.monotonic())
            self.stats.unknown_committed += 1
        else:
            self._rolled_back(sent)

    def _committed(self, sent: Sequence[_Sent], t_start: float, t_commit: float) -> None:
        for s in sent:
            self._tracker.committed(s.index, s.account, s.sequence, t_start, t_commit)

    def _rolled_back(self, sent: Sequence[_Sent]) -> None:
        for s in sent:
            self._tracker.rolled_back(s.index)

    async def _transaction(self, conn: db.Connection, rng: random.Random) -> None:
        """One domain transaction: change the account, add a ledger row and 1-3 events."""
        w = self._workload
        account = rng.randint(1, w.aggregates)
        count = rng.randint(*w.events_per_tx)
        amount = rng.randint(-100, 100)
        roll_back = rng.random() < w.rollback_ratio
        sent: list[_Sent] = []
        t_start = time.monotonic()
        try:
            async with conn.cursor() as cur:
                balance, version = await database.change_account(cur, account, amount, count)
                events = []
                for k in range(count):
                    sequence = version - count + 1 + k
                    before, after = w.states(account, balance, sequence)
                    sent.append(_Sent(w.take(), account, sequence))
                    events.append(_Event(w.message_id(sent[-1].index), account, before, after))
                await self._outbox.add(cur, events)
            if roll_back:
                await conn.rollback()
                self._rolled_back(sent)
                self.stats.rollbacks += 1
                self.stats.transactions += 1
                return
        except DB_ERRORS:
            self._rolled_back(sent)  # broken before COMMIT: the server rolls it back
            self.stats.failed_before_commit += 1
            raise
        try:
            await conn.commit()
        except DB_ERRORS as exc:
            raise UnknownOutcomeError(sent) from exc
        self._committed(sent, t_start, time.monotonic())
        self.stats.transactions += 1
        self._outbox.notify()


# -- preloads ---------------------------------------------------------------------------------


def _columns(
    workload: Workload, message_id: str, account: int, version: int
) -> tuple[str, str, str, str, str, str, str]:
    """(message_id, aggregate_type, aggregate_id, event_type, op, before_state, after_state) of
    an account event at ``version``, as the writers would have inserted it."""
    before, after = workload.states(account, 0, version)
    before_json, after_json = orjson.dumps(before).decode(), orjson.dumps(after).decode()
    return (message_id, AGGREGATE_TYPE, str(account), EVENT_TYPE, "u", before_json, after_json)


async def preload_new(
    settings: config.Settings,
    workload: Workload,
    tracker: stats.Tracker,
    rows: int,
    *,
    chunk: int = 1000,
    connections: int = 3,
) -> float:
    """Insert ``rows`` new outbox rows with multi-row INSERTs; returns rows per second.

    Versions continue each aggregate's sequence; the rows are tracked with no start/commit time.
    """
    versions: collections.Counter[int] = collections.Counter()
    table = settings.outbox.table
    started = time.monotonic()
    lock = asyncio.Lock()

    def build(n: int) -> list[tuple[object, ...]]:
        out: list[tuple[object, ...]] = []
        for _ in range(n):
            account = _rng.randint(1, workload.aggregates)
            versions[account] += 1
            index = workload.take()
            tracker.committed(index, account, versions[account], math.nan, math.nan)
            columns = _columns(workload, workload.message_id(index), account, versions[account])
            out.append((*columns, SOURCE_TABLE))
        return out

    remaining = rows

    async def loader() -> None:
        nonlocal remaining
        async with db.connection(settings, autocommit=False) as conn:
            while True:
                async with lock:  # ids and versions must follow the same order
                    n = min(chunk, remaining)
                    if n <= 0:
                        return
                    remaining -= n
                    async with conn.cursor() as cur:
                        await database.insert_new(cur, table, build(n))
                await conn.commit()

    # One writer at a time inserts (order), but commits overlap with the next chunk's build.
    await asyncio.gather(*(loader() for _ in range(connections)))
    return rows / max(1e-9, time.monotonic() - started)


async def preload_published(
    settings: config.Settings, workload: Workload, rows: int, *, max_statement_rows: int = 250_000
) -> float:
    """Insert ``rows`` rows already in status 'published' (retained history); returns rows/s.

    10,000 rows by multi-row INSERT, then ``INSERT ... SELECT`` doubling in bounded statements.
    """
    table = settings.outbox.table
    prefix = str(uuid.uuid4())[:23]
    started = time.monotonic()
    async with db.connection(settings) as conn, conn.cursor() as cur:
        base = min(rows, 10_000)
        for lo in range(0, base, 1000):
            batch: list[tuple[object, ...]] = []
            for i in range(lo, min(base, lo + 1000)):
                account = _rng.randint(1, workload.aggregates)
                _, after = workload.states(account, 0, 0)
                batch.append(
                    (
                        stats.message_id(prefix, i),
                        AGGREGATE_TYPE,
                        str(account),
                        EVENT_TYPE,
                        orjson.dumps(after).decode(),
                        SOURCE_TABLE,
                    )
                )
            await database.insert_published(cur, table, batch)
        first, last = await database.id_range(cur, table)
        done = base
        issued = base  # message id indexes used so far: the next copy starts above them
        while done < rows:
            n = min(rows - done, last - first + 1, max_statement_rows)
            await database.copy_published(
                cur, table, prefix=prefix, index=issued, first=first, last=first + n - 1
            )
            issued += n
            done += n
            _, last = await database.id_range(cur, table)
            log.info("retained_preload", rows=done, of=rows)
    return rows / max(1e-9, time.monotonic() - started)


# -- raw ceiling --------------------------------------------------------------------------------


@dataclasses.dataclass
class RawProgress:
    """How far :func:`produce_raw` got (read by the live progress lines)."""

    sent: int = 0
    acknowledged: int = 0


async def produce_raw(
    settings: config.Settings,
    topic: str,
    workload: Workload,
    messages: int,
    progress: RawProgress | None = None,
) -> dict[str, float]:
    """The same records (envelope, key, headers) straight to Kafka with the relay's producer
    options, no database: this machine's ceiling. Values are built before the clock starts."""
    progress = progress if progress is not None else RawProgress()
    formatter = envelope.Formatter.from_settings(with_topic(settings, topic))
    pool = []
    now_us = time.time_ns() // 1000
    for i in range(min(messages, 10_000)):
        account = _rng.randint(1, workload.aggregates)
        columns = _columns(workload, str(uuid.uuid4()), account, i + 1)
        row = envelope.Row(i + 1, *columns, None, None, None, SOURCE_TABLE, now_us)
        pool.append(formatter.record(row, now_us))
    producer = aiokafka.AIOKafkaProducer(**publisher.producer_options(settings.kafka))
    await producer.start()
    try:
        started = time.monotonic()
        pending: collections.deque[list[asyncio.Future[Any]]] = collections.deque([[]])
        for i in range(messages):
            record = pool[i % len(pool)]
            future = await producer.send(
                topic, record.value, key=record.key, headers=record.headers
            )
            pending[-1].append(future)
            progress.sent += 1
            if len(pending[-1]) >= 5000:
                pending.append([])
                if len(pending) > 4:
                    done = pending.popleft()
                    await asyncio.gather(*done)
                    progress.acknowledged += len(done)
        for chunk in pending:
            await asyncio.gather(*chunk)
            progress.acknowledged += len(chunk)
        elapsed = time.monotonic() - started
    finally:
        await producer.stop()
    return {
        "events": float(messages),
        "seconds": elapsed,
        "events_per_s": messages / elapsed,
        "value_bytes": float(sum(len(r.value) for r in pool) / len(pool)),
    }
