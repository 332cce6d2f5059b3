"""Acceptance: 50,000 events from concurrent writers, relayed by 4 workers in 2 processes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import harness
import pytest
from servers import Kafka, MariaDB

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EVENTS = int(os.environ.get("OUTBOX_E2E_EVENTS", "50000"))
AGGREGATES = 500
WRITER_TASKS = 8


async def test_fifty_thousand_events_two_processes(
    mariadb: MariaDB, kafka: Kafka, database: str, tmp_path: Path
) -> None:
    aggregates = await harness.prepare_database(mariadb, database, AGGREGATES)
    async with (
        harness.fresh_topic(kafka) as topic,
        harness.Consumer(kafka, topic) as consumer,
        harness.Fleet(mariadb, kafka, database, topic, tmp_path, worker__count=2) as fleet,
    ):
        relays = [fleet.start(), fleet.start()]
        writers = harness.Writers(mariadb, database, aggregates, rollback_ratio=0.1)
        started = time.monotonic()
        writers.start(WRITER_TASKS, target_events=EVENTS)
        await writers.join()
        written_s = time.monotonic() - started
        assert writers.committed_count >= EVENTS
        assert writers.stats.rollbacks > 0
        harness.check_versions(writers)

        await consumer.wait_for(writers.committed, timeout_s=180)
        relayed_s = time.monotonic() - started
        await harness.wait_drained(mariadb, database, timeout_s=60)
        await harness.check_outbox(mariadb, database, writers)
        await consumer.wait_caught_up()

        published = [await r.published() or 0.0 for r in relays]
        assert all(p > 0 for p in published), f"both processes publish: {published}"
        for relay in relays:
            assert relay.alive, relay.tail()
        codes = [await r.terminate() for r in relays]
        assert codes == [0, 0], [r.tail() for r in relays]
        for relay in relays:
            assert not harness.relay_errors(relay), relay.tail()
            assert relay.events("relay_stopped"), relay.tail()

        verdict = harness.verify(writers, consumer)
        print(  # noqa: T201 - the figures are part of the report
            f"\ne2e: {verdict.summary()} rolled_back={len(writers.rolled_back)} "
            f"writers={writers.stats} written_in={written_s:.1f}s relayed_in={relayed_s:.1f}s "
            f"published_per_process={published}"
        )
        if verdict.order_violations:  # show the rows (id, shard, published_at) for the report
            ids = [w for v in verdict.order_violations[:5] for w in v.split() if len(w) == 36]
            print(await harness.describe_rows(mariadb, database, ids))  # noqa: T201
        verdict.assert_clean()
