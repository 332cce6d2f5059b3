"""Acceptance: ``kill -9`` of relay processes at random moments, 30 times, with 3 replicas.

Three ``relay run`` processes (2 workers each, batches of 100 at most) publish to a topic on the
3-node cluster while writers commit 300 events/s (tests/cluster.py). Thirty times, one of the
three, drawn at random, is killed with SIGKILL at a random moment of its work, and a new process
takes its place at once (what a supervisor does); the next kill waits until the newcomer
publishes, so three replicas are alive at every kill.

"At a random moment of its work" is checked to be mid-batch, not assumed: right before each
SIGKILL the victim's ``/metrics`` must show a batch in flight (tests/chaos.py,
``kill_mid_batch``). The kills that landed with a batch in flight are counted, and most of them
must have.

Per kill (one fault of tests/cluster.py): recovery without an operator (the backlog younger
than 1 s again, within :data:`MAX_RECOVERY_S`, no surviving relay died), and its duplicates,
at most the victim's batches in flight (workers x batch size; the matrix's bound, processes x
workers x batch size, is checked too). At the end: zero committed events lost, no rolled-back
event delivered, per-aggregate order of first deliveries kept, every relay stops cleanly.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import chaos
import cluster
import harness
import pytest
from servers import MariaDB

pytestmark = [pytest.mark.fault, pytest.mark.slow]

KILLS = 30
RELAYS = 3
KIND = "relay process kill -9"
# the killed batch's locks go with its connections: the others claim its rows on their next
# cycle; recovery is judged on a gauge sampled every 0.2 s, and the machine is shared
MAX_RECOVERY_S = 10.0
PER_KILL_DUPLICATES = cluster.WORKERS * cluster.BATCH_SIZE  # the victim's batches in flight


async def test_kill_minus_nine_thirty_times_among_three_replicas(
    mariadb: MariaDB, kafka_cluster: cluster.Cluster, database: str, tmp_path: Path
) -> None:
    rng = random.Random(database)
    async with cluster.matrix(
        "f-relay-kill9", mariadb, kafka_cluster, database, tmp_path, per_process=({},) * RELAYS
    ) as m:
        started = time.monotonic()
        records = [await chaos.relay_kill(m, rng.randrange(RELAYS), {}, rng) for _ in range(KILLS)]
        kills_s = round(time.monotonic() - started)
        rows = chaos.kinds_table([(KIND, r) for r in records])
        summary = await m.finish(
            f"kill -9 x{KILLS} among {RELAYS} replicas, {kills_s} s of kills",
            [row.record() for row in rows],
            verdict=False,
        )
        print(f"\n{chaos.describe_kinds(rows)}")  # noqa: T201 - the figures are the report
        mid_batch = sum(1 for r in records if r.figures.get("mid_batch") == 1)
        worst = max(records, key=lambda r: r.duplicates)
        slowest = max(records, key=lambda r: r.recovery_s)
        await harness.verdict(
            m.scenario,
            f"kill -9 x{KILLS} among {RELAYS} replicas",
            summary,
            killed_mid_batch=mid_batch,
            kills_s=kills_s,
            recovery_s_max=round(slowest.recovery_s, 1),
            duplicates_max_per_kill=worst.duplicates,
            relays_started=len(m.stage.fleet.processes),
        )
        assert len(m.stage.fleet.processes) == RELAYS + KILLS
        assert mid_batch > KILLS // 2, f"only {mid_batch} of {KILLS} kills landed mid-batch"
        # recovery without an operator, promptly (m.recovered checked no other relay died)
        assert slowest.recovery_s <= MAX_RECOVERY_S, slowest.line()
        # duplicates only of rows in flight: at most the victim's batches per kill, each copy
        # once per kill
        assert worst.duplicates <= PER_KILL_DUPLICATES, worst.line()
        assert summary.duplicates <= KILLS * PER_KILL_DUPLICATES, summary.describe()
        assert summary.max_copies <= 1 + KILLS, summary.describe()
