"""The binlog wake-up against the real MariaDB (its binary log is on, ROW format): a commit that
inserted outbox rows wakes a worker; the relay's own marks, other tables and rolled-back inserts
do not; without replication grants the follower says why and keeps trying, and a stop ends it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import structlog
from integration import helpers
from servers import Kafka, MariaDB

from relay import binlog, config, pacing
from relay.tools import polling

pytestmark = pytest.mark.integration


class _Counting(pacing.Waker):
    def __init__(self) -> None:
        super().__init__()
        self.notified = 0

    def notify(self) -> None:
        self.notified += 1
        super().notify()


@pytest_asyncio.fixture
async def settings(mariadb: MariaDB, kafka: Kafka, database: str) -> config.Settings:
    s = helpers.make_settings(mariadb, database, kafka.bootstrap, wakeup={"min_interval_s": 0})
    await helpers.migrate(s)
    return s


@pytest_asyncio.fixture
async def follower(
    settings: config.Settings,
) -> AsyncIterator[tuple[binlog.Follower, _Counting, asyncio.Task[None]]]:
    """A follower with replication grants (the administrator), streaming."""
    waker, stop = _Counting(), asyncio.Event()
    f = binlog.Follower(helpers.as_admin(settings), waker, stop)
    task = asyncio.create_task(f.run(), name="binlog")
    await polling.wait_until(lambda: f.following or task.done(), "the follower streaming", 10)
    assert not task.done()
    yield f, waker, task
    stop.set()
    async with asyncio.timeout(5):  # a stop closes the stream: no cancellation needed
        await task


async def test_a_commit_with_outbox_inserts_wakes_one_worker(
    settings: config.Settings, follower: tuple[binlog.Follower, _Counting, asyncio.Task[None]]
) -> None:
    _, waker, _ = follower
    await helpers.write(settings, helpers.event("a", 0), helpers.event("b", 0))  # one transaction
    await polling.wait_until(lambda: waker.notified, "a wake-up", 10)
    await helpers.write(settings, helpers.event("a", 1))
    await polling.wait_until(lambda: waker.notified >= 2, "a second wake-up", 10)
    assert waker.notified == 2  # one per commit, not per row


async def test_marks_other_tables_and_rollbacks_wake_nobody(
    settings: config.Settings, follower: tuple[binlog.Follower, _Counting, asyncio.Task[None]]
) -> None:
    _, waker, _ = follower
    await helpers.write(settings, helpers.event("a", 0))
    await polling.wait_until(lambda: waker.notified, "the insert's wake-up", 10)
    await helpers.sql(settings, "UPDATE outbox SET status = 'published'")  # what a mark does
    await helpers.sql(settings, "UPDATE outbox_shard SET holds = 0 WHERE shard = 1")
    await helpers.sql(settings, "CREATE TABLE outbox_like LIKE outbox")
    await helpers.sql(
        settings,
        "INSERT INTO outbox_like (message_id, aggregate_type, aggregate_id, event_type)"
        " VALUES (UUID(), 'order', 'x', 'E')",
    )
    await helpers.sql(
        settings,
        "BEGIN NOT ATOMIC START TRANSACTION;"
        " INSERT INTO outbox (message_id, aggregate_type, aggregate_id, event_type)"
        " VALUES (UUID(), 'order', 'r', 'E'); ROLLBACK; END",
    )
    # the sentinel: a commit that does wake; the binary log is in commit order
    await helpers.write(settings, helpers.event("b", 0))
    await polling.wait_until(lambda: waker.notified >= 2, "the sentinel's wake-up", 10)
    assert waker.notified == 2


async def test_without_replication_grants_it_says_why_and_keeps_trying(
    settings: config.Settings,
) -> None:
    waker, stop = _Counting(), asyncio.Event()
    f = binlog.Follower(settings, waker, stop)  # README's relay user: no replication grants
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(f.run(), name="binlog")
        await polling.wait_until(lambda: logs or task.done(), "a log line", 10)
        assert not task.done()  # the relay goes on polling; the follower retries
        assert logs[0]["event"] == "binlog_wakeup_failed"
        assert "1227" in logs[0]["error"]  # BINLOG MONITOR (SHOW MASTER STATUS) denied
        stop.set()
        async with asyncio.timeout(5):
            await task
    assert not f.following
    assert waker.notified == 0
