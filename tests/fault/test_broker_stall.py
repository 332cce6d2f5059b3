"""Acceptance: the broker freezes (SIGSTOP) for 12 s, twice with a sub-second gap, while two relay
processes are enqueueing a backlog of more than 1 MB per partition of ~125 KB events.

A private broker (tests/private_kafka.py) is frozen, never the shared one. Verified afterwards
with Service B: nothing lost, per-aggregate order of first deliveries, no rolled-back event
delivered; duplicates and the relays' peak RSS are reported, and the RSS peak of each relay
process must stay at or under 150 MB.

The default run takes about 45 s. The 90 s acceptance version (six stalls) is collected only
with ``OUTBOX_STALL_SOAK=1``::

    OUTBOX_STALL_SOAK=1 .venv/bin/pytest tests/fault/test_broker_stall.py -k soak -s
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import harness
import private_kafka
import procmem
import pytest
from aiokafka.partitioner import murmur2
from integration import helpers
from servers import MariaDB

pytestmark = [pytest.mark.fault, pytest.mark.slow]

RSS_LIMIT_MB = 150.0
BACKLOG_PER_PARTITION = 1_000_000  # bytes of unpublished events when a chained stall starts
HOT_AGGREGATES = 20
PARTITIONS = 3  # aggregates "1".."20" hash 4, 7 and 9 to a partition: none is nearly idle
EVENT_BYTES = 125_000
WRITER_TASKS = 4


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    groups: int  # runs of back-to-back stalls...
    stalls_per_group: int  # ...of this many stalls with sub-second gaps between them
    stall_s: float = 12.0
    warmup_s: float = 4.0  # writing before the first stall, and between two groups
    tail_s: float = 2.0  # writing after the last stall


SCENARIOS = [Scenario("two-stalls", groups=1, stalls_per_group=2)]
if os.environ.get("OUTBOX_STALL_SOAK") == "1":  # ~90 s of writing, six stalls
    SCENARIOS.append(Scenario("soak-six-stalls", groups=3, stalls_per_group=2, warmup_s=5.0))


def partition_of(aggregate_id: str) -> int:
    """The producer's default partitioner (murmur2 of the key)."""
    return int(murmur2(aggregate_id.encode()) & 0x7FFFFFFF) % PARTITIONS


async def unpublished_bytes(s: harness.Scenario) -> list[int]:
    """Bytes of events not published yet (new or held), per partition."""
    rows = await helpers.sql(
        s.settings,
        f"SELECT aggregate_id, SUM(OCTET_LENGTH(after_state)) FROM {harness.TABLE}"
        " WHERE status IN ('new', 'held') GROUP BY aggregate_id",
    )
    sizes = [0] * PARTITIONS
    for aggregate, size in rows:
        sizes[partition_of(str(aggregate))] += int(size)
    return sizes


async def back_at_work(s: harness.Scenario, piled: int, within_s: float = 0.9) -> None:
    """The sub-second gap between chained stalls: until the relays publish again after a thaw
    (the backlog, ``piled`` bytes at the thaw, shrinks), so that the next stall catches them
    enqueueing what piled up; at most ``within_s``. A fixed gap let fast relays drain it all
    first, and the chained stall then froze an idle relay."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline and sum(await unpublished_bytes(s)) >= piled:
        await harness.asyncio_sleep(0.02)  # a look at the backlog every 20 ms, bounded


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
async def test_broker_frozen_twice_while_enqueueing_a_big_backlog(
    mariadb: MariaDB, database: str, tmp_path: Path, scenario: Scenario
) -> None:
    async with private_kafka.broker(tmp_path / "kafka") as broker:
        s = await harness.scenario(
            mariadb, broker.kafka, database, HOT_AGGREGATES, event_bytes=EVENT_BYTES
        )
        async with (
            harness.fresh_topic(broker.kafka, PARTITIONS) as topic,
            s.consumer(topic, PARTITIONS) as service_b,
            harness.Fleet(s, topic, tmp_path, worker__count=2) as fleet,
        ):
            relays = [fleet.start(), fleet.start()]
            for relay in relays:
                relay.start_sampling()  # VmRSS every 0.5 s; VmHWM read at the end
            writers = s.writers(pause_s=0.2)
            await writers.start(WRITER_TASKS)
            for relay in relays:
                await fleet.wait_publishing(relay)
            stalls: list[dict[str, Any]] = []
            started = time.monotonic()
            for group in range(scenario.groups):
                await harness.asyncio_sleep(scenario.warmup_s)  # writing, broker up
                piled = 0
                for index in range(scenario.stalls_per_group):
                    if index:
                        await back_at_work(s, piled)  # the gap
                    backlog = await unpublished_bytes(s)
                    stalls.append(
                        {"group": group, "at_s": round(time.monotonic() - started, 1)}
                        | {"backlog_kb": [b // 1000 for b in backlog], "chained": index > 0}
                    )
                    broker.freeze()
                    try:
                        await harness.asyncio_sleep(scenario.stall_s)  # the stall itself
                        piled = sum(await unpublished_bytes(s))
                    finally:
                        broker.thaw()
                    for relay in relays:
                        assert relay.alive, relay.tail()
            await harness.asyncio_sleep(scenario.tail_s)
            await writers.stop()
            written_s = time.monotonic() - started

            def describe() -> str:
                peaks = {r.name: procmem.peak_rss_mb(r) for r in relays}
                logs = "; ".join(r.summary() for r in relays)
                return f"rss_peak_mb={peaks} stalls={stalls}; {logs}"

            await harness.verify_delivered(s, service_b, describe)
            peaks = {r.name: procmem.peak_rss_mb(r) for r in relays}
            retries = {
                r.name: len(r.events("publish_failed")) + len(r.events("cycle_failed"))
                for r in relays
            }
            for relay in relays:
                assert await relay.stop() == 0, relay.tail()
                assert not harness.relay_errors(relay), relay.tail()
            summary = s.tracker.summary()
            print(  # noqa: T201 - the figures are part of the report
                f"\nbroker stall [{scenario.name}]: {summary.describe()} "
                f"written_s={written_s:.0f} broker_start_s={broker.start_s:.1f} stalls={stalls} "
                f"rss_peak_mb={peaks} failed_cycles_logged={retries} "
                f"rss_mb_every_2s={ {r.name: _series(r) for r in relays} }"
            )
            harness.assert_clean(summary)
            for stall in stalls:
                if stall["chained"]:  # the scenario itself: a big backlog being enqueued
                    assert min(stall["backlog_kb"]) * 1000 > BACKLOG_PER_PARTITION, stalls
            for name, peak in peaks.items():
                assert peak <= RSS_LIMIT_MB, f"{name}: RSS peak {peak} MB > {RSS_LIMIT_MB} MB"


def _series(relay: harness.RelayProcess, every_s: float = 2.0) -> list[int]:
    """The sampled RSS in MiB, one value per ``every_s``."""
    values: list[int] = []
    due = 0.0
    for t, rss in relay.rss_samples:
        if t >= due:
            values.append(round(rss / 2**20))
            due = t + every_s
    return values
