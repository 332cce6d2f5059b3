"""The 3-node Kafka cluster of deploy/local/cluster.sh, and the scaffolding of the fault matrix.

:class:`Cluster` drives ``cluster.sh`` (up, down, ``kill -9`` and restart of a node, the active
controller) for one state dir and port block, and reads partition leaders and ISRs.

:func:`matrix` sets up one fault case the same way every time: the outbox and domain tables in
a fresh database, a fresh topic with replication factor 3 (6 partitions) on the cluster,
Service B reading it (directly, never through a proxy), two ``relay run`` processes of two
workers each (per-process settings: a proxied broker list, a proxied database...), and writers
at a steady rate (in the test process: another process than the relays). A monitor scrapes the
first relay's ``/metrics`` every 0.1 s. Then::

    async with m.fault("broker killed") as fault:
        ...  # inject, and end the fault
    record = await m.recovered(fault)  # recovery time, duplicates of this fault (bounded)
    ...
    await m.finish("title")  # drained, delivered, verdict: nothing lost or leaked, order kept

**Time to recover**: from the end of the fault until the relay's backlog gauge
``outbox_relay_backlog_oldest_age_seconds`` is under 1 s, read from a sample taken after the
fault (sampled every ``SAMPLE_INTERVAL_S``; the figure is good to about that much).
**Duplicates of a fault**: copies beyond the first that Service B got between the start of the
fault and the moment every row written before recovery is marked and read back; at most
processes x workers x batch size.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import math
import os
import random
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiokafka.admin
import aiokafka.errors
import harness
from integration import helpers
from servers import REPO_ROOT, Kafka, MariaDB, unique_name

from relay.tools import loadgen, polling, processes, stats

CLUSTER_SH = REPO_ROOT / "deploy" / "local" / "cluster.sh"
NODES = (1, 2, 3)
PARTITIONS = 6
REPLICATION = 3

# The relays of every case: 2 processes (unless a case starts more) x 2 workers x batches of
# 100 rows at most.
WORKERS = 2
BATCH_SIZE = 100
SAMPLE_INTERVAL_S = 0.2
RECOVERED_AGE_S = 1.0
MONITOR_EVERY_S = 0.1
RELAY_SETTINGS: dict[str, str | int | float] = {
    "worker__count": WORKERS,
    "worker__batch_size": BATCH_SIZE,
    "worker__poll_interval_s": 0.05,
    "worker__publish_timeout_s": 10.0,
    "worker__backoff_initial_s": 0.05,
    "worker__backoff_max_s": 1.0,
    "kafka__request_timeout_s": 5.0,
    "backlog__sample_interval_s": SAMPLE_INTERVAL_S,
    "cleaner__enabled": "false",
}

AGE_METRIC = "outbox_relay_backlog_oldest_age_seconds"
BACKLOG_ERRORS = 'outbox_relay_loop_errors_total{loop="backlog"}'

RESULTS = REPO_ROOT / "benchmarks" / "results" / "fault-matrix.txt"
RECORD_ENV = "OUTBOX_FAULT_RECORD"


# ------------------------------------------------------------------ the cluster


def free_port_block(size: int = 40) -> int:
    """A base port B (a multiple of 100 in 20000-29900, below the ephemeral range) such that
    B+1..B+``size`` are free right now."""
    bases = list(range(20000, 30000, 100))
    random.shuffle(bases)
    for base in bases:
        if all(_bindable(base + i) for i in range(1, size)):
            return base
    raise RuntimeError("no free block of ports for the cluster")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclasses.dataclass(frozen=True)
class Cluster:
    """``cluster.sh`` with state under ``local_dir/cluster`` and ports from ``base``."""

    local_dir: Path
    base: int = 29300

    def client_port(self, node: int) -> int:
        return self.base + node

    def proxied_port(self, node: int) -> int:
        """The listener a proxy forwards to (advertised at :meth:`proxy_port`)."""
        return self.base + 20 + node

    def proxy_port(self, node: int) -> int:
        """Where the proxy of ``node`` must listen: the PROXIED listener's advertised port."""
        return self.base + 30 + node

    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{self.client_port(n)}" for n in NODES)

    @property
    def kafka(self) -> Kafka:
        return Kafka(self.bootstrap)

    def proxy_routes(self) -> list[tuple[str, str]]:
        """``(listen, upstream)`` of the three broker proxies."""
        return [
            (f"127.0.0.1:{self.proxy_port(n)}", f"127.0.0.1:{self.proxied_port(n)}") for n in NODES
        ]

    def sh(self, *args: str, timeout_s: float = 300.0) -> subprocess.CompletedProcess[str]:
        """Run ``cluster.sh args...`` (not checked)."""
        env = os.environ | {
            "OUTBOX_LOCAL_DIR": str(self.local_dir),
            "OUTBOX_CLUSTER_PORT_BASE": str(self.base),
        }
        return subprocess.run(  # noqa: S603 - fixed argv, our own script
            ["bash", str(CLUSTER_SH), *args],  # noqa: S607
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=env,
            check=False,
        )

    async def run(self, *args: str, timeout_s: float = 300.0) -> str:
        """``cluster.sh args...``; RuntimeError with its output when it fails."""
        proc = await asyncio.to_thread(self.sh, *args, timeout_s=timeout_s)
        output = f"{proc.stdout}{proc.stderr}"
        if proc.returncode != 0:
            raise RuntimeError(f"cluster.sh {' '.join(args)} exited {proc.returncode}:\n{output}")
        return proc.stdout

    async def kill(self, node: int) -> None:
        """``kill -9`` of the node (reaped)."""
        await self.run("kill", str(node))

    async def start(self, node: int) -> float:
        """Start a killed node; returns once it is back in every ISR, with the seconds it took."""
        started = time.monotonic()
        await self.run("start", str(node))
        return time.monotonic() - started

    async def quorum_leader(self) -> int | None:
        """The active controller; None while the quorum has none (an election)."""
        proc = await asyncio.to_thread(self.sh, "leader")
        if proc.returncode != 0:
            if "no quorum leader" in proc.stderr:
                return None
            raise RuntimeError(f"cluster.sh leader exited {proc.returncode}: {proc.stderr}")
        return int(proc.stdout.strip())

    async def partitions(self, topic: str) -> list[dict[str, Any]]:
        async with self._admin() as admin:
            described = await admin.describe_topics([topic])
        return list(described[0]["partitions"])

    async def leaders(self, topic: str) -> dict[int, int]:
        """Partition -> leader node (-1 while it has none)."""
        return {int(p["partition"]): int(p["leader"]) for p in await self.partitions(topic)}

    @contextlib.asynccontextmanager
    async def _admin(self) -> AsyncIterator[Any]:
        admin = aiokafka.admin.AIOKafkaAdminClient(
            bootstrap_servers=self.bootstrap, request_timeout_ms=10_000
        )
        await admin.start()
        try:
            yield admin
        finally:
            await admin.close()

    @contextlib.asynccontextmanager
    async def topic(self, partitions: int = PARTITIONS) -> AsyncIterator[str]:
        """A fresh topic ``e2e_<hex>.account`` (replication factor 3, min ISR 2 from the
        brokers), every partition led and fully in sync; deleted afterwards."""
        name = f"{unique_name('e2e_')}.{harness.AGGREGATE_TYPE}"
        async with self._admin() as admin:
            response = await admin.create_topics(
                [aiokafka.admin.NewTopic(name, partitions, REPLICATION)]
            )
            for entry in response.topic_errors:
                if entry[1]:
                    raise aiokafka.errors.for_code(entry[1])(f"creating {name}: {entry}")

        async def in_sync() -> bool:
            with contextlib.suppress(KeyError, IndexError, aiokafka.errors.KafkaError):
                parts = await self.partitions(name)
                return len(parts) == partitions and all(
                    p["leader"] >= 0 and len(p["isr"]) == REPLICATION for p in parts
                )
            return False

        await polling.wait_until(in_sync, f"topic {name} fully in sync", 30)
        try:
            yield name
        finally:
            with contextlib.suppress(aiokafka.errors.KafkaError, OSError):
                async with self._admin() as admin:
                    await admin.delete_topics([name])


# ------------------------------------------------------------------ one fault case


@dataclasses.dataclass
class Fault:
    name: str
    started: float
    duplicates_before: int
    count: int = 1  # faults in the block (resets every few seconds: one per reset)
    ended: float = math.nan
    figures: dict[str, object] = dataclasses.field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return self.ended - self.started


@dataclasses.dataclass(frozen=True)
class Record:
    case: str
    fault: str
    fault_s: float
    recovery_s: float
    peak_age_s: float
    duplicates: int
    duplicates_bound: int
    figures: Mapping[str, object]

    def line(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in self.figures.items())
        return (
            f"{self.case}: {self.fault}: fault_s={self.fault_s:.1f}"
            f" recovery_s={self.recovery_s:.1f} peak_backlog_age_s={self.peak_age_s:.1f}"
            f" duplicates={self.duplicates} (bound {self.duplicates_bound}){extra}"
        )


@dataclasses.dataclass(frozen=True)
class Sample:
    at: float
    age_s: float
    backlog_errors: float


@dataclasses.dataclass(frozen=True)
class Shape:
    aggregates: int = 200
    writer_tasks: int = 4
    rate: float = 300.0  # committed events per second, open loop
    warmup_events: int = 600  # committed before the case goes on


SHAPE = Shape()


@dataclasses.dataclass(eq=False)
class Matrix:
    """One case: its scenario, topic, Service B, relays, writers, monitor and results."""

    case: str
    scenario: harness.Scenario
    stage: harness.Stage
    relays: list[processes.RelayProcess]
    writers: loadgen.Writers
    samples: list[Sample] = dataclasses.field(default_factory=list, init=False)
    records: list[Record] = dataclasses.field(default_factory=list, init=False)
    finished: bool = dataclasses.field(default=False, init=False)
    started: float = dataclasses.field(default_factory=time.monotonic, init=False)
    _monitor: asyncio.Task[None] | None = dataclasses.field(default=None, init=False)

    @property
    def observer(self) -> processes.RelayProcess:
        """The relay whose ``/metrics`` the monitor reads: the first one alive (a relay may be
        killed and replaced)."""
        return next((r for r in self.relays if r.alive), self.relays[0])

    @property
    def duplicates_per_fault(self) -> int:
        """The bound of one fault's duplicates: processes x workers x batch size."""
        return len(self.relays) * WORKERS * BATCH_SIZE

    # -- monitor ---------------------------------------------------------------------------

    def start_monitor(self) -> None:
        self._monitor = asyncio.create_task(self._watch(), name="matrix-monitor")

    async def stop_monitor(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)

    async def _watch(self) -> None:
        while True:
            with contextlib.suppress(OSError, TimeoutError, RuntimeError, ValueError):
                text = await self.observer.metrics()
                age = stats.parse_counter(text, AGE_METRIC)
                errors = labelled(text, BACKLOG_ERRORS)
                self.samples.append(Sample(time.monotonic(), age, errors))
            await asyncio.sleep(MONITOR_EVERY_S)

    def peak_age_s(self, since: float) -> float:
        return max((s.age_s for s in self.samples if s.at >= since), default=math.nan)

    def _recovered_at(self, ended: float) -> float | None:
        """The first scrape, taken at least two sample intervals after ``ended``, showing an age
        under 1 s while the sampler had no failure for two intervals: its time, or None."""
        window = 2 * SAMPLE_INTERVAL_S
        for sample in self.samples:
            if sample.at < ended + window or not sample.age_s < RECOVERED_AGE_S:
                continue
            recent = [s for s in self.samples if sample.at - window <= s.at <= sample.at]
            if len({s.backlog_errors for s in recent}) == 1:
                return sample.at
        return None

    # -- faults ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def fault(self, name: str, count: int = 1) -> AsyncIterator[Fault]:
        """The block is the fault (``count`` faults in a row: the duplicates' bound is that
        many times the bound of one): it starts when the block is entered and ends when it
        exits."""
        fault = Fault(name, time.monotonic(), self.scenario.tracker.duplicates, count)
        try:
            yield fault
        finally:
            fault.ended = time.monotonic()

    async def recovered(self, fault: Fault, timeout_s: float = 120.0) -> Record:
        """Until the backlog is younger than 1 s again, then until everything written so far
        is marked and read back; checks this fault's duplicates and records the figures."""

        def recovered() -> bool:
            self._check_relays()
            return self._recovered_at(fault.ended) is not None

        try:
            await polling.wait_until(
                recovered, f"recovery from {fault.name}", timeout_s, MONITOR_EVERY_S
            )
        except TimeoutError:
            tail = [(round(s.at - fault.ended, 1), s.age_s) for s in self.samples[-5:]]
            raise AssertionError(
                f"{self.case}: no recovery {timeout_s:g} s after {fault.name}: backlog age"
                f" samples (s after the fault, age) {tail}; {self._logs()}"
            ) from None
        recovered_at = self._recovered_at(fault.ended)
        assert recovered_at is not None
        await self.settle(timeout_s)
        record = Record(
            self.case,
            fault.name,
            fault.duration_s,
            recovered_at - fault.ended,
            self.peak_age_s(fault.started),
            self.scenario.tracker.duplicates - fault.duplicates_before,
            fault.count * self.duplicates_per_fault,
            fault.figures,
        )
        self.records.append(record)
        print(f"\n{record.line()}")  # noqa: T201 - the figures are the report
        assert record.duplicates <= record.duplicates_bound, record.line()
        return record

    async def settle(self, timeout_s: float) -> None:
        """Until every event committed so far is delivered, every row written so far is out of
        ``new`` (so nothing more of it can be republished) and Service B has read to the end:
        duplicates counted afterwards belong to the next fault."""
        now = time.monotonic()
        rows = await helpers.sql(self.scenario.settings, f"SELECT MAX(id) FROM {harness.TABLE}")
        last_id = int(rows[0][0] or 0)
        await self.stage.consumer.wait_delivered(timeout_s, committed_before=now)

        async def marked() -> bool:
            self._check_relays()
            left = await helpers.sql(
                self.scenario.settings,
                f"SELECT COUNT(*) FROM {harness.TABLE} WHERE status = 'new' AND id <= %s",
                [last_id],
            )
            return int(left[0][0]) == 0

        await polling.wait_until(marked, "rows written before recovery to be marked", timeout_s)
        await self.stage.consumer.wait_caught_up(timeout_s)

    def _check_relays(self) -> None:
        """Recovery without an operator: no relay process died."""
        for relay in self.relays:
            if not relay.alive:
                raise AssertionError(f"{relay.name} exited {relay.popen.poll()}\n{relay.tail()}")

    def _logs(self) -> str:
        return "; ".join(r.summary() for r in self.relays)

    # -- the end ---------------------------------------------------------------------------

    async def finish(
        self, title: str, lines: Sequence[str] | None = None, *, verdict: bool = True
    ) -> stats.Summary:
        """Stop the writers; everything delivered and published; every relay (alive all the
        while, or since it replaced a killed one) stops with exit 0 and logged no error; the
        verdict (nothing lost or leaked, order of first deliveries kept) is asserted unless
        ``verdict`` is false (the caller asserts it after reporting more); the case's records
        (or ``lines`` instead, e.g. one per fault kind) are written out."""
        s, service_b = self.scenario, self.stage.consumer
        await self.writers.stop()
        self.finished = True
        await harness.verify_delivered(s, service_b, self._logs)
        self._check_relays()
        for relay in self.relays:
            assert await relay.terminate() == 0, relay.tail()
            assert not harness.relay_errors(relay), relay.tail()
        summary = s.tracker.summary()
        faults = "; ".join(
            f"{r.fault}: recovery_s={r.recovery_s:.1f} duplicates={r.duplicates}"
            for r in self.records
        )
        case_s = round(time.monotonic() - self.started)
        if verdict:
            await harness.verdict(
                s, f"{self.case} [{title}]", summary, case_s=case_s, writers=self.writers.stats
            )
        body = [r.line() for r in self.records] if lines is None else list(lines)
        write_results(self.case, f"{title}, {case_s} s", summary, body)
        if lines is None:
            print(f"{self.case}: {faults}")  # noqa: T201 - the report
        return summary


def labelled(metrics_text: str, series: str) -> float:
    """The value of one labelled series (``name{label="v"}``); 0 when absent."""
    for line in metrics_text.splitlines():
        if line.startswith(series + " "):
            return float(line.rpartition(" ")[2])
    return 0.0


@contextlib.asynccontextmanager
async def matrix(
    case: str,
    mariadb: MariaDB,
    cluster: Cluster,
    database: str,
    workdir: Path,
    *,
    per_process: Sequence[Mapping[str, str | int | float]] = ({}, {}),
    settings: Mapping[str, str | int | float] | None = None,
    shape: Shape = SHAPE,
) -> AsyncIterator[Matrix]:
    """A case under steady load: see the module's docstring. ``per_process``: one relay
    process per entry, with these settings over :data:`RELAY_SETTINGS` and ``settings``."""
    await cluster.run("up")  # every node up and in every ISR (a failed case may have left one down)
    s = await harness.scenario(mariadb, cluster.kafka, database, shape.aggregates)
    async with (
        cluster.topic() as topic,
        s.consumer(topic, PARTITIONS) as service_b,
        harness.Fleet(s, topic, workdir, **(RELAY_SETTINGS | dict(settings or {}))) as fleet,
    ):
        relays = [fleet.start(**dict(extra)) for extra in per_process]
        writers = s.writers(rate=shape.rate)
        await writers.start(shape.writer_tasks)
        m = Matrix(case, s, harness.Stage(topic, service_b, fleet), relays, writers)
        try:
            for relay in relays:
                await fleet.wait_publishing(relay)
            await polling.wait_until(
                lambda: writers.committed_count >= shape.warmup_events,
                f"writers to commit {shape.warmup_events} events",
                60,
            )
            m.start_monitor()
            yield m
        finally:
            await m.stop_monitor()
            if not m.finished:
                with contextlib.suppress(Exception):
                    await writers.stop()


# ------------------------------------------------------------------ the record


def write_results(case: str, title: str, summary: stats.Summary, body: Sequence[str]) -> None:
    """With ``OUTBOX_FAULT_RECORD=1``: this case's lines replace its previous ones in
    ``benchmarks/results/fault-matrix.txt`` (the latest result of each case is kept)."""
    if os.environ.get(RECORD_ENV) != "1":
        return
    old = RESULTS.read_text().splitlines() if RESULTS.exists() else []
    kept = [
        line
        for line in old
        if line and not line.startswith("#") and not line.startswith(f"{case}:")
    ]
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],  # noqa: S607 - read-only, on PATH
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=False,
    ).stdout.strip()
    lines = [
        f"{case}: [{title}] {stamp} at {commit or '?'} (+ working tree) {summary.describe()}",
        *(f"{case}: {line}" if not line.startswith(f"{case}:") else line for line in body),
    ]
    header = [
        "# Fault matrix (issue 8): the latest result of each case, rewritten by",
        f"#   {RECORD_ENV}=1 .venv/bin/pytest tests/fault -k 'matrix or kill9 or soak' -s",
        "# (bash deploy/local/run-tests.sh --slow does it too).",
        "# 3-node KRaft cluster (RF 3, min ISR 2); 2 relay processes (3 in f-relay-kill9) x 2",
        "# workers, batch 100; writers at 300 events/s (500 in f-chaos-soak).",
        "# recovery_s: end of the fault until the relay's gauge",
        "# outbox_relay_backlog_oldest_age_seconds < 1 s (sampled every 0.2 s);",
        "# duplicates: copies beyond the first per fault (bound: processes x workers x batch).",
    ]
    body = sorted([*kept, *lines], key=lambda line: line.split(":", 1)[0])
    RESULTS.write_text("\n".join([*header, *body]) + "\n")
