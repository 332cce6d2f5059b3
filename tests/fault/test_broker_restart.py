"""Acceptance: the Kafka broker is stopped for 30 s while writers write, then started again."""

from __future__ import annotations

import time
from pathlib import Path

import harness
import pytest
from servers import Kafka, MariaDB

pytestmark = [pytest.mark.fault, pytest.mark.slow]

OUTAGE_S = 30.0
AGGREGATES = 200
WRITER_TASKS = 4


async def test_broker_down_thirty_seconds(
    mariadb: MariaDB, kafka: Kafka, database: str, tmp_path: Path
) -> None:
    aggregates = await harness.prepare_database(mariadb, database, AGGREGATES)
    try:
        async with (
            harness.fresh_topic(kafka) as topic,
            harness.Consumer(kafka, topic) as consumer,
            harness.Fleet(mariadb, kafka, database, topic, tmp_path, worker__count=2) as fleet,
        ):
            relay = fleet.start()
            writers = harness.Writers(mariadb, database, aggregates, pause_s=0.02)
            writers.start(WRITER_TASKS)
            await fleet.wait_publishing(relay)
            await harness.wait_until(
                lambda: writers.committed_count >= 500, 60, "writers to commit 500 events"
            )

            await harness.servers_sh("down", "kafka")
            down_at = time.monotonic()
            at_start = await harness.count_new(mariadb, database)
            samples: list[int] = []
            while time.monotonic() - down_at < OUTAGE_S:  # the outage itself: 30 s of wall time
                assert relay.alive, relay.tail()
                samples.append(await harness.count_new(mariadb, database))
                await harness.asyncio_sleep(1.0)
            peak = max(samples)
            assert peak > at_start, f"backlog did not grow during the outage: {samples}"
            assert samples[-1] > samples[0], f"backlog did not grow during the outage: {samples}"

            await harness.servers_sh("up", "kafka")
            up_at = time.monotonic()
            committed_at_up = list(writers.committed)
            try:
                await consumer.wait_for(committed_at_up, timeout_s=120)
            except AssertionError as exc:
                backlog = await harness.count_new(mariadb, database)
                raise AssertionError(f"{exc}; backlog={backlog}; {relay.summary()}") from None
            drained_s = time.monotonic() - up_at
            await writers.stop()
            verdict = await harness.drain_stop_and_verify(
                mariadb, database, writers, consumer, relay
            )
            retries = len(relay.events("publish_failed")) + len(relay.events("cycle_failed"))
            print(  # noqa: T201 - the figures are part of the report
                f"\nbroker down {OUTAGE_S:.0f}s: {verdict.summary()} backlog_at_start={at_start} "
                f"backlog_peak={peak} backlog_samples={samples} "
                f"drain_after_up_s={drained_s:.1f} failed_cycles_logged={retries}"
            )
            verdict.assert_clean()
    finally:
        harness.ensure_servers_up()
