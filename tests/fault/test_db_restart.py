"""Acceptance: MariaDB is restarted while writers write; writers and the relay ride it out."""

from __future__ import annotations

import time
from pathlib import Path

import harness
import pytest
from servers import Kafka, MariaDB

pytestmark = [pytest.mark.fault, pytest.mark.slow]

LOAD = harness.LoadShape(aggregates=200, writer_tasks=4, pause_s=0.005, committed=1000)


async def test_database_restart(
    mariadb: MariaDB, kafka: Kafka, database: str, tmp_path: Path
) -> None:
    async with harness.under_load(mariadb, kafka, database, tmp_path, LOAD) as load:
        relay, writers = load.relay, load.writers
        down_at = time.monotonic()
        await harness.servers_sh("down", "mariadb")
        assert relay.alive, relay.tail()
        await harness.servers_sh("up", "mariadb")
        restart_s = time.monotonic() - down_at
        committed_at_up = writers.committed_count
        await harness.wait_until(
            lambda: writers.committed_count >= committed_at_up + 1000,
            "writers to commit 1000 more events after the restart",
            120,
        )
        await load.stage.consumer.wait_delivered(timeout_s=120, committed_before=time.monotonic())
        recovered_s = time.monotonic() - down_at
        summary = await harness.drain_stop_and_verify(
            load.scenario, load.stage.consumer, relay, writers
        )
        await harness.verdict(
            load.scenario,
            f"mariadb restart ({restart_s:.1f}s down+up)",
            summary,
            all_relayed_after_down_s=round(recovered_s, 1),
            writers=writers.stats,
            cycle_failed_logged=len(relay.events("cycle_failed")),
        )
