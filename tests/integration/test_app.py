"""The daemon: probes, readiness naming what is down, orderly stop with the producer closed."""

from __future__ import annotations

import asyncio

import pytest
from integration import helpers
from servers import Kafka, MariaDB

from relay import app
from relay.tools import net

pytestmark = pytest.mark.integration


async def test_probes_when_everything_is_up(
    mariadb: MariaDB, kafka: Kafka, database: str, topic: str
) -> None:
    settings = await helpers.migrated(mariadb, database, kafka, topic)
    async with helpers.running(settings) as (relay, task):
        port = relay.http_server.port

        async def ready() -> bool:
            return (await net.http_get(port, "/readyz"))[0] == 200

        await helpers.wait_until(ready, "/readyz 200")
        assert await net.http_get(port, "/readyz") == (200, "ok\n")
        assert await net.http_get(port, "/livez") == (200, "ok\n")
        status, body = await net.http_get(port, "/metrics")
        assert status == 200
        assert "outbox_relay_published_total" in body
        assert (await net.http_get(port, "/nope"))[0] == 404
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
        f"127.0.0.1:{net.free_port()}",
        kafka={"request_timeout_s": 1.0},
    )
    await helpers.migrate(settings)
    async with helpers.running(settings) as (relay, task):
        port = relay.http_server.port

        async def database_checked() -> bool:
            return "startup" not in await relay.readiness()

        await helpers.wait_until(database_checked, "the start-up database check")
        status, body = await net.http_get(port, "/readyz")
        assert status == 503
        assert body == "kafka: not_connected\n"  # a reason code; the details are in the logs
        assert await net.http_get(port, "/livez") == (200, "ok\n")
        assert not relay.publisher.started
        relay.request_stop()
        async with asyncio.timeout(settings.worker.shutdown_timeout_s):
            assert await task == 0  # stopped while still waiting for Kafka


async def test_readiness_names_the_database_when_unreachable(
    mariadb: MariaDB, kafka: Kafka, database: str
) -> None:
    settings = helpers.make_settings(mariadb, database, kafka.bootstrap)
    broken = settings.model_copy(
        update={
            "db": settings.db.model_copy(update={"port": net.free_port(), "connect_timeout_s": 1.0})
        }
    )
    async with helpers.running(broken) as (relay, task):

        async def startup_check_failed() -> bool:
            _, body = await net.http_get(relay.http_server.port, "/readyz")
            return "startup: database_unreachable" in body

        await helpers.wait_until(startup_check_failed, "the start-up check to fail")
        status, body = await net.http_get(relay.http_server.port, "/readyz")
        assert status == 503
        assert "127.0.0.1" not in body  # no user, host or server text for anyone to read
        assert not task.done()  # keeps retrying: the database may be starting


async def test_probe_endpoint_is_bounded_and_opens_no_connections(
    mariadb: MariaDB, kafka: Kafka, database: str, topic: str
) -> None:
    """40 parallel /readyz answer from the relay's state (no database connection each); an
    oversize request line is refused; connections beyond the cap get 503 at once."""
    settings = await helpers.migrated(mariadb, database, kafka, topic, http={"max_connections": 50})
    async with helpers.running(settings) as (relay, _):
        port = relay.http_server.port
        await helpers.wait_until(lambda: _ready(port), "/readyz 200", timeout_s=30.0)
        before = _threads_connected(mariadb)
        answers = await asyncio.gather(*(net.http_get(port, "/readyz") for _ in range(40)))
        assert answers == [(200, "ok\n")] * 40
        assert _threads_connected(mariadb) <= before + 2  # (other tests' noise aside)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /" + b"x" * 70_000 + b" HTTP/1.0\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(10):
            answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.0 431 "), answer[:80]


async def test_probe_endpoint_caps_connections(
    mariadb: MariaDB, kafka: Kafka, database: str, topic: str
) -> None:
    http = {"max_connections": 2, "request_timeout_s": 30.0}
    settings = await helpers.migrated(mariadb, database, kafka, topic, http=http)
    async with helpers.running(settings) as (relay, _):
        port = relay.http_server.port
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        try:
            # the two idle clients hold both slots: the next one is turned away at once
            async with asyncio.timeout(10):
                status, body = await net.http_get(port, "/livez")
            assert (status, body) == (503, "busy\n")
        finally:
            for _, writer in idle:
                writer.close()

        async def slots_free() -> bool:
            return (await net.http_get(port, "/livez"))[0] == 200

        await helpers.wait_until(slots_free, "the idle clients' slots to free")


async def _ready(port: int) -> bool:
    return (await net.http_get(port, "/readyz"))[0] == 200


def _threads_connected(mariadb: MariaDB) -> int:
    ((_, value),) = helpers.server_sql(mariadb, "SHOW GLOBAL STATUS LIKE 'Threads_connected'")
    return int(value)


async def test_request_stop_returns_0_with_producer_closed(
    mariadb: MariaDB, kafka: Kafka, database: str, topic: str
) -> None:
    workers = {"count": 3, "shutdown_timeout_s": 5.0}
    cleaner = {"enabled": True, "interval_s": 3600}
    settings = await helpers.migrated(
        mariadb, database, kafka, topic, worker=workers, cleaner=cleaner
    )
    relay = app.App(settings)
    task = asyncio.create_task(relay.run())
    try:
        ids = await helpers.write(settings, *(helpers.event(f"s-{i}") for i in range(20)))
        await helpers.wait_for_statuses(settings, dict.fromkeys(ids, "published"))
        port = relay.http_server.port
        connected = relay.publisher.started  # the producer is connected while the relay runs
        assert connected
        assert len([t for t in relay._tasks if not t.done()]) >= 5  # workers, cleaner, ...
    finally:
        relay.request_stop()
    async with asyncio.timeout(settings.worker.shutdown_timeout_s):
        assert await task == 0
    assert not relay.publisher.started
    assert all(t.done() for t in relay._tasks)
    assert not any(t.cancelled() for t in relay._tasks)  # ended by themselves, none cancelled
    with pytest.raises(OSError):  # the probe port is closed
        await net.http_get(port, "/livez")
    assert sum(w.published for w in relay.workers) == 20
