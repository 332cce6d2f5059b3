"""Simulated Service A (writers, preloads) and Service B (consumer) for ``relay demo|bench``.

Service A changes a domain table row (``demo_account``, which locks the aggregate), adds a
``demo_ledger`` row and 1-3 outbox events in one READ COMMITTED transaction; about 5% of the
transactions roll back on purpose. Every event carries its aggregate's ``version`` (a sequence per
aggregate) in ``after`` and a message id that encodes a run-wide index (see
:func:`relay.stats.message_id`). Service B is a plain aiokafka consumer on assigned partitions.
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
import warnings
from collections.abc import Sequence
from typing import Any

import aiokafka
import aiokafka.admin
import aiokafka.errors
import aiomysql
import orjson
import pymysql
import structlog

from relay import config, db, envelope, publisher, queries, stats, store, writer

log = structlog.get_logger(__name__)

# Workload shape, not secrets.
_rng = random.Random()  # noqa: S311

AGGREGATE_TYPE = "account"
EVENT_TYPE = "AccountBalanceChanged"
SOURCE_TABLE = "demo_account"
MEAN_EVENTS_PER_TX = 2.0  # 1-3, uniform

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


# -- workload ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Workload:
    """Shape of the generated events; hands out message indexes."""

    aggregates: int = 1000
    event_bytes: int = 1024
    rollback_ratio: float = 0.05
    prefix: str = dataclasses.field(default_factory=lambda: str(uuid.uuid4())[:23])
    next_index: int = 0
    fillers: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.fillers:
            # Random hex: compresses about like real data does with lz4 (not to nothing).
            size = max(0, self.event_bytes - 120) // 2
            self.fillers = [os.urandom(size).hex() for _ in range(512)]

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


# -- databases and topics ---------------------------------------------------------------------


def with_database(settings: config.Settings, name: str) -> config.Settings:
    return settings.model_copy(update={"db": settings.db.model_copy(update={"name": name})})


def with_topic(settings: config.Settings, topic: str) -> config.Settings:
    outbox = settings.outbox.model_copy(update={"topic_template": topic})
    return settings.model_copy(update={"outbox": outbox})


async def _server_connection(settings: config.Settings) -> Any:
    d = settings.db
    return await aiomysql.connect(
        host=d.host,
        port=d.port,
        user=d.user,
        password=d.password.get_secret_value(),
        autocommit=True,
        connect_timeout=d.connect_timeout_s,
        charset="utf8mb4",
    )


async def create_database(settings: config.Settings, name: str, *, exist_ok: bool) -> None:
    conn = await _server_connection(settings)
    try:
        async with conn.cursor() as cur:
            exists = "IF NOT EXISTS " if exist_ok else ""
            with warnings.catch_warnings():  # "database exists" is the IF NOT EXISTS case
                warnings.simplefilter("ignore", pymysql.Warning)
                await cur.execute(
                    f"CREATE DATABASE {exists}{queries.quote(name)} "
                    "CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
                )
    finally:
        conn.close()


async def drop_database(settings: config.Settings, name: str) -> None:
    conn = await _server_connection(settings)
    try:
        async with conn.cursor() as cur:
            await cur.execute(f"DROP DATABASE IF EXISTS {queries.quote(name)}")
    finally:
        conn.close()


async def prepare_database(settings: config.Settings, aggregates: int) -> None:
    """``relay migrate`` plus the domain tables with ``aggregates`` accounts."""
    conn = await db.connect(settings)
    try:
        await store.Store(settings.outbox.table).migrate(conn)
        async with conn.cursor() as cur:
            for statement in DOMAIN_SCHEMA:
                await cur.execute(statement)
            for lo in range(1, aggregates + 1, 5000):
                ids = range(lo, min(aggregates, lo + 4999) + 1)
                values = ", ".join("(%s)" for _ in ids)
                await cur.execute(
                    f"INSERT IGNORE INTO demo_account (id) VALUES {values}",
                    list(ids),
                )
    finally:
        db.close(conn)


def kafka_options(settings: config.Settings) -> dict[str, Any]:
    """Connection options shared by the admin client and the consumer."""
    options = publisher.producer_options(settings.kafka)
    keep = {"bootstrap_servers", "security_protocol", "ssl_context"}
    keep |= {k for k in options if k.startswith("sasl_")}
    return {k: v for k, v in options.items() if k in keep}


async def create_topic(settings: config.Settings, name: str, partitions: int) -> None:
    """Create a topic and wait until every partition has a leader."""
    admin = aiokafka.admin.AIOKafkaAdminClient(**kafka_options(settings))
    await admin.start()
    try:
        async with asyncio.timeout(30):
            response = await admin.create_topics(
                [aiokafka.admin.NewTopic(name, num_partitions=partitions, replication_factor=1)]
            )
            for entry in response.topic_errors:
                if entry[1] != 0:
                    raise aiokafka.errors.for_code(entry[1])(f"creating topic {name}: {entry}")
            while True:
                described = await admin.describe_topics([name])
                parts = described[0].get("partitions", []) if described else []
                if len(parts) == partitions and all(p.get("leader", -1) >= 0 for p in parts):
                    return
                await asyncio.sleep(0.05)
    finally:
        await admin.close()


async def delete_topics(settings: config.Settings, names: Sequence[str]) -> None:
    admin = aiokafka.admin.AIOKafkaAdminClient(**kafka_options(settings))
    await admin.start()
    try:
        await admin.delete_topics(list(names))
    finally:
        await admin.close()


# -- Service A: transactions at a rate --------------------------------------------------------


class ServiceA:
    """``writers`` tasks, each with its own connection, running transactions at ``rate`` msg/s."""

    def __init__(
        self,
        settings: config.Settings,
        workload: Workload,
        tracker: stats.Tracker,
        *,
        rate: float,
        writers: int,
        notify_to: str | None,
    ) -> None:
        self._settings = settings
        self._workload = workload
        self._tracker = tracker
        self._rate = rate
        self._writers = writers
        self._outbox = writer.OutboxWriter(settings.outbox.table, notify_to=notify_to)
        self._tickets: asyncio.Queue[float] = asyncio.Queue()
        self.transactions = 0
        self.rollbacks = 0
        self.skipped = 0
        self.errors = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Write until ``stop`` is set; transactions in flight then finish."""
        conns = [await db.connect(self._settings, autocommit=False) for _ in range(self._writers)]
        tasks = [
            asyncio.create_task(self._write(conn, stop), name=f"service-a-{i}")
            for i, conn in enumerate(conns)
        ]
        try:
            await self._pace(stop)
            for _ in tasks:
                self._tickets.put_nowait(math.nan)  # one end marker per writer
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for conn in conns:
                db.close(conn)
            self._outbox.close()

    async def _pace(self, stop: asyncio.Event) -> None:
        """Open loop: a ticket per transaction at its due time; tickets pile up if writers lag."""
        tx_rate = self._rate / (MEAN_EVENTS_PER_TX * (1.0 - self._workload.rollback_ratio))
        loop = asyncio.get_running_loop()
        started = loop.time()
        issued = 0
        while not stop.is_set():
            due = int((loop.time() - started) * tx_rate) + 1
            for _ in range(due - issued):
                if self._tickets.qsize() > 10 * self._writers:
                    self.skipped += 1  # writers saturated: do not build an unbounded queue
                else:
                    self._tickets.put_nowait(loop.time())
            issued = due
            wait = started + issued / tx_rate - loop.time()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)

    async def _write(self, conn: Any, stop: asyncio.Event) -> None:
        while True:
            ticket = await self._tickets.get()
            if math.isnan(ticket):  # end marker
                return
            try:
                await self.transaction(conn)
            except Exception as exc:  # noqa: BLE001 - count it, roll back, keep writing
                self.errors += 1
                log.warning("service_a_failed", error=f"{type(exc).__name__}: {exc}")
                try:
                    await conn.rollback()
                except Exception:  # noqa: BLE001
                    conn = await db.connect(self._settings, autocommit=False)

    async def transaction(self, conn: Any) -> None:
        """One domain transaction: UPDATE the aggregate, INSERT a ledger row, add 1-3 events."""
        w = self._workload
        account = _rng.randint(1, w.aggregates)
        count = _rng.randint(1, 3)
        amount = _rng.randint(-100, 100)
        roll_back = _rng.random() < w.rollback_ratio
        t_start = time.monotonic()
        async with conn.cursor() as cur:
            await cur.execute(
                "UPDATE demo_account SET balance = balance + %s, version = version + %s "
                "WHERE id = %s",
                (amount, count, account),
            )
            await cur.execute("SELECT balance, version FROM demo_account WHERE id = %s", (account,))
            balance, version = await cur.fetchone()
            await cur.execute(
                "INSERT INTO demo_ledger (account_id, amount) VALUES (%s, %s)", (account, amount)
            )
            events = []
            sent: list[tuple[int, int]] = []
            for k in range(count):
                sequence = version - count + 1 + k
                before, after = w.states(account, balance, sequence)
                index = w.take()
                sent.append((index, sequence))
                events.append(
                    writer.Event(
                        AGGREGATE_TYPE,
                        str(account),
                        EVENT_TYPE,
                        before=before,
                        after=after,
                        source_table=SOURCE_TABLE,
                        message_id=w.message_id(index),
                    )
                )
            await self._outbox.add(cur, *events)
        self.transactions += 1
        if roll_back:
            await conn.rollback()
            self.rollbacks += 1
            for index, _ in sent:
                self._tracker.rolled_back(index)
            return
        await conn.commit()
        t_commit = time.monotonic()
        for index, sequence in sent:
            self._tracker.committed(index, account, sequence, t_start, t_commit)
        self._outbox.notify()


# -- preloads ---------------------------------------------------------------------------------

_PRELOAD_COLUMNS = (
    "message_id",
    "aggregate_type",
    "aggregate_id",
    "event_type",
    "op",
    "before_state",
    "after_state",
    "source_table",
)


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
    table = queries.quote(settings.outbox.table)
    started = time.monotonic()
    lock = asyncio.Lock()

    def build(n: int) -> list[object]:
        params: list[object] = []
        for _ in range(n):
            account = _rng.randint(1, workload.aggregates)
            versions[account] += 1
            before, after = workload.states(account, 0, versions[account])
            index = workload.take()
            tracker.committed(index, account, versions[account], math.nan, math.nan)
            params += (
                workload.message_id(index),
                AGGREGATE_TYPE,
                str(account),
                EVENT_TYPE,
                "u",
                orjson.dumps(before).decode(),
                orjson.dumps(after).decode(),
                SOURCE_TABLE,
            )
        return params

    remaining = rows

    async def loader() -> None:
        nonlocal remaining
        conn = await db.connect(settings, autocommit=False)
        try:
            while True:
                async with lock:  # ids and versions must follow the same order
                    n = min(chunk, remaining)
                    if n <= 0:
                        return
                    remaining -= n
                    params = build(n)
                    row = "(" + ", ".join(["%s"] * len(_PRELOAD_COLUMNS)) + ")"
                    sql = (
                        f"INSERT INTO {table} ({', '.join(_PRELOAD_COLUMNS)}) VALUES "
                        + ", ".join([row] * n)
                    )
                    async with conn.cursor() as cur:
                        await cur.execute(sql, params)
                await conn.commit()
        finally:
            db.close(conn)

    # One writer at a time inserts (order), but commits overlap with the next chunk's build.
    await asyncio.gather(*(loader() for _ in range(connections)))
    return rows / max(1e-9, time.monotonic() - started)


async def preload_published(
    settings: config.Settings, workload: Workload, rows: int, *, max_statement_rows: int = 250_000
) -> float:
    """Insert ``rows`` rows already in status 'published' (retained history); returns rows/s.

    10,000 rows by multi-row INSERT, then ``INSERT ... SELECT`` doubling in bounded statements.
    """
    table = queries.quote(settings.outbox.table)
    prefix = str(uuid.uuid4())[:23]
    started = time.monotonic()
    conn = await db.connect(settings)
    try:
        base = min(rows, 10_000)
        async with conn.cursor() as cur:
            for lo in range(0, base, 1000):
                params: list[object] = []
                n = min(1000, base - lo)
                for i in range(lo, lo + n):
                    account = _rng.randint(1, workload.aggregates)
                    _, after = workload.states(account, 0, 0)
                    params += (
                        stats.message_id(prefix, i),
                        AGGREGATE_TYPE,
                        str(account),
                        EVENT_TYPE,
                        orjson.dumps(after).decode(),
                        SOURCE_TABLE,
                    )
                sql = (
                    f"INSERT INTO {table} (message_id, aggregate_type, aggregate_id, "
                    "event_type, after_state, source_table, status, published_at, attempts) "
                    "VALUES " + ", ".join(["(%s, %s, %s, %s, %s, %s, 'published', NOW(6), 1)"] * n)
                )
                await cur.execute(sql, params)
            await cur.execute(f"SELECT MIN(id), MAX(id) FROM {table}")
            first, last = await cur.fetchone()
            done = base
            issued = base  # message id indexes used so far: the next copy starts above them
            while done < rows:
                n = min(rows - done, last - first + 1, max_statement_rows)
                await cur.execute(
                    f"INSERT INTO {table} (message_id, aggregate_type, aggregate_id, "
                    "event_type, after_state, source_table, status, published_at, attempts) "
                    "SELECT CONCAT(%s, '-', LPAD(HEX(id - %s + %s), 12, '0')), aggregate_type, "
                    "aggregate_id, event_type, after_state, source_table, status, published_at, "
                    f"attempts FROM {table} WHERE status = 'published' AND id BETWEEN %s AND %s",
                    (prefix, first, issued, first, first + n - 1),
                )
                issued += n
                done += n
                await cur.execute(f"SELECT MAX(id) FROM {table}")
                (last,) = await cur.fetchone()
                log.info("retained_preload", rows=done, of=rows)
    finally:
        db.close(conn)
    return rows / max(1e-9, time.monotonic() - started)


# -- Service B ----------------------------------------------------------------------------------


class ServiceB:
    """Consumes the topic from the beginning (no group) and records receipts in the tracker."""

    def __init__(
        self,
        settings: config.Settings,
        topic: str,
        partitions: int,
        workload: Workload,
        tracker: stats.Tracker,
    ) -> None:
        self._consumer = aiokafka.AIOKafkaConsumer(
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=100,
            max_partition_fetch_bytes=4 * 1024 * 1024,
            **kafka_options(settings),
        )
        self._partitions = [aiokafka.TopicPartition(topic, p) for p in range(partitions)]
        self._prefix = workload.prefix
        self._tracker = tracker
        self.last_receipt = math.nan

    async def start(self) -> None:
        await self._consumer.start()
        self._consumer.assign(self._partitions)
        await self._consumer.seek_to_beginning(*self._partitions)

    async def run(self, stop: asyncio.Event) -> None:
        tracker = self._tracker
        prefix = self._prefix
        try:
            while not stop.is_set():
                batches = await self._consumer.getmany(timeout_ms=100, max_records=10_000)
                now = time.monotonic()
                for messages in batches.values():
                    for message in messages:
                        mid = next((v for k, v in message.headers if k == "message_id"), b"")
                        tracker.received(stats.parse_message_id(prefix, mid.decode()), now)
                if batches:
                    self.last_receipt = now
        finally:
            await self._consumer.stop()


# -- raw ceiling --------------------------------------------------------------------------------


async def produce_raw(
    settings: config.Settings, topic: str, workload: Workload, messages: int
) -> dict[str, float]:
    """The same records (envelope, key, headers) straight to Kafka with the relay's producer
    options, no database: this machine's ceiling. Values are built before the clock starts."""
    formatter = envelope.Formatter.from_settings(with_topic(settings, topic))
    pool = []
    now_us = time.time_ns() // 1000
    for i in range(min(messages, 10_000)):
        account = _rng.randint(1, workload.aggregates)
        before, after = workload.states(account, 0, i + 1)
        row = envelope.Row(
            i + 1,
            str(uuid.uuid4()),
            AGGREGATE_TYPE,
            str(account),
            EVENT_TYPE,
            "u",
            orjson.dumps(before).decode(),
            orjson.dumps(after).decode(),
            None,
            None,
            None,
            SOURCE_TABLE,
            now_us,
        )
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
            if len(pending[-1]) >= 5000:
                pending.append([])
                if len(pending) > 4:
                    await asyncio.gather(*pending.popleft())
        for chunk in pending:
            await asyncio.gather(*chunk)
        elapsed = time.monotonic() - started
    finally:
        await producer.stop()
    return {
        "messages": float(messages),
        "seconds": elapsed,
        "msg_per_s": messages / elapsed,
        "value_bytes": float(sum(len(r.value) for r in pool) / len(pool)),
    }
