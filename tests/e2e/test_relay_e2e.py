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
MAX_EVENTS_PER_TX = 3


async def test_fifty_thousand_events_two_processes(
    mariadb: MariaDB, kafka: Kafka, database: str, tmp_path: Path
) -> None:
    s = await harness.scenario(mariadb, kafka, database, AGGREGATES, rollback_ratio=0.1)
    async with harness.stage(s, tmp_path, worker__count=2) as stage:
        relays = [stage.fleet.start(), stage.fleet.start()]
        writers = s.writers()
        started = time.monotonic()
        await writers.start(WRITER_TASKS, target_events=EVENTS)
        await writers.join()
        written_s = time.monotonic() - started
        # the writers stop at the target: each one finishes at most the transaction in flight
        overshoot = writers.committed_count - EVENTS
        assert 0 <= overshoot < MAX_EVENTS_PER_TX * WRITER_TASKS, writers.committed_count
        assert writers.stats.rollbacks > 0
        harness.check_sequences(s)

        await stage.consumer.wait_delivered(timeout_s=180)
        relayed_s = time.monotonic() - started
        await harness.wait_drained(s, timeout_s=60)
        await harness.check_outbox(s)
        await stage.consumer.wait_caught_up()

        published = [await r.published() or 0.0 for r in relays]
        assert all(p > 0 for p in published), f"both processes publish: {published}"
        for relay in relays:
            assert relay.alive, relay.tail()
        codes = [await r.terminate() for r in relays]
        assert codes == [0, 0], [r.tail() for r in relays]
        for relay in relays:
            assert not harness.relay_errors(relay), relay.tail()
            assert relay.events("relay_stopped"), relay.tail()

        await harness.verdict(
            s,
            "e2e",
            s.tracker.summary(),
            writers=writers.stats,
            written_in=f"{written_s:.1f}s",
            relayed_in=f"{relayed_s:.1f}s",
            published_per_process=published,
        )
