"""Shared helpers of the end-to-end and fault suites: relay processes, writers, a consumer, checks.

* :class:`Fleet` starts ``relay run`` processes (``sys.executable -m relay run``) with their own
  ``RELAY_*`` environment, JSON logs in files and a free metrics port each; stops them with SIGTERM
  (graceful, exit code returned) or SIGKILL.
* :class:`Writers` simulate Service A: each task has its own aiomysql connection; a transaction
  locks one aggregate row (``UPDATE accounts SET version = version + 1``), reads the version,
  inserts into a second domain table and adds 1-3 outbox events with :class:`relay.writer.
  OutboxWriter`, then commits, or rolls back on purpose. Connection errors are survived: a
  transaction that failed before its commit is rolled back; one whose commit outcome is unknown is
  resolved by looking its message ids up; only transactions that did not commit are retried.
* :class:`Consumer` reads every partition of the topic from the beginning (no group) and records
  every delivered ``message_id`` header in arrival order.
* :func:`verify` compares both sides: lost, leaked (rolled back yet delivered), per-aggregate order
  of first occurrences, duplicates; :func:`outbox_statuses` checks the table side.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import aiomysql
import pymysql
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from servers import REPO_ROOT, SERVERS_SH, Kafka, MariaDB, create_topic, delete_topic, unique_name

from relay import bench, store, writer

AGGREGATE_TYPE = "account"
TABLE = "outbox"
PARTITIONS = 6
PUBLISHED_METRIC = "outbox_relay_published_total"

# Errors meaning "the database connection is gone or the statement was refused": reconnect.
DB_ERRORS: tuple[type[BaseException], ...] = (pymysql.MySQLError, OSError, asyncio.TimeoutError)


# ------------------------------------------------------------------ small utilities


def free_port() -> int:
    """A TCP port nobody listens on right now (the relay binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_until(
    predicate: Callable[[], Any],
    timeout_s: float,
    what: str,
    interval_s: float = 0.1,
) -> None:
    """Poll ``predicate`` (sync or async) until it is truthy; AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(interval_s)


async def asyncio_sleep(delay_s: float) -> None:
    """A deliberate pause that is part of a scenario (a random kill delay, an outage)."""
    await asyncio.sleep(delay_s)


async def servers_sh(action: str, server: str, timeout_s: float = 300.0) -> str:
    """Run ``deploy/local/servers.sh <action> <server>``; raise with its output when it fails."""
    proc = await asyncio.to_thread(
        subprocess.run,
        ["bash", str(SERVERS_SH), action, server],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    output = f"{proc.stdout}{proc.stderr}"
    if proc.returncode != 0:
        raise RuntimeError(f"servers.sh {action} {server} exited {proc.returncode}:\n{output}")
    return output


def ensure_servers_up() -> None:
    """Synchronous, for ``finally`` blocks of the fault tests: both shared servers up again."""
    subprocess.run(  # noqa: S603 - fixed argv, our own script
        ["bash", str(SERVERS_SH), "up"],  # noqa: S607
        capture_output=True,
        timeout=300,
        check=True,
    )


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format to ``{"name{labels}": value}`` (comments skipped)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            values[name] = float(value)
    return values


# ------------------------------------------------------------------ database and topic


async def connect(mariadb: MariaDB, database: str, *, autocommit: bool = False) -> Any:
    return await aiomysql.connect(
        host=mariadb.host,
        port=mariadb.port,
        user=mariadb.user,
        password=mariadb.password,
        db=database,
        autocommit=autocommit,
        connect_timeout=5,
        charset="utf8mb4",
    )


async def prepare_database(mariadb: MariaDB, database: str, aggregates: int) -> list[str]:
    """The outbox schema (``relay migrate``'s) plus the domain tables; returns aggregate ids."""
    ids = [f"acc-{i}" for i in range(aggregates)]
    conn = await connect(mariadb, database)
    try:
        await store.Store(TABLE).migrate(conn)
        async with conn.cursor() as cur:
            await cur.execute(
                "CREATE TABLE accounts (id VARCHAR(64) NOT NULL PRIMARY KEY, "
                "version INT UNSIGNED NOT NULL DEFAULT 0) ENGINE=InnoDB"
            )
            await cur.execute(
                "CREATE TABLE ledger (id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY, "
                "account_id VARCHAR(64) NOT NULL, version INT UNSIGNED NOT NULL, "
                "amount INT NOT NULL, KEY ix_account (account_id, version)) ENGINE=InnoDB"
            )
            await cur.executemany("INSERT INTO accounts (id) VALUES (%s)", ids)
        await conn.commit()
    finally:
        conn.close()
    return ids


async def outbox_statuses(mariadb: MariaDB, database: str) -> dict[str, str]:
    """``message_id -> status`` of every outbox row."""
    conn = await connect(mariadb, database, autocommit=True)
    try:
        async with conn.cursor() as cur:
            await cur.execute(f"SELECT message_id, status FROM {TABLE}")
            rows: Sequence[tuple[str, str]] = await cur.fetchall()
    finally:
        conn.close()
    return dict(rows)


async def count_new(mariadb: MariaDB, database: str) -> int:
    conn = await connect(mariadb, database, autocommit=True)
    try:
        async with conn.cursor() as cur:
            await cur.execute(f"SELECT COUNT(*) FROM {TABLE} WHERE status = 'new'")
            row: tuple[int] = await cur.fetchone()
    finally:
        conn.close()
    return int(row[0])


async def wait_drained(mariadb: MariaDB, database: str, timeout_s: float) -> float:
    """Until no outbox row is new; returns the seconds it took."""
    started = time.monotonic()

    async def drained() -> bool:
        return await count_new(mariadb, database) == 0

    await wait_until(drained, timeout_s, "the outbox backlog to drain", 0.2)
    return time.monotonic() - started


@contextlib.asynccontextmanager
async def fresh_topic(kafka: Kafka, partitions: int = PARTITIONS) -> AsyncIterator[str]:
    """A fresh topic ``e2e_<hex>.account`` (the relay's template is ``e2e_<hex>.{aggregate_type}``
    and every event has aggregate type ``account``); deleted afterwards."""
    name = f"{unique_name('e2e_')}.{AGGREGATE_TYPE}"
    await create_topic(kafka.bootstrap, name, partitions=partitions)
    try:
        yield name
    finally:
        with contextlib.suppress(KafkaError, OSError):
            await delete_topic(kafka.bootstrap, name)


def topic_template(topic: str) -> str:
    prefix, _, aggregate_type = topic.rpartition(".")
    assert aggregate_type == AGGREGATE_TYPE
    return prefix + ".{aggregate_type}"


# ------------------------------------------------------------------ relay processes


@dataclasses.dataclass
class RelayProcess:
    name: str
    popen: subprocess.Popen[bytes]
    http_port: int
    log_path: Path
    started_at: float

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    async def metrics(self) -> dict[str, float]:
        status, body = await bench.http_get(self.http_port, "/metrics")
        if status != 200:
            raise AssertionError(f"{self.name}: /metrics answered {status}")
        return parse_metrics(body)

    async def published(self) -> float | None:
        """The process's published counter, or None while its endpoint does not answer."""
        try:
            return (await self.metrics()).get(PUBLISHED_METRIC)
        except (OSError, TimeoutError, AssertionError, IndexError, ValueError):
            return None

    async def wait_exit(self, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while (code := self.popen.poll()) is None:
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{self.name} still runs {timeout_s:.0f} s later\n{self.tail()}"
                )
            await asyncio.sleep(0.05)
        return code

    async def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait: the exit code (0 expected from a graceful shutdown)."""
        if self.alive:
            self.popen.send_signal(signal.SIGTERM)
        return await self.wait_exit(timeout_s)

    async def kill(self) -> int:
        """SIGKILL (``kill -9``) and reap."""
        if self.alive:
            self.popen.kill()
        return await self.wait_exit(10.0)

    def logs(self) -> list[dict[str, Any]]:
        """The JSON log lines (non-JSON lines, e.g. a traceback, come back as ``{"raw": ...}``)."""
        entries: list[dict[str, Any]] = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                entry = {"raw": line}
            entries.append(entry if isinstance(entry, dict) else {"raw": line})
        return entries

    def summary(self, top: int = 8) -> str:
        """The most frequent log events with their last warning-level error (for failures)."""
        counts: Counter[str] = Counter()
        errors: dict[str, str] = {}
        for entry in self.logs():
            name = str(entry.get("event", entry.get("raw", "")))[:100]
            counts[name] += 1
            if "error" in entry:
                errors[name] = str(entry["error"])[:200]
        return f"{self.name} log: " + "; ".join(
            f"{n}x {name}" + (f" ({errors[name]})" if name in errors else "")
            for name, n in counts.most_common(top)
        )

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.logs() if e.get("event") == name]

    def tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return f"---- last lines of {self.log_path} ----\n" + "\n".join(text)


class Fleet:
    """Relay processes for one database and topic. Use as ``async with``: leftovers get SIGKILL."""

    def __init__(
        self,
        mariadb: MariaDB,
        kafka: Kafka,
        database: str,
        topic: str,
        workdir: Path,
        **settings: str | int | float,
    ) -> None:
        self._workdir = workdir
        self._base_env = {
            "RELAY_DB__HOST": mariadb.host,
            "RELAY_DB__PORT": str(mariadb.port),
            "RELAY_DB__USER": mariadb.user,
            "RELAY_DB__PASSWORD": mariadb.password,
            "RELAY_DB__NAME": database,
            "RELAY_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap,
            "RELAY_OUTBOX__TABLE": TABLE,
            "RELAY_OUTBOX__TOPIC_TEMPLATE": topic_template(topic),
            "RELAY_HTTP__HOST": "127.0.0.1",
            "RELAY_LOG__FORMAT": "json",
            "RELAY_SECRETS_DIR": str(workdir / "no-secrets"),
        }
        for key, value in settings.items():
            self._base_env[f"RELAY_{key.upper()}"] = str(value)
        self.processes: list[RelayProcess] = []

    def start(self, **settings: str | int | float) -> RelayProcess:
        """Start one ``relay run``; ``settings`` override per process (``worker__count=2``)."""
        name = f"relay-{len(self.processes)}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        env.update(self._base_env)
        port = free_port()
        env["RELAY_HTTP__PORT"] = str(port)
        for key, value in settings.items():
            env[f"RELAY_{key.upper()}"] = str(value)
        log_path = self._workdir / f"{name}.log"
        with log_path.open("wb") as log_file:
            popen = subprocess.Popen(
                [sys.executable, "-m", "relay", "run"],
                env=env,
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        process = RelayProcess(name, popen, port, log_path, time.monotonic())
        self.processes.append(process)
        return process

    async def wait_publishing(self, process: RelayProcess, timeout_s: float = 60.0) -> None:
        """Until the process's published counter is above zero."""

        async def publishing() -> bool:
            if not process.alive:
                raise AssertionError(
                    f"{process.name} exited {process.popen.poll()}\n{process.tail()}"
                )
            return bool(await process.published())

        await wait_until(publishing, timeout_s, f"{process.name} to publish", 0.05)

    async def __aenter__(self) -> Fleet:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for process in self.processes:
            if process.alive:
                process.popen.kill()
            with contextlib.suppress(AssertionError):
                await process.wait_exit(10.0)


# ------------------------------------------------------------------ writers (Service A)


@dataclasses.dataclass(frozen=True, slots=True)
class Written:
    aggregate_id: str
    version: int
    seq: int


class UnknownOutcomeError(Exception):
    """The commit may or may not have happened (the connection broke during COMMIT)."""


@dataclasses.dataclass
class WriterStats:
    transactions: int = 0
    rollbacks: int = 0  # on purpose
    failed_before_commit: int = 0  # broken by an error: rolled back for sure
    unknown_commits: int = 0  # connection lost during COMMIT, resolved afterwards
    unknown_committed: int = 0  # ... of which had committed
    reconnects: int = 0


class Writers:
    """Concurrent Service A writers sharing one record of what committed and what did not."""

    def __init__(
        self,
        mariadb: MariaDB,
        database: str,
        aggregates: Sequence[str],
        *,
        rollback_ratio: float = 0.1,
        pause_s: float = 0.0,
        reconnect_deadline_s: float = 120.0,
    ) -> None:
        self._mariadb = mariadb
        self._database = database
        self._aggregates = list(aggregates)
        self._rollback_ratio = rollback_ratio
        self._pause_s = pause_s
        self._reconnect_deadline_s = reconnect_deadline_s
        self._outbox = writer.OutboxWriter(TABLE)
        self.committed: dict[str, Written] = {}
        self.rolled_back: set[str] = set()
        self.stats = WriterStats()
        self.errors: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._target: int | None = None

    @property
    def committed_count(self) -> int:
        return len(self.committed)

    def start(self, tasks: int, target_events: int | None = None) -> None:
        """Start ``tasks`` writers; they stop by themselves once ``target_events`` committed."""
        self._target = target_events
        for i in range(tasks):
            self._tasks.append(asyncio.create_task(self._run(i), name=f"writer-{i}"))

    async def stop(self) -> None:
        """Stop after the transactions in flight and wait (raises what a writer died of)."""
        self._stop.set()
        await self.join()

    async def join(self) -> None:
        await asyncio.gather(*self._tasks)

    @property
    def done(self) -> bool:
        return all(t.done() for t in self._tasks)

    def _finished(self) -> bool:
        return self._stop.is_set() or (
            self._target is not None and self.committed_count >= self._target
        )

    async def _run(self, index: int) -> None:
        rng = random.Random(f"{self._database}-{index}")
        conn: Any = None
        unresolved: list[writer.Event] = []
        try:
            while True:
                try:
                    if conn is None:
                        conn = await self._connect()
                    if unresolved:
                        await self._resolve(conn, unresolved)
                        unresolved = []
                    if self._finished():
                        return
                    await self._transaction(conn, rng)
                except UnknownOutcomeError as exc:
                    unresolved = list(exc.args[0])
                    self.stats.unknown_commits += 1
                    _drop(conn)
                    conn = None
                except DB_ERRORS as exc:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    _drop(conn)
                    conn = None
                    await asyncio.sleep(0.05)
                if self._pause_s:
                    await asyncio.sleep(self._pause_s * rng.uniform(0.5, 1.5))
        finally:
            _drop(conn)

    async def _connect(self) -> Any:
        """Connect, retrying while the server is away (bounded by the reconnect deadline)."""
        deadline = time.monotonic() + self._reconnect_deadline_s
        delay = 0.05
        while True:
            try:
                conn = await connect(self._mariadb, self._database)
            except DB_ERRORS:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                self.stats.reconnects += 1
            else:
                return conn

    async def _resolve(self, conn: Any, events: Sequence[writer.Event]) -> None:
        """Did the transaction with these events commit? All or none of its ids exist."""
        ids = [e.message_id for e in events]
        async with conn.cursor() as cur:
            await cur.execute(
                f"SELECT COUNT(*) FROM {TABLE} WHERE message_id IN ({_marks(ids)})", ids
            )
            (found,) = await cur.fetchone()
        await conn.rollback()  # end the read's snapshot
        assert found in (0, len(ids)), f"a transaction committed {found} of its {len(ids)} events"
        if found:
            self._record_commit(events)
            self.stats.unknown_committed += 1
        else:
            self.rolled_back.update(ids)

    def _record_commit(self, events: Iterable[writer.Event]) -> None:
        for event in events:
            after = event.after or {}
            self.committed[event.message_id] = Written(
                event.aggregate_id, int(after["version"]), int(after["seq"])
            )

    async def _transaction(self, conn: Any, rng: random.Random) -> None:
        aggregate = rng.choice(self._aggregates)
        events: list[writer.Event] = []
        try:
            async with conn.cursor() as cur:
                await cur.execute(
                    "UPDATE accounts SET version = version + 1 WHERE id = %s", (aggregate,)
                )
                await cur.execute("SELECT version FROM accounts WHERE id = %s", (aggregate,))
                (version,) = await cur.fetchone()
                amount = rng.randint(-1000, 1000)
                await cur.execute(
                    "INSERT INTO ledger (account_id, version, amount) VALUES (%s, %s, %s)",
                    (aggregate, version, amount),
                )
                events = [
                    writer.Event(
                        aggregate_type=AGGREGATE_TYPE,
                        aggregate_id=aggregate,
                        event_type="AccountChanged",
                        after={"version": version, "seq": seq, "amount": amount},
                        source_table="accounts",
                    )
                    for seq in range(rng.randint(1, 3))
                ]
                await self._outbox.add(cur, *events)
            if rng.random() < self._rollback_ratio:
                await conn.rollback()
                self.rolled_back.update(e.message_id for e in events)
                self.stats.rollbacks += 1
                return
        except DB_ERRORS:
            # broken before COMMIT: the server rolls the transaction back
            self.rolled_back.update(e.message_id for e in events)
            self.stats.failed_before_commit += 1
            raise
        try:
            await conn.commit()
        except DB_ERRORS as exc:
            raise UnknownOutcomeError(events) from exc
        self._record_commit(events)
        self.stats.transactions += 1


def _marks(values: Sequence[object]) -> str:
    return ", ".join(["%s"] * len(values))


def _drop(conn: Any) -> None:
    if conn is not None:
        conn.close()


# ------------------------------------------------------------------ consumer


class Consumer:
    """Reads all partitions of ``topic`` from the beginning; records ``message_id`` headers."""

    def __init__(self, kafka: Kafka, topic: str, partitions: int = PARTITIONS) -> None:
        self._kafka = kafka
        self._topic = topic
        self._tps = [TopicPartition(topic, p) for p in range(partitions)]
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self.arrivals: list[str] = []
        self.placement: dict[str, tuple[int, int]] = {}  # first (partition, offset) of each id
        self.key_partitions: dict[bytes, set[int]] = defaultdict(set)
        self.counts: Counter[str] = Counter()
        self.next_offsets: dict[int, int] = {}
        self.errors: list[str] = []

    async def __aenter__(self) -> Consumer:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._kafka.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        self._consumer = consumer
        consumer.assign(self._tps)
        await consumer.seek_to_beginning(*self._tps)
        self._task = asyncio.create_task(self._run(consumer), name="consumer")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()

    async def _run(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            try:
                batches = await consumer.getmany(*self._tps, timeout_ms=200, max_records=5000)
            except KafkaError as exc:  # the broker may be away on purpose (fault tests)
                self.errors.append(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.2)
                continue
            for tp, records in batches.items():
                for record in records:
                    headers = dict(record.headers or ())
                    message_id = bytes(headers.get("message_id", b"")).decode()
                    self.arrivals.append(message_id)
                    self.placement.setdefault(message_id, (tp.partition, record.offset))
                    self.key_partitions[record.key or b""].add(tp.partition)
                    self.counts[message_id] += 1
                    self.next_offsets[tp.partition] = record.offset + 1

    def missing(self, ids: Iterable[str]) -> list[str]:
        return [i for i in ids if i not in self.counts]

    async def wait_for(self, ids: Iterable[str], timeout_s: float) -> float:
        """Until every id arrived; returns the seconds it took."""
        wanted = set(ids)
        started = time.monotonic()
        deadline = started + timeout_s
        while True:
            wanted = {i for i in wanted if i not in self.counts}
            if not wanted:
                return time.monotonic() - started
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{len(wanted)} committed message ids not delivered after {timeout_s:.0f} s, "
                    f"e.g. {sorted(wanted)[:5]}"
                )
            await asyncio.sleep(0.1)

    async def wait_caught_up(self, timeout_s: float = 60.0) -> None:
        """Until the consumer has read up to the current end of every partition."""
        assert self._consumer is not None
        ends = await self._consumer.end_offsets(self._tps)

        def caught_up() -> bool:
            return all(self.next_offsets.get(tp.partition, 0) >= end for tp, end in ends.items())

        await wait_until(caught_up, timeout_s, "the consumer to reach the end offsets")


# ------------------------------------------------------------------ checks


@dataclasses.dataclass
class Verdict:
    committed: int
    received: int  # messages, duplicates included
    distinct: int
    duplicates: int  # messages beyond the first of their id
    max_copies: int
    lost: list[str]
    leaked: list[str]  # rolled back, yet delivered
    strangers: list[str]  # delivered, yet neither committed nor rolled back by our writers
    order_violations: list[str]
    split_keys: list[str]  # aggregates whose records landed on more than one partition

    def summary(self) -> str:
        return (
            f"committed={self.committed} received={self.received} distinct={self.distinct} "
            f"duplicates={self.duplicates} max_copies={self.max_copies} lost={len(self.lost)} "
            f"leaked={len(self.leaked)} strangers={len(self.strangers)} "
            f"order_violations={len(self.order_violations)} split_keys={len(self.split_keys)}"
        )

    def assert_clean(self) -> None:
        assert not self.lost, f"lost {len(self.lost)}: {self.lost[:5]}; {self.summary()}"
        assert not self.leaked, f"rolled back yet delivered: {self.leaked[:5]}; {self.summary()}"
        assert not self.strangers, f"unknown ids delivered: {self.strangers[:5]}"
        assert not self.split_keys, f"keys on several partitions: {self.split_keys[:5]}"
        assert not self.order_violations, (
            f"per-aggregate order broken: {self.order_violations[:5]}; {self.summary()}"
        )


async def drain_stop_and_verify(
    mariadb: MariaDB,
    database: str,
    writers: Writers,
    consumer: Consumer,
    relay: RelayProcess,
) -> Verdict:
    """After the writers stopped: everything delivered and published, the relay (alive all the
    while) stops on SIGTERM with exit 0 and logged no error; returns the delivery verdict."""
    check_versions(writers)
    await consumer.wait_for(writers.committed, timeout_s=120)
    await wait_drained(mariadb, database, timeout_s=60)
    await check_outbox(mariadb, database, writers)
    await consumer.wait_caught_up()
    assert relay.alive, relay.tail()
    assert await relay.terminate() == 0, relay.tail()
    assert not relay_errors(relay), relay.tail()
    return verify(writers, consumer)


def verify(writers: Writers, consumer: Consumer) -> Verdict:
    committed = writers.committed
    first_seen: set[str] = set()
    last: dict[str, tuple[int, int, str]] = {}
    violations: list[str] = []
    for message_id in consumer.arrivals:
        if message_id in first_seen:
            continue
        first_seen.add(message_id)
        written = committed.get(message_id)
        if written is None:
            continue
        position = (written.version, written.seq)
        previous = last.get(written.aggregate_id)
        if previous is not None and position <= previous[:2]:
            where = consumer.placement[message_id]
            violations.append(
                f"{written.aggregate_id}: {position} {message_id} at {where} after "
                f"{previous[:2]} {previous[2]} at {consumer.placement[previous[2]]}"
            )
        last[written.aggregate_id] = (*position, message_id)
    counts = consumer.counts
    return Verdict(
        committed=len(committed),
        received=len(consumer.arrivals),
        distinct=len(counts),
        duplicates=sum(c - 1 for c in counts.values()),
        max_copies=max(counts.values(), default=0),
        lost=[i for i in committed if i not in counts],
        leaked=sorted(i for i in writers.rolled_back if i in counts),
        strangers=sorted(i for i in counts if i not in committed and i not in writers.rolled_back),
        order_violations=violations,
        split_keys=sorted(k.decode() for k, p in consumer.key_partitions.items() if len(p) > 1),
    )


def check_versions(writers: Writers) -> None:
    """Writer sanity: per aggregate, committed versions are 1..n and seqs 0..k-1 per version."""
    by_aggregate: dict[str, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
    for written in writers.committed.values():
        by_aggregate[written.aggregate_id][written.version].add(written.seq)
    for aggregate, versions in by_aggregate.items():
        assert sorted(versions) == list(range(1, len(versions) + 1)), f"{aggregate}: gaps"
        for version, seqs in versions.items():
            assert seqs == set(range(len(seqs))), f"{aggregate} v{version}: seqs {sorted(seqs)}"


async def check_outbox(mariadb: MariaDB, database: str, writers: Writers) -> None:
    """Every committed row is published; no row of a rolled-back transaction exists."""
    statuses = await outbox_statuses(mariadb, database)
    not_published = Counter(s for i, s in statuses.items() if s != "published")
    assert not not_published, f"rows not published: {dict(not_published)}"
    assert set(statuses) == set(writers.committed), (
        f"outbox has {len(statuses)} rows, writers committed {len(writers.committed)}"
    )


async def describe_rows(mariadb: MariaDB, database: str, message_ids: Iterable[str]) -> str:
    """Diagnostics: the outbox rows of these message ids, one line each."""
    ids = list(message_ids)
    if not ids:
        return ""
    conn = await connect(mariadb, database, autocommit=True)
    try:
        async with conn.cursor() as cur:
            await cur.execute(
                f"SELECT id, message_id, aggregate_id, shard, status, attempts, published_at, "
                f"after_state FROM {TABLE} WHERE message_id IN ({_marks(ids)}) ORDER BY id",
                ids,
            )
            rows: Sequence[tuple[Any, ...]] = await cur.fetchall()
    finally:
        conn.close()
    return "\n".join(" ".join(str(c) for c in row) for row in rows)


def relay_errors(process: RelayProcess) -> list[dict[str, Any]]:
    """Log entries that mean the daemon itself broke (a loop died, a traceback)."""
    return [
        e
        for e in process.logs()
        if e.get("event") == "task_died" or "Traceback" in str(e.get("raw", ""))
    ]
