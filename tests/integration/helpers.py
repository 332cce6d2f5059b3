"""Helpers of the integration tests: settings, SQL, the relay or a worker in this process,
polling, topics, a Kafka reader."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import prometheus_client
import pydantic
import servers
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from servers import REPO_ROOT, Kafka, MariaDB, unique_name

from relay import app, config, db, pacing, publisher, store, worker, writer
from relay.tools import net, polling, topics

TABLE = "outbox"

# The shared implementations, under the names the integration tests use.
closed_port = net.free_port  # a local TCP port nobody listens on
wait_until = polling.wait_until  # wait_until(predicate, what, timeout_s=30.0)
server_sql = servers.server_sql  # server_sql(mariadb, statement, *args, database=None)


def make_settings(
    mariadb: MariaDB, database: str, bootstrap: str, **groups: Mapping[str, Any]
) -> config.Settings:
    """Settings for the test servers, as the relay's least-privilege user (``mariadb.relay_user``,
    README's grants: :func:`migrate` grants them); fast polling and backoff; cleaner off; probes
    on port 0. The helpers that seed and inspect rows (:func:`sql`, :func:`write`...) connect as
    the administrator instead (:func:`as_admin`)."""
    base: dict[str, dict[str, Any]] = {
        "db": {
            "host": mariadb.host,
            "port": mariadb.port,
            "user": mariadb.relay_user,
            "password": mariadb.relay_password,
            "name": database,
        },
        "kafka": {"bootstrap_servers": bootstrap, "request_timeout_s": 5.0},
        "worker": {
            "poll_interval_s": 0.05,
            "backoff_initial_s": 0.05,
            "backoff_max_s": 0.5,
            "publish_timeout_s": 10.0,
            "shutdown_timeout_s": 10.0,
        },
        "cleaner": {"enabled": False},
        "http": {"host": "127.0.0.1", "port": 0},
        "backlog": {"sample_interval_s": 0.5},
    }
    for group, values in groups.items():
        base[group] = {**base.get(group, {}), **values}
    return config.load(**base)


def as_user(settings: config.Settings, user: str, password: str) -> config.Settings:
    """``settings`` with another database user (the rest, TLS included, unchanged)."""
    secret = pydantic.SecretStr(password)
    return settings.model_copy(
        update={"db": settings.db.model_copy(update={"user": user, "password": secret})}
    )


def as_admin(settings: config.Settings) -> config.Settings:
    """``settings`` as the administrator when they are the relay's or the migrate user's (a
    test's own user, e.g. a ``REQUIRE SSL`` one, is kept): for seeding and inspecting rows."""
    if settings.db.user not in (servers.RELAY_USER, servers.MIGRATE_USER):
        return settings
    return as_user(settings, servers.ADMIN_USER, servers.ADMIN_USER)


def as_migrate(settings: config.Settings) -> config.Settings:
    """``settings`` as the ``relay migrate`` user when they are the relay's."""
    if settings.db.user != servers.RELAY_USER:
        return settings
    return as_user(settings, servers.MIGRATE_USER, servers.MIGRATE_USER)


def admin_server(settings: config.Settings) -> MariaDB:
    """The server of ``settings`` with the administrator (for :mod:`servers`' functions)."""
    return servers.MariaDB(
        settings.db.host, settings.db.port, servers.ADMIN_USER, servers.ADMIN_USER
    )


async def migrate(settings: config.Settings) -> None:
    """The schema (``relay migrate``) as the migrate user, then the relay user's grants on it,
    when ``settings`` are the relay user's; else as ``settings``' own user (a test's)."""
    conn = await db.connect(as_migrate(settings))
    try:
        await store.Store(settings.outbox.table).migrate(conn)
    finally:
        db.close(conn)
    if settings.db.user == servers.RELAY_USER:
        servers.grant_relay(admin_server(settings), settings.db.name, settings.outbox.table)


async def migrated(
    mariadb: MariaDB, database: str, kafka: Kafka, topic: str, /, **groups: Mapping[str, Any]
) -> config.Settings:
    """:func:`make_settings` relaying to ``topic`` (an ``outbox`` group adds to that), with the
    schema applied."""
    outbox = {"topic_template": topic, **groups.pop("outbox", {})}
    settings = make_settings(mariadb, database, kafka.bootstrap, outbox=outbox, **groups)
    await migrate(settings)
    return settings


async def sql(
    settings: config.Settings, statement: str, args: Sequence[object] | None = None
) -> list[tuple[Any, ...]]:
    """Run one statement on a fresh connection of ``settings`` as the administrator
    (:func:`as_admin`; autocommit) and return its rows."""
    conn = await db.connect(as_admin(settings))
    try:
        async with conn.cursor() as cur:
            await cur.execute(statement, args)
            rows: list[tuple[Any, ...]] = list(await cur.fetchall())
            return rows
    finally:
        db.close(conn)


def relay_env(tmp_path: Path, **variables: str) -> dict[str, str]:
    """The environment of a ``relay`` command: this one without its ``RELAY_*`` variables, an
    empty secrets directory, JSON logs, then ``variables``."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("RELAY_")}
    env.update(RELAY_SECRETS_DIR=str(tmp_path / "no-secrets"), RELAY_LOG__FORMAT="json")
    env.update(variables)
    return env


def run_relay(args: Sequence[str], env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """``relay <args>`` in a process of this Python with environment ``env``; not checked."""
    return subprocess.run(  # noqa: S603 - our own CLI with fixed arguments
        [sys.executable, "-m", "relay", *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def write(settings: config.Settings, *events: writer.Event) -> list[str]:
    """Insert events in one committed transaction, as Service A would (as the administrator:
    :func:`as_admin`)."""
    conn = await db.connect(as_admin(settings), autocommit=False)
    try:
        async with conn.cursor() as cur:
            ids = await writer.OutboxWriter(settings.outbox.table).add(cur, *events)
        await conn.commit()
    finally:
        db.close(conn)
    return ids


def event(aggregate_id: str, seq: int = 0, **changes: Any) -> writer.Event:
    fields: dict[str, Any] = {
        "aggregate_type": "order",
        "aggregate_id": aggregate_id,
        "event_type": "OrderChanged",
        "after": {"seq": seq},
    }
    return writer.Event(**{**fields, **changes})


async def statuses(settings: config.Settings) -> dict[str, str]:
    rows = await sql(settings, f"SELECT message_id, status FROM `{settings.outbox.table}`")
    return {str(m): str(s) for m, s in rows}


async def rows_by_message_id(settings: config.Settings) -> dict[str, dict[str, Any]]:
    rows = await sql(
        settings,
        "SELECT message_id, id, status, attempts, last_error, published_at"
        f" FROM `{settings.outbox.table}`",
    )
    return {
        str(r[0]): {
            "id": r[1],
            "status": r[2],
            "attempts": r[3],
            "last_error": r[4],
            "published_at": r[5],
        }
        for r in rows
    }


async def wait_for_statuses(
    settings: config.Settings, expected: Mapping[str, str], timeout_s: float = 30.0
) -> None:
    async def reached() -> bool:
        current = await statuses(settings)
        return all(current.get(m) == s for m, s in expected.items())

    await wait_until(reached, f"{len(expected)} rows to reach their status", timeout_s)


@contextlib.asynccontextmanager
async def running(settings: config.Settings) -> AsyncIterator[tuple[app.App, asyncio.Task[int]]]:
    """``relay run`` in this process (an :class:`relay.app.App`) until the block ends, once its
    probe server listens; then a stop is requested and awaited."""
    relay = app.App(settings)
    task = asyncio.create_task(relay.run(), name="relay")

    def probes_up() -> bool:
        if task.done():
            raise AssertionError(f"the relay stopped at start-up: {task.result()!r}")
        try:
            return relay.http_server.port > 0
        except RuntimeError:
            return False

    try:
        await wait_until(probes_up, "the probe server")
        yield relay, task
    finally:
        relay.request_stop()
        async with asyncio.timeout(settings.worker.shutdown_timeout_s + 10):
            await asyncio.gather(task, return_exceptions=True)


@contextlib.asynccontextmanager
async def running_worker(
    settings: config.Settings, pub: publisher.Publisher | None = None
) -> AsyncIterator[tuple[worker.Worker, asyncio.Task[None]]]:
    """One Worker in a task with a started Publisher (unless one is given); stopped afterwards."""
    own = pub is None
    if pub is None:
        pub = publisher.Publisher(settings)
        await pub.start()
    stop = asyncio.Event()
    waker = pacing.Waker()
    w = worker.Worker("worker-test", settings, pub, stop, waker)
    task = asyncio.create_task(w.run())
    try:
        yield w, task
    finally:
        stop.set()
        waker.notify_all()
        async with asyncio.timeout(30):
            await task
        if own:
            await pub.stop()


def metric(name: str, **labels: str) -> float:
    return prometheus_client.REGISTRY.get_sample_value(name, labels) or 0.0


# ------------------------------------------------------------------ Kafka


@dataclasses.dataclass(frozen=True)
class Message:
    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes
    headers: dict[str, bytes]

    @property
    def message_id(self) -> str:
        return self.headers["message_id"].decode()


@contextlib.asynccontextmanager
async def fresh_topic(
    kafka: Kafka,
    partitions: int = 1,
    configs: Mapping[str, str] | None = None,
    name: str | None = None,
) -> AsyncIterator[str]:
    """A new topic (``t_<hex>`` unless named; topic-level configs), ready to produce to; deleted
    afterwards."""
    name = name or unique_name("t_")
    await topics.create(kafka.options, name, partitions, configs=configs)
    try:
        yield name
    finally:
        # a fault test may have left the broker down: a leftover topic is harmless
        with contextlib.suppress(KafkaError, OSError):
            await topics.delete(kafka.options, [name])


async def partitions_of(kafka: Kafka, topic: str) -> list[int]:
    return await topics.partition_ids(kafka.options, topic)


async def consume(
    kafka: Kafka,
    topic: str,
    done: Callable[[list[Message]], bool],
    timeout_s: float = 60.0,
) -> list[Message]:
    """Read every partition of ``topic`` from the beginning until ``done(messages)``."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap, group_id=None, enable_auto_commit=False
    )
    await consumer.start()
    messages: list[Message] = []
    try:
        tps = [TopicPartition(topic, p) for p in await partitions_of(kafka, topic)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        async with asyncio.timeout(timeout_s):
            while not done(messages):
                batches = await consumer.getmany(*tps, timeout_ms=200)
                for tp, records in batches.items():
                    messages.extend(
                        Message(
                            topic,
                            tp.partition,
                            r.offset,
                            r.key or b"",
                            r.value or b"",
                            dict(r.headers),
                        )
                        for r in records
                    )
    finally:
        await consumer.stop()
    return messages


def has_ids(ids: set[str]) -> Callable[[list[Message]], bool]:
    return lambda messages: ids <= {m.message_id for m in messages}


async def end_offsets(kafka: Kafka, topic: str) -> int:
    """Total records in ``topic`` (sum of end offsets)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in await partitions_of(kafka, topic)]
        offsets = await consumer.end_offsets(tps)
        return sum(offsets.values())
    finally:
        await consumer.stop()
