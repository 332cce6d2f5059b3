"""Fault drivers of the fault matrix, the ``kill -9`` test and the chaos soak, one per fault.

Each driver injects one fault into a running :class:`cluster.Matrix` case (inside
``m.fault(...)``, so the fault's start and end are recorded), then waits for the recovery
(``m.recovered``: backlog younger than 1 s, everything written so far marked and read back, the
fault's duplicates within their bound) and returns what it recorded:

* :func:`leader_kill_and_restart` (:func:`kill_and_restart`): a broker node dies with
  ``kill -9`` and, once the cluster carried on without it, comes back: two records;
* :func:`kafka_black_hole`, :func:`kafka_resets`, :func:`kafka_latency`: relay -> Kafka through
  the brokers' proxies (tests/proxies.py);
* :func:`database_black_hole`: relay -> MariaDB through one relay's proxy;
* :func:`mariadb_kill`: ``kill -9`` of a private MariaDB (never the shared one), restarted;
* :func:`relay_kill`: ``kill -9`` of one relay process with a batch in flight (checked, see
  :func:`kill_mid_batch`), and the restart a supervisor would do.

:func:`kinds_table` turns records tagged with their kind into one row per kind (count, recovery
p50/max, duplicates).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import random
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence

import cluster
import harness
import private_mariadb
import proxies
from integration import helpers
from servers import MariaDB

from relay.tools import polling, processes, stats

# -- relay processes ------------------------------------------------------------------------------

CLAIMED = "outbox_relay_batch_size_rows_count"  # batches claimed with rows
MARKED = "outbox_relay_mark_duration_seconds_count"  # batches marked and committed
RETRIED = "outbox_relay_batch_retries_total{"  # cycles rolled back, by reason
CATCH_BATCH_S = 5.0  # how long to look for a batch in flight before killing anyway


async def wait_moving(process: processes.RelayProcess, timeout_s: float = 30.0) -> float:
    """Until the process's published counter rises between two scrapes (it works, now); the
    seconds it took. AssertionError at once if the process exits meanwhile."""
    started = time.monotonic()
    before = await process.published()

    async def moved() -> bool:
        if not process.alive:
            raise AssertionError(f"{process.name} exited {process.popen.poll()}\n{process.tail()}")
        now = await process.published()
        return now is not None and before is not None and now > before

    await polling.wait_until(moved, f"{process.name}'s published counter to move", timeout_s, 0.01)
    return time.monotonic() - started


def batches_in_flight(metrics_text: str) -> float:
    """Batches claimed minus batches ended (committed or rolled back) so far, give or take a
    constant: a cycle that fails before it claims anything (no connection, the producer not
    connected yet) counts as rolled back too, so the value drifts down after a fault. Compare it
    with its value at an idle moment (see :func:`kill_mid_batch`)."""
    claimed = stats.parse_counter(metrics_text, CLAIMED)
    marked = stats.parse_counter(metrics_text, MARKED)
    retried = sum(
        float(line.rpartition(" ")[2])
        for line in metrics_text.splitlines()
        if line.startswith(RETRIED)
    )
    return claimed - marked - retried


async def kill_mid_batch(victim: processes.RelayProcess, catch_s: float = CATCH_BATCH_S) -> bool:
    """SIGKILL the victim as soon as its ``/metrics`` show a batch in flight, or after
    ``catch_s`` regardless; returns whether a batch was in flight.

    In flight: :func:`batches_in_flight` above its lowest value seen since the first look (a
    batch was claimed after that look and has not ended: the value only rises by claims). The
    victim renders its metrics while its workers await Kafka or the database, so each scrape is
    a consistent look at that moment, and nothing is awaited between the look and the kill.
    (The database cannot tell instead: ``information_schema.INNODB_TRX`` is a cache refreshed
    at most every 0.1 s, longer than a whole batch.) The process is not reaped here."""
    deadline = time.monotonic() + catch_s
    lowest = math.inf
    while True:
        value = batches_in_flight(await victim.metrics())
        lowest = min(lowest, value)
        in_flight = value > lowest
        if in_flight or time.monotonic() >= deadline:
            victim.popen.kill()  # right after the look: nothing awaited in between
            return in_flight


async def relay_kill(
    m: cluster.Matrix,
    index: int,
    settings: Mapping[str, str | int | float],
    rng: random.Random,
    moment_s: tuple[float, float] = (0.0, 1.0),
) -> cluster.Record:
    """``kill -9`` of ``m.relays[index]`` at a random moment of its work (``moment_s`` after it
    was seen publishing), with a batch in flight if one shows within :data:`CATCH_BATCH_S`; a
    new process with ``settings`` takes its place at once (the supervisor's restart). The fault
    ends there; recovered once the others (and the newcomer) caught up, and the newcomer
    publishes. Figures: ``mid_batch`` (1 or 0), ``lived_s``, ``newcomer_publishing_s``."""
    fleet = m.stage.fleet
    victim = m.relays[index]
    await wait_moving(victim)
    await harness.asyncio_sleep(rng.uniform(*moment_s))  # a random moment of its work
    assert victim.alive, victim.tail()
    async with m.fault(f"relay process kill -9 ({victim.name})") as fault:
        fault.figures["mid_batch"] = int(await kill_mid_batch(victim))
        assert await victim.kill() == -9, victim.tail()  # reaps the process killed above
        fault.figures["lived_s"] = round(time.monotonic() - victim.started_at, 1)
        m.relays[index] = fleet.start(**dict(settings))
    record = await m.recovered(fault)
    await fleet.wait_publishing(m.relays[index])
    fault.figures["newcomer_publishing_s"] = round(time.monotonic() - fault.ended, 1)
    return record


# -- the brokers ------------------------------------------------------------------------------

BROKER_DOWN_S = 4.0  # a killed node stays dead this long after the backlog recovered without it


async def kill_and_restart(
    m: cluster.Matrix, c: cluster.Cluster, node: int, role: str, *, controller: bool = False
) -> list[cluster.Record]:
    """Kill ``node`` mid-stream, recover without it, restart it, recover again (two faults and
    records). ``controller``: the node is the active controller, and the two others must elect
    another."""
    await wait_moving(m.observer)
    records: list[cluster.Record] = []
    try:
        async with m.fault(f"{role} node {node} killed (kill -9)") as killed:
            await c.kill(node)
        if controller:
            elected: int | None = None

            async def new_leader() -> bool:
                nonlocal elected
                elected = await c.quorum_leader()
                return elected not in (None, node)

            await polling.wait_until(new_leader, "the quorum to elect another leader", 30, 0.2)
            killed.figures["new_controller"] = elected
            killed.figures["elected_after_s"] = round(time.monotonic() - killed.ended, 1)
        records.append(await m.recovered(killed))

        async def led_elsewhere() -> bool:
            leaders = await c.leaders(m.stage.topic)
            return all(leader not in (-1, node) for leader in leaders.values())

        await polling.wait_until(led_elsewhere, f"partitions led without node {node}", 30)
        await harness.asyncio_sleep(BROKER_DOWN_S)  # the node stays dead a while
    except BaseException:
        with contextlib.suppress(Exception):  # the next cases need the whole cluster
            await c.start(node)
        raise
    async with m.fault(f"node {node} restarted") as restarted:
        restarted.figures["back_in_isr_s"] = round(await c.start(node), 1)
    records.append(await m.recovered(restarted))
    return records


async def leader_kill_and_restart(m: cluster.Matrix, c: cluster.Cluster) -> list[cluster.Record]:
    """:func:`kill_and_restart` of the node leading most partitions of the case's topic."""
    leaders = collections.Counter((await c.leaders(m.stage.topic)).values())
    node, led = leaders.most_common(1)[0]
    return await kill_and_restart(m, c, node, f"leader of {led}/{cluster.PARTITIONS}")


# -- relay -> Kafka ---------------------------------------------------------------------------

KAFKA_BLACK_HOLE_S = 5.0
RESETS = 4
RESET_EVERY_S = 3.0
RESET_HELD_S = 0.5  # connections made while the reset toxic is on are reset too
LATENCY_MS = 500
LATENCY_S = 8.0


async def kafka_black_hole(m: cluster.Matrix, brokers: proxies.ProxyGroup) -> cluster.Record:
    name = f"relay->Kafka black hole {KAFKA_BLACK_HOLE_S:g} s"
    async with m.fault(name) as fault, brokers.black_hole():
        await harness.asyncio_sleep(KAFKA_BLACK_HOLE_S)  # the fault's length
    record = await m.recovered(fault)
    # the relays stayed on the proxies (metadata gave them the proxies' addresses)
    assert record.peak_age_s >= KAFKA_BLACK_HOLE_S - 1, record.line()
    return record


async def kafka_resets(m: cluster.Matrix, brokers: proxies.ProxyGroup) -> cluster.Record:
    name = f"relay->Kafka connections reset every {RESET_EVERY_S:g} s, {RESETS} times"
    async with m.fault(name, count=RESETS) as fault:
        for index in range(RESETS):
            if index:
                await harness.asyncio_sleep(RESET_EVERY_S - RESET_HELD_S)  # between resets
            async with brokers.resetting():
                await harness.asyncio_sleep(RESET_HELD_S)  # the reset toxic stays this long
    return await m.recovered(fault)


async def kafka_latency(m: cluster.Matrix, brokers: proxies.ProxyGroup) -> cluster.Record:
    name = f"relay->Kafka +{LATENCY_MS} ms latency for {LATENCY_S:g} s"
    async with m.fault(name) as fault, brokers.latency(LATENCY_MS):
        await harness.asyncio_sleep(LATENCY_S)  # the fault's length
    return await m.recovered(fault)


# -- relay -> MariaDB, and MariaDB itself ---------------------------------------------------------

DATABASE_BLACK_HOLE_S = 5.0
MARIADB_DOWN_S = 3.0  # a killed server stays dead this long


@contextlib.contextmanager
def database_user(mariadb: MariaDB, database: str) -> Iterator[tuple[str, str]]:
    """A user with the relay's privileges on ``database`` only; dropped afterwards. Relays
    connecting as their own user can be told apart in ``information_schema.PROCESSLIST``."""
    user, password = f"fm_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    helpers.server_sql(mariadb, "CREATE USER %s@'%%' IDENTIFIED BY %s", user, password)
    try:
        helpers.server_sql(
            mariadb, f"GRANT SELECT, INSERT, UPDATE, DELETE ON `{database}`.* TO %s@'%%'", user
        )
        yield user, password
    finally:
        helpers.server_sql(mariadb, "DROP USER IF EXISTS %s@'%%'", user)


async def database_black_hole(
    m: cluster.Matrix, proxy: proxies.Proxy, seconds: float = DATABASE_BLACK_HOLE_S
) -> cluster.Record:
    """The relays behind ``proxy`` hear nothing from MariaDB for ``seconds`` (their sessions
    stay open on the server, locks held, until the relay's call timeout or the server's idle
    transaction timeout ends them)."""
    async with m.fault(f"relay->MariaDB black hole {seconds:g} s") as fault, proxy.black_hole():
        await harness.asyncio_sleep(seconds)  # the fault's length
    return await m.recovered(fault)


async def mariadb_kill(
    m: cluster.Matrix, private: private_mariadb.PrivateMariaDB
) -> cluster.Record:
    """``kill -9`` of the (private) MariaDB mid-stream, down :data:`MARIADB_DOWN_S`, restarted
    (crash recovery); the writers resolve the commits whose answer the crash swallowed."""
    unknown_before = m.writers.stats.unknown_commits
    async with m.fault("MariaDB killed (kill -9), restarted") as fault:
        await private.kill()
        await harness.asyncio_sleep(MARIADB_DOWN_S)  # the outage itself
        fault.figures["restart_s"] = round(await private.up(), 1)
    fault.figures["writers_unknown_commits"] = m.writers.stats.unknown_commits - unknown_before
    return await m.recovered(fault)


# -- the figures per kind ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KindRow:
    kind: str
    count: int
    fault_s_max: float
    recovery_s_p50: float
    recovery_s_max: float
    duplicates: int
    duplicates_max: int  # of one fault
    duplicates_bound: int  # of one fault

    def record(self) -> str:
        """One line of key=value figures (for benchmarks/results/fault-matrix.txt)."""
        return (
            f"{self.kind}: count={self.count} fault_s_max={self.fault_s_max}"
            f" recovery_s_p50={self.recovery_s_p50} recovery_s_max={self.recovery_s_max}"
            f" duplicates={self.duplicates} duplicates_max={self.duplicates_max}"
            f" (bound {self.duplicates_bound})"
        )

    def line(self) -> str:
        return (
            f"{self.kind:<34} {self.count:>5} {self.fault_s_max:>11.1f} "
            f"{self.recovery_s_p50:>12.1f} {self.recovery_s_max:>12.1f} "
            f"{self.duplicates:>10} {self.duplicates_max:>8} {self.duplicates_bound:>6}"
        )


KINDS_HEADER = (
    f"{'fault kind':<34} {'count':>5} {'fault_s max':>11} {'recovery p50':>12} "
    f"{'recovery max':>12} {'duplicates':>10} {'dup max':>8} {'bound':>6}"
)


def kinds_table(tagged: Sequence[tuple[str, cluster.Record]]) -> list[KindRow]:
    """One row per fault kind, in order of first appearance: how many, the longest fault,
    recovery time p50 (nearest rank) and max, duplicates in all and of the worst fault."""
    by_kind: dict[str, list[cluster.Record]] = {}
    for kind, record in tagged:
        by_kind.setdefault(kind, []).append(record)
    rows: list[KindRow] = []
    for kind, records in by_kind.items():
        recoveries = sorted(r.recovery_s for r in records)
        rows.append(
            KindRow(
                kind,
                len(records),
                round(max(r.fault_s for r in records), 1),
                round(stats.percentile(recoveries, 50), 1),
                round(recoveries[-1], 1),
                sum(r.duplicates for r in records),
                max(r.duplicates for r in records),
                max(r.duplicates_bound for r in records),
            )
        )
    return rows


def describe_kinds(rows: Sequence[KindRow]) -> str:
    return "\n".join([KINDS_HEADER, *(row.line() for row in rows)])


def finite(value: float) -> float | None:
    """For JSON: None instead of NaN."""
    return None if math.isnan(value) else value
