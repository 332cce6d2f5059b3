"""Shared helpers of the end-to-end and fault suites.

The moving parts are those of ``relay bench`` (:mod:`relay.tools`), so the tests and the bench
exercise one implementation:

* Service A: :class:`relay.tools.loadgen.Writers`, concurrent writers that survive a database
  going away (a transaction broken before COMMIT is rolled back; one whose COMMIT got no answer
  is resolved by looking its message ids up);
* Service B: :class:`relay.tools.consumer.Consumer`, every partition from the beginning;
* the verdict: :class:`relay.tools.stats.Tracker` (lost, leaked, duplicates, per-aggregate order
  of first deliveries, keys on one partition);
* relay processes: :class:`relay.tools.processes.RelayProcess`.

Added here: a :class:`Scenario` (one test's settings, workload and tracker), a :class:`Fleet` of
``relay run`` processes with per-test settings and JSON logs, server restarts through
``deploy/local/servers.sh``, and the checks of the outbox table.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import os
import subprocess
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

from integration import helpers
from servers import REPO_ROOT, SERVERS_SH, Kafka, MariaDB, grant_relay, unique_name

from relay import config, db, queries
from relay.tools import consumer, loadgen, net, polling, processes, stats
from relay.tools import database as tool_database

AGGREGATE_TYPE = loadgen.AGGREGATE_TYPE
TABLE = helpers.TABLE
PARTITIONS = 6

# The shared implementations, re-exported for the suites.
wait_until = polling.wait_until
RelayProcess = processes.RelayProcess


# ------------------------------------------------------------------ scenario


@dataclasses.dataclass
class Scenario:
    """One test's database and broker, its workload and the record of what was sent and got."""

    mariadb: MariaDB
    kafka: Kafka
    database: str
    settings: config.Settings
    workload: loadgen.Workload
    tracker: stats.Tracker

    def writers(self, **options: Any) -> loadgen.Writers:
        """Service A (``pause_s``, ``reconnect_deadline_s``, ...: see ``loadgen.Writers``)."""
        return loadgen.Writers(self.settings, self.workload, self.tracker, **options)

    def consumer(self, topic: str, partitions: int = PARTITIONS) -> consumer.Consumer:
        """Service B: ``async with scenario.consumer(topic) as c:``."""
        return consumer.Consumer(self.settings, topic, partitions, self.workload, self.tracker)

    def message_ids(self, indexes: Iterable[int]) -> list[str]:
        return [self.workload.message_id(i) for i in indexes]


async def scenario(
    mariadb: MariaDB,
    kafka: Kafka,
    database: str,
    aggregates: int,
    *,
    rollback_ratio: float = 0.1,
    event_bytes: int = 0,
) -> Scenario:
    """The outbox schema (``relay migrate``'s) and the domain tables in ``database``, made by the
    administrator, whose settings Service A and the checks use; the relay user's grants."""
    settings = helpers.as_admin(helpers.make_settings(mariadb, database, kafka.bootstrap))
    await tool_database.prepare(settings, aggregates)
    grant_relay(mariadb, database, TABLE)
    workload = loadgen.Workload(
        aggregates=aggregates, event_bytes=event_bytes, rollback_ratio=rollback_ratio
    )
    return Scenario(mariadb, kafka, database, settings, workload, stats.Tracker())


def fresh_topic(
    kafka: Kafka, partitions: int = PARTITIONS
) -> contextlib.AbstractAsyncContextManager[str]:
    """A fresh topic ``e2e_<hex>.account`` (the relay's template is ``e2e_<hex>.{aggregate_type}``
    and every event has aggregate type ``account``); deleted afterwards."""
    return helpers.fresh_topic(kafka, partitions, name=f"{unique_name('e2e_')}.{AGGREGATE_TYPE}")


def topic_template(topic: str) -> str:
    prefix, _, aggregate_type = topic.rpartition(".")
    assert aggregate_type == AGGREGATE_TYPE
    return prefix + ".{aggregate_type}"


# ------------------------------------------------------------------ servers


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


# ------------------------------------------------------------------ relay processes


class Fleet:
    """Relay processes for one scenario and topic. Use as ``async with``: leftovers get SIGKILL."""

    def __init__(
        self, s: Scenario, topic: str, workdir: Path, **settings: str | int | float
    ) -> None:
        self._workdir = workdir
        self._base_env = processes.settings_env(
            db__host=s.mariadb.host,
            db__port=s.mariadb.port,
            db__user=s.mariadb.relay_user,  # the README's grants only (scenario() grants them)
            db__password=s.mariadb.relay_password,
            db__name=s.database,
            kafka__bootstrap_servers=s.kafka.bootstrap,
            outbox__table=TABLE,
            outbox__topic_template=topic_template(topic),
            http__host="127.0.0.1",
            log__format="json",
            **settings,
        )
        self._base_env["RELAY_SECRETS_DIR"] = str(workdir / "no-secrets")
        self.processes: list[processes.RelayProcess] = []

    def start(self, **settings: str | int | float) -> processes.RelayProcess:
        """Start one ``relay run``; ``settings`` override per process (``worker__count=2``)."""
        name = f"relay-{len(self.processes)}"
        port = net.free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        env |= self._base_env | processes.settings_env(http__port=port, **settings)
        process = processes.RelayProcess(
            name, env, port, self._workdir / f"{name}.log", cwd=REPO_ROOT
        )
        process.start()
        self.processes.append(process)
        return process

    async def wait_publishing(
        self, process: processes.RelayProcess, timeout_s: float = 60.0
    ) -> None:
        """Until the process's published counter is above zero."""

        async def publishing() -> bool:
            if not process.alive:
                raise AssertionError(
                    f"{process.name} exited {process.popen.poll()}\n{process.tail()}"
                )
            return bool(await process.published())

        await polling.wait_until(publishing, f"{process.name} to publish", timeout_s)

    async def __aenter__(self) -> Fleet:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for process in self.processes:
            with contextlib.suppress(TimeoutError):
                await process.kill()


@dataclasses.dataclass
class Stage:
    topic: str
    consumer: consumer.Consumer
    fleet: Fleet


@contextlib.asynccontextmanager
async def stage(s: Scenario, workdir: Path, **settings: str | int | float) -> AsyncIterator[Stage]:
    """A fresh topic, Service B reading it, and a fleet of relays for it (``settings`` apply to
    every relay); leftover relays get SIGKILL, the topic is deleted."""
    async with (
        fresh_topic(s.kafka) as topic,
        s.consumer(topic) as service_b,
        Fleet(s, topic, workdir, **settings) as fleet,
    ):
        yield Stage(topic, service_b, fleet)


async def writing(
    s: Scenario,
    stage_: Stage,
    relay: processes.RelayProcess,
    tasks: int,
    *,
    pause_s: float,
    committed: int = 0,
) -> loadgen.Writers:
    """``tasks`` writers started; returns once ``relay`` publishes and ``committed`` events
    committed."""
    writers = s.writers(pause_s=pause_s)
    await writers.start(tasks)
    await stage_.fleet.wait_publishing(relay)
    await polling.wait_until(
        lambda: writers.committed_count >= committed, f"writers to commit {committed} events", 60
    )
    return writers


@dataclasses.dataclass(frozen=True)
class LoadShape:
    aggregates: int
    writer_tasks: int
    pause_s: float  # each writer's pause between transactions (jittered)
    committed: int  # events committed before the test goes on


@dataclasses.dataclass
class Load:
    scenario: Scenario
    stage: Stage
    relay: processes.RelayProcess
    writers: loadgen.Writers


@contextlib.asynccontextmanager
async def under_load(
    mariadb: MariaDB, kafka: Kafka, database: str, workdir: Path, shape: LoadShape
) -> AsyncIterator[Load]:
    """The fault tests' start: one relay (2 workers) publishing while writers write, ``shape``
    telling how. Both shared servers are up again afterwards, come what may."""
    s = await scenario(mariadb, kafka, database, shape.aggregates)
    try:
        async with stage(s, workdir, worker__count=2) as stage_:
            relay = stage_.fleet.start()
            writers = await writing(
                s,
                stage_,
                relay,
                shape.writer_tasks,
                pause_s=shape.pause_s,
                committed=shape.committed,
            )
            yield Load(s, stage_, relay, writers)
    finally:
        ensure_servers_up()


def relay_errors(process: processes.RelayProcess) -> list[dict[str, Any]]:
    """Log entries that mean the daemon itself broke (a loop died, a traceback)."""
    return [
        e
        for e in process.logs()
        if e.get("event") == "task_died" or "Traceback" in str(e.get("raw", ""))
    ]


# ------------------------------------------------------------------ checks


async def count_new(s: Scenario) -> int:
    rows = await helpers.sql(s.settings, f"SELECT COUNT(*) FROM {TABLE} WHERE status = 'new'")
    return int(rows[0][0])


async def wait_drained(s: Scenario, timeout_s: float) -> None:
    """Until no outbox row is new."""

    async def drained() -> bool:
        return await count_new(s) == 0

    await polling.wait_until(drained, "the outbox backlog to drain", timeout_s, 0.2)


def check_sequences(s: Scenario) -> None:
    """Writer sanity: per aggregate, the committed sequences are exactly 1..n."""
    gaps = s.tracker.sequence_gaps()
    assert not gaps, f"aggregates with gaps in their committed sequences: {gaps[:10]}"


async def check_outbox(s: Scenario) -> None:
    """Every committed row is published; no row of a rolled-back transaction exists."""
    statuses = await helpers.statuses(s.settings)
    not_published = collections.Counter(v for v in statuses.values() if v != "published")
    assert not not_published, f"rows not published: {dict(not_published)}"
    committed = set(s.message_ids(s.tracker.committed_indexes()))
    assert set(statuses) == committed, (
        f"outbox has {len(statuses)} rows, writers committed {len(committed)}"
    )


async def verdict(s: Scenario, title: str, summary: stats.Summary, **figures: object) -> None:
    """Print the run's figures (they are part of the test report) and the rows of any order
    violation, then assert the run was clean."""
    extra = " ".join(f"{name}={value}" for name, value in figures.items())
    print(f"\n{title}: {summary.describe()} {extra}")  # noqa: T201 - the report
    if summary.order_violations:
        examples = [index for *_, index in summary.order_violation_examples[:5]]
        print(await describe_rows(s, examples))  # noqa: T201 - the report
    assert_clean(summary)


def assert_clean(summary: stats.Summary) -> None:
    """Nothing lost or leaked, order kept, keys on one partition, no unknown message."""
    problems = summary.problems()
    assert not problems, f"{problems}; {summary.describe()}"


async def verify_delivered(
    s: Scenario, service_b: consumer.Consumer, describe: Callable[[], str] | None = None
) -> None:
    """Once the writers stopped: their sequences have no gap, everything committed is delivered
    and published, nothing else is in the outbox, Service B has read to the end. With
    ``describe``, a failure is an AssertionError that adds ``describe()`` (e.g. the relays'
    state) to its message."""
    check_sequences(s)
    try:
        await service_b.wait_delivered(timeout_s=120)
        await wait_drained(s, timeout_s=60)
        await check_outbox(s)
        await service_b.wait_caught_up()
    except (AssertionError, TimeoutError) as exc:
        if describe is None:
            raise
        raise AssertionError(f"{exc}; {describe()}") from None


async def drain_stop_and_verify(
    s: Scenario,
    service_b: consumer.Consumer,
    relay: processes.RelayProcess,
    writers: loadgen.Writers,
) -> stats.Summary:
    """Stop the writers; then everything is delivered and published, the relay (alive all the
    while) stops on SIGTERM with exit 0 and logged no error; returns the delivery summary."""
    await writers.stop()
    await verify_delivered(s, service_b)
    assert relay.alive, relay.tail()
    assert await relay.terminate() == 0, relay.tail()
    assert not relay_errors(relay), relay.tail()
    return s.tracker.summary()


async def describe_rows(s: Scenario, indexes: Iterable[int]) -> str:
    """Diagnostics: the outbox rows of these messages, one line each."""
    ids = s.message_ids(indexes)
    if not ids:
        return ""
    statement, params = queries.bind(
        "SELECT id, message_id, aggregate_id, shard, status, attempts, published_at, "
        f"after_state FROM {TABLE} WHERE message_id IN %(ids)s ORDER BY id",
        {"ids": ids},
    )
    async with db.connection(s.settings) as conn, conn.cursor() as cur:
        await cur.execute(statement, params)
        rows = await cur.fetchall()
    return "\n".join(" ".join(str(c) for c in row) for row in rows)
