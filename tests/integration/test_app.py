"""The daemon: probes, readiness naming what is down, orderly stop with the producer closed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from integration import helpers
from servers import Kafka, MariaDB

from relay import app, bench, config

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def running(settings: config.Settings) -> AsyncIterator[tuple[app.App, asyncio.Task[int]]]:
    relay = app.App(settings)
    task = asyncio.create_task(relay.run())

    async def probes_up() -> bool:
        assert not task.done(), task
        try:
            return relay.http_server.port > 0
        except RuntimeError:
            return False

    try:
        await helpers.wait_until(probes_up, "the probe server")
        yield relay, task
    finally:
        relay.request_stop()
        async with asyncio.timeout(settings.worker.shutdown_timeout_s + 10):
            await asyncio.gather(task, return_exceptions=True)


async def test_probes_when_everything_is_up(
    mariadb: MariaDB, kafka: Kafka, database: str, topic: str
) -> None:
    settings = helpers.make_settings(
        mariadb, database, kafka.bootstrap, outbox={"topic_template": topic}
    )
    await helpers.migrate(settings)
    async with running(settings) as (relay, task):
        port = relay.http_server.port

        async def ready() -> bool:
            return (await bench.http_get(port, "/readyz"))[0] == 200

        await helpers.wait_until(ready, "/readyz 200")
        assert await bench.http_get(port, "/readyz") == (200, "ok\n")
        assert await bench.http_get(port, "/livez") == (200, "ok\n")
        status, body = await bench.http_get(port, "/metrics")
        assert status == 200
        assert "outbox_relay_published_total" in body
        assert (await bench.http_get(port, "/nope"))[0] == 404
        # and it relays
        ids = await helpers.write(settings, helpers.event("probe"))
        await helpers.wait_for_statuses(settings, dict.fromkeys(ids, "published"))
        assert not task.done()


async def test_readiness_names_kafka_when_unreachable(
    mariadb: MariaDB, kafka: Kafka, database: str
) -> None:
    settings = helpers.make_settings(
        mariadb,
        database,
        f"127.0.0.1:{helpers.closed_port()}",
        kafka={"request_timeout_s": 1.0},
    )
    await helpers.migrate(settings)
    async with running(settings) as (relay, task):
        port = relay.http_server.port
        status, body = await bench.http_get(port, "/readyz")
        assert status == 503
        assert body.startswith("kafka: ")
        assert "mysql" not in body
        assert await bench.http_get(port, "/livez") == (200, "ok\n")
        assert not relay.publisher.started
        relay.request_stop()
        async with asyncio.timeout(settings.worker.shutdown_timeout_s):
            assert await task == 0  # stopped while still waiting for Kafka


async def test_readiness_names_mysql_when_unreachable(
    mariadb: MariaDB, kafka: Kafka, database: str
) -> None:
    settings = helpers.make_settings(mariadb, database, kafka.bootstrap)
    broken = settings.model_copy(
        update={
            "db": settings.db.model_copy(
                update={"port": helpers.closed_port(), "connect_timeout_s": 1.0}
            )
        }
    )
    async with running(broken) as (relay, _):

        async def kafka_connected() -> bool:
            return relay.publisher.started

        await helpers.wait_until(kafka_connected, "the producer")
        status, body = await bench.http_get(relay.http_server.port, "/readyz")
        assert status == 503
        assert body.startswith("mysql: ")
        assert "kafka" not in body


async def test_request_stop_returns_0_with_producer_closed(
    mariadb: MariaDB, kafka: Kafka, database: str, topic: str
) -> None:
    settings = helpers.make_settings(
        mariadb,
        database,
        kafka.bootstrap,
        outbox={"topic_template": topic},
        worker={"count": 3, "shutdown_timeout_s": 5.0},
        cleaner={"enabled": True, "interval_s": 3600},
    )
    await helpers.migrate(settings)
    relay = app.App(settings)
    task = asyncio.create_task(relay.run())
    try:
        ids = await helpers.write(settings, *(helpers.event(f"s-{i}") for i in range(20)))
        await helpers.wait_for_statuses(settings, dict.fromkeys(ids, "published"))
        port = relay.http_server.port
        relay.publisher.producer  # noqa: B018 - raises unless the producer is connected
        assert len([t for t in relay._tasks if not t.done()]) >= 5  # workers, cleaner, ...
    finally:
        relay.request_stop()
    async with asyncio.timeout(settings.worker.shutdown_timeout_s):
        assert await task == 0
    assert not relay.publisher.started
    assert all(t.done() for t in relay._tasks)
    assert not any(t.cancelled() for t in relay._tasks)  # ended by themselves, none cancelled
    with pytest.raises(OSError):  # the probe port is closed
        await bench.http_get(port, "/livez")
    assert sum(w.published for w in relay.workers) == 20
