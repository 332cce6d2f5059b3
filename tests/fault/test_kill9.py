"""Acceptance: ``kill -9`` of a relay process in the middle of a batch, 20 times over."""

from __future__ import annotations

import random
import time
from pathlib import Path

import harness
import pytest
from servers import Kafka, MariaDB

pytestmark = [pytest.mark.fault, pytest.mark.slow]

KILLS = 20
BATCH_SIZE = 100
AGGREGATES = 300
WRITER_TASKS = 4


async def test_kill_minus_nine_twenty_times(
    mariadb: MariaDB, kafka: Kafka, database: str, tmp_path: Path
) -> None:
    aggregates = await harness.prepare_database(mariadb, database, AGGREGATES)
    rng = random.Random(database)
    async with (
        harness.fresh_topic(kafka) as topic,
        harness.Consumer(kafka, topic) as consumer,
        harness.Fleet(
            mariadb, kafka, database, topic, tmp_path, worker__batch_size=BATCH_SIZE
        ) as fleet,
    ):
        # one process lives throughout (concurrent recovery); the victims have one worker each,
        # so a kill leaves at most one batch (BATCH_SIZE rows) in flight
        survivor = fleet.start(worker__count=1)
        writers = harness.Writers(mariadb, database, aggregates, pause_s=0.002)
        writers.start(WRITER_TASKS)
        await fleet.wait_publishing(survivor)
        killed_after: list[float] = []
        for _ in range(KILLS):
            victim = fleet.start(worker__count=1)
            await fleet.wait_publishing(victim)
            # its published counter is moving: kill at a random short delay, mid-batch
            await _wait_moving(victim)
            delay = rng.uniform(0.0, 0.15)
            await harness.asyncio_sleep(delay)
            assert victim.alive, victim.tail()
            assert await victim.kill() == -9
            killed_after.append(time.monotonic() - victim.started_at)
        await writers.stop()
        verdict = await harness.drain_stop_and_verify(
            mariadb, database, writers, consumer, survivor
        )
        print(  # noqa: T201 - the figures are part of the report
            f"\nkill -9 x{KILLS}: {verdict.summary()} rolled_back={len(writers.rolled_back)} "
            f"batch_size={BATCH_SIZE} victims_lived_s=[{min(killed_after):.1f}.."
            f"{max(killed_after):.1f}] survivor_published={await _final(survivor)}"
        )
        verdict.assert_clean()
        # duplicates only of rows in flight: at most one batch per kill, each copy once per kill
        assert verdict.duplicates <= KILLS * BATCH_SIZE, verdict.summary()
        assert verdict.max_copies <= 1 + KILLS, verdict.summary()


async def _wait_moving(victim: harness.RelayProcess) -> None:
    """Until the victim's published counter rises between two scrapes."""
    before = await victim.published()

    async def moved() -> bool:
        now = await victim.published()
        return now is not None and before is not None and now > before

    await harness.wait_until(moved, 30, "the victim's published counter to move", 0.01)


async def _final(process: harness.RelayProcess) -> str:
    published = [e.get("published") for e in process.events("relay_stopped")]
    return str(published[-1] if published else "?")
