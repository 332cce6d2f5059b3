"""Acceptance: ``kill -9`` of a relay process in the middle of a batch, 20 times over.

"In the middle of a batch" is checked, not assumed: right before each SIGKILL the victim's
``/metrics`` must show a batch in flight, i.e. more batches claimed (``batch_size_rows`` count)
than ended (marked and committed: ``mark_duration_seconds`` count; or rolled back:
``batch_retries_total``). The victim renders its metrics while its worker awaits Kafka or the
database, so the scrape is a consistent look at that moment; the kill is sent as soon as a batch
is seen (nothing is awaited between the look and the kill). The kills that landed with a batch in
flight are counted, and most of them must have.

The database cannot tell instead: ``information_schema.INNODB_TRX`` is a cache refreshed at most
every 0.1 s, longer than a whole batch here.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import harness
import pytest
from servers import Kafka, MariaDB

from relay.tools import processes, stats

pytestmark = [pytest.mark.fault, pytest.mark.slow]

KILLS = 20
BATCH_SIZE = 100
AGGREGATES = 300
WRITER_TASKS = 4
CATCH_BATCH_S = 5.0  # how long to look for a batch in flight before killing anyway

CLAIMED = "outbox_relay_batch_size_rows_count"  # batches claimed with rows
MARKED = "outbox_relay_mark_duration_seconds_count"  # batches marked and committed
RETRIED = "outbox_relay_batch_retries_total{"  # cycles rolled back, by reason


async def test_kill_minus_nine_twenty_times(
    mariadb: MariaDB, kafka: Kafka, database: str, tmp_path: Path
) -> None:
    s = await harness.scenario(mariadb, kafka, database, AGGREGATES)
    rng = random.Random(database)
    async with harness.stage(s, tmp_path, worker__batch_size=BATCH_SIZE) as stage:
        # one process lives throughout (concurrent recovery); the victims have one worker each,
        # so a kill leaves at most one batch (BATCH_SIZE rows) in flight
        survivor = stage.fleet.start(worker__count=1)
        writers = await harness.writing(s, stage, survivor, WRITER_TASKS, pause_s=0.002)
        killed_after: list[float] = []
        mid_batch = 0
        for _ in range(KILLS):
            victim = stage.fleet.start(worker__count=1)
            await stage.fleet.wait_publishing(victim)
            await _wait_moving(victim)
            await harness.asyncio_sleep(rng.uniform(0.0, 0.15))  # a random moment of its work
            assert victim.alive, victim.tail()
            mid_batch += await _kill_mid_batch(victim)
            assert await victim.kill() == -9  # reaps the process killed above
            killed_after.append(time.monotonic() - victim.started_at)
        summary = await harness.drain_stop_and_verify(s, stage.consumer, survivor, writers)
        await harness.verdict(
            s,
            f"kill -9 x{KILLS}",
            summary,
            killed_mid_batch=mid_batch,
            batch_size=BATCH_SIZE,
            victims_lived_s=f"[{min(killed_after):.1f}..{max(killed_after):.1f}]",
            survivor_published=_final(survivor),
        )
        assert mid_batch > KILLS // 2, f"only {mid_batch} of {KILLS} kills landed mid-batch"
        # duplicates only of rows in flight: at most one batch per kill, each copy once per kill
        assert summary.duplicates <= KILLS * BATCH_SIZE, summary.describe()
        assert summary.max_copies <= 1 + KILLS, summary.describe()


async def _kill_mid_batch(victim: processes.RelayProcess) -> bool:
    """SIGKILL the victim as soon as its metrics show a batch in flight, or after CATCH_BATCH_S
    regardless; returns whether a batch was in flight."""
    deadline = time.monotonic() + CATCH_BATCH_S
    while True:
        in_flight = _batches_in_flight(await victim.metrics()) > 0
        if in_flight or time.monotonic() >= deadline:
            victim.popen.kill()  # right after the look: nothing awaited in between
            return in_flight


def _batches_in_flight(metrics_text: str) -> float:
    """Batches claimed minus batches ended (committed or rolled back) so far."""
    claimed = stats.parse_counter(metrics_text, CLAIMED)
    marked = stats.parse_counter(metrics_text, MARKED)
    retried = sum(
        float(line.rpartition(" ")[2])
        for line in metrics_text.splitlines()
        if line.startswith(RETRIED)
    )
    return claimed - marked - retried


async def _wait_moving(victim: processes.RelayProcess) -> None:
    """Until the victim's published counter rises between two scrapes."""
    before = await victim.published()

    async def moved() -> bool:
        now = await victim.published()
        return now is not None and before is not None and now > before

    await harness.wait_until(moved, "the victim's published counter to move", 30, 0.01)


def _final(process: processes.RelayProcess) -> str:
    published = [e.get("published") for e in process.events("relay_stopped")]
    return str(published[-1] if published else "?")
