"""Acceptance: the Kafka broker is stopped for 30 s while writers write, then started again."""

from __future__ import annotations

import time
from pathlib import Path

import harness
import pytest
from servers import Kafka, MariaDB

pytestmark = [pytest.mark.fault, pytest.mark.slow]

LOAD = harness.LoadShape(aggregates=200, writer_tasks=4, pause_s=0.02, committed=500)

OUTAGE_S = 30.0


async def test_broker_down_thirty_seconds(
    mariadb: MariaDB, kafka: Kafka, database: str, tmp_path: Path
) -> None:
    async with harness.under_load(mariadb, kafka, database, tmp_path, LOAD) as load:
        s, relay = load.scenario, load.relay
        await harness.servers_sh("down", "kafka")
        down_at = time.monotonic()
        at_start = await harness.count_new(s)
        samples: list[int] = []
        while time.monotonic() - down_at < OUTAGE_S:  # the outage itself: 30 s of wall time
            assert relay.alive, relay.tail()
            samples.append(await harness.count_new(s))
            await harness.asyncio_sleep(1.0)
        peak = max(samples)
        assert peak > at_start, f"backlog did not grow during the outage: {samples}"
        assert samples[-1] > samples[0], f"backlog did not grow during the outage: {samples}"

        await harness.servers_sh("up", "kafka")
        up_at = time.monotonic()
        try:  # what was committed by the time the broker was back
            await load.stage.consumer.wait_delivered(timeout_s=120, committed_before=up_at)
        except TimeoutError as exc:
            backlog = await harness.count_new(s)
            raise AssertionError(f"{exc}; backlog={backlog}; {relay.summary()}") from None
        drained_s = time.monotonic() - up_at
        summary = await harness.drain_stop_and_verify(s, load.stage.consumer, relay, load.writers)
        retries = len(relay.events("publish_failed")) + len(relay.events("cycle_failed"))
        await harness.verdict(
            s,
            f"broker down {OUTAGE_S:.0f}s",
            summary,
            backlog_at_start=at_start,
            backlog_peak=peak,
            backlog_samples=samples,
            drain_after_up_s=round(drained_s, 1),
            failed_cycles_logged=retries,
        )
