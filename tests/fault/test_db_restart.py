"""Acceptance: MariaDB is restarted while writers write; writers and the relay ride it out."""

from __future__ import annotations

import time
from pathlib import Path

import harness
import pytest
from servers import Kafka, MariaDB

pytestmark = [pytest.mark.fault, pytest.mark.slow]

AGGREGATES = 200
WRITER_TASKS = 4


async def test_database_restart(
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
            writers = harness.Writers(mariadb, database, aggregates, pause_s=0.005)
            writers.start(WRITER_TASKS)
            await fleet.wait_publishing(relay)
            await harness.wait_until(
                lambda: writers.committed_count >= 1000, 60, "writers to commit 1000 events"
            )

            down_at = time.monotonic()
            await harness.servers_sh("down", "mariadb")
            assert relay.alive, relay.tail()
            await harness.servers_sh("up", "mariadb")
            restart_s = time.monotonic() - down_at
            committed_at_up = writers.committed_count
            await harness.wait_until(
                lambda: writers.committed_count >= committed_at_up + 1000,
                120,
                "writers to commit 1000 more events after the restart",
            )
            await consumer.wait_for(list(writers.committed), timeout_s=120)
            recovered_s = time.monotonic() - down_at
            await writers.stop()
            verdict = await harness.drain_stop_and_verify(
                mariadb, database, writers, consumer, relay
            )
            print(  # noqa: T201 - the figures are part of the report
                f"\nmariadb restart ({restart_s:.1f}s down+up, all relayed {recovered_s:.1f}s "
                f"after down): {verdict.summary()} rolled_back={len(writers.rolled_back)} "
                f"writers={writers.stats} cycle_failed_logged={len(relay.events('cycle_failed'))}"
            )
            verdict.assert_clean()
    finally:
        harness.ensure_servers_up()
