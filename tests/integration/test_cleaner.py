"""The cleaner: only published rows past retention, in chunks, one cleaner at a time."""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio
from integration import helpers
from servers import Kafka, MariaDB

from relay import cleaner, config, db, store

pytestmark = pytest.mark.integration

DAY_S = 86400.0


@pytest_asyncio.fixture
async def settings(mariadb: MariaDB, kafka: Kafka, database: str) -> config.Settings:
    settings = helpers.make_settings(
        mariadb,
        database,
        kafka.bootstrap,
        cleaner={"enabled": True, "retention_s": DAY_S, "chunk_size": 10, "interval_s": 3600},
    )
    await helpers.migrate(settings)
    return settings


async def _rows(settings: config.Settings, status: str, age_s: float, count: int) -> set[str]:
    """``count`` rows in ``status`` whose published_at is ``age_s`` ago (set even if not published:
    the cleaner must look at the status, not only at the time)."""
    ids = await helpers.write(
        settings, *(helpers.event(f"{status}-{age_s}-{i}") for i in range(count))
    )
    marks = ", ".join(["%s"] * len(ids))
    await helpers.sql(
        settings,
        "UPDATE outbox SET status = %s,"
        " published_at = TIMESTAMPADD(SECOND, -%s, CURRENT_TIMESTAMP(6))"
        f" WHERE message_id IN ({marks})",
        [status, int(age_s), *ids],
    )
    return set(ids)


async def test_deletes_only_expired_published_rows(settings: config.Settings) -> None:
    expired = await _rows(settings, "published", 2 * DAY_S, 5)
    recent = await _rows(settings, "published", 60, 5)
    old_new = await _rows(settings, "new", 2 * DAY_S, 3)
    old_failed = await _rows(settings, "failed", 2 * DAY_S, 3)
    deleted_before = helpers.metric("outbox_relay_cleaner_deleted_rows_total")
    assert await cleaner.Cleaner(settings, asyncio.Event()).run_once() == 5
    remaining = await helpers.statuses(settings)
    assert set(remaining) == recent | old_new | old_failed
    assert not expired & set(remaining)
    assert helpers.metric("outbox_relay_cleaner_deleted_rows_total") == deleted_before + 5
    assert await cleaner.Cleaner(settings, asyncio.Event()).run_once() == 0


async def test_deletes_in_chunks_up_to_the_per_run_cap(settings: config.Settings) -> None:
    capped = settings.model_copy(
        update={"cleaner": settings.cleaner.model_copy(update={"max_chunks_per_run": 2})}
    )
    await _rows(settings, "published", 2 * DAY_S, 25)
    keep = await _rows(settings, "published", 10, 2)
    c = cleaner.Cleaner(capped, asyncio.Event())
    assert await c.run_once() == 20  # two chunks of 10
    assert len(await helpers.statuses(settings)) == 7
    assert await c.run_once() == 5
    assert set(await helpers.statuses(settings)) == keep


async def test_second_cleaner_skips_while_the_first_holds_the_lock(
    settings: config.Settings,
) -> None:
    expired = await _rows(settings, "published", 2 * DAY_S, 3)
    first = cleaner.Cleaner(settings, asyncio.Event())
    second = cleaner.Cleaner(settings, asyncio.Event())
    assert first.lock_name == second.lock_name
    holder = await db.connect(settings)  # the first cleaner, mid-run, holding its GET_LOCK
    s = store.Store("outbox")
    try:
        assert await s.try_cleaner_lock(holder, first.lock_name)
        skipped = helpers.metric("outbox_relay_cleaner_runs_total", result="skipped")
        assert await second.run_once() is None
        assert helpers.metric("outbox_relay_cleaner_runs_total", result="skipped") == skipped + 1
        assert expired <= set(await helpers.statuses(settings))  # nothing deleted
        await s.release_cleaner_lock(holder, first.lock_name)
    finally:
        db.close(holder)
    assert await second.run_once() == 3


async def test_lock_is_per_database_and_table(
    settings: config.Settings, mariadb: MariaDB, kafka: Kafka
) -> None:
    other = helpers.make_settings(mariadb, "other_db", kafka.bootstrap)
    assert (
        cleaner.Cleaner(other, asyncio.Event()).lock_name
        != cleaner.Cleaner(settings, asyncio.Event()).lock_name
    )


async def test_run_loop_cleans_and_stops(settings: config.Settings) -> None:
    expired = await _rows(settings, "published", 2 * DAY_S, 3)
    stop = asyncio.Event()
    task = asyncio.create_task(cleaner.Cleaner(settings, stop).run())
    try:

        async def cleaned() -> bool:
            return not expired & set(await helpers.statuses(settings))

        await helpers.wait_until(cleaned, "the cleaner loop to delete the expired rows")
    finally:
        stop.set()
        async with asyncio.timeout(10):
            await task
