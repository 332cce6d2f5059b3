"""Fault matrix on the 3-node cluster: a broker that leads partitions dies (``kill -9``) in the
middle of the stream and comes back; the active controller dies and the quorum goes on with two.

Two relay processes (2 workers each) publish to a topic with replication factor 3 and min ISR 2
while writers commit 300 events/s. Each node death is one fault (it ends once the node is
dead: the cluster must carry on with two), its restart another (it ends once the node is back
in every ISR). For each: time to recover and duplicates (see tests/cluster.py), and at the end
nothing lost, nothing rolled back delivered, per-aggregate order of first deliveries kept.
"""

from __future__ import annotations

import collections
import contextlib
import time
from pathlib import Path

import cluster
import pytest
from servers import MariaDB

from relay.tools import polling

pytestmark = [pytest.mark.fault, pytest.mark.slow]

DOWN_S = 4.0  # the node stays dead this long after the backlog recovered without it


async def _kill_and_restart(
    m: cluster.Matrix, c: cluster.Cluster, node: int, role: str, *, controller: bool = False
) -> None:
    """Kill ``node`` mid-stream, recover without it, restart it, recover again. ``controller``:
    the node is the active controller, and the two others must elect another."""
    await _wait_publishing_moves(m)
    try:
        async with m.fault(f"{role} node {node} killed (kill -9)") as killed:
            await c.kill(node)
        if controller:
            elected: int | None = None

            async def new_leader() -> bool:
                nonlocal elected
                elected = await c.quorum_leader()
                return elected not in (None, node)

            await polling.wait_until(new_leader, "the quorum to elect another leader", 30, 0.2)
            killed.figures["new_controller"] = elected
            killed.figures["elected_after_s"] = round(time.monotonic() - killed.ended, 1)
        await m.recovered(killed)

        async def led_elsewhere() -> bool:
            leaders = await c.leaders(m.stage.topic)
            return all(leader not in (-1, node) for leader in leaders.values())

        await polling.wait_until(led_elsewhere, f"partitions led without node {node}", 30)
        down_until = time.monotonic() + DOWN_S
        await polling.wait_until(lambda: time.monotonic() >= down_until, "the downtime", 30)
    except BaseException:
        with contextlib.suppress(Exception):  # the next cases need the whole cluster
            await c.start(node)
        raise
    async with m.fault(f"node {node} restarted") as restarted:
        restarted.figures["back_in_isr_s"] = round(await c.start(node), 1)
    await m.recovered(restarted)


async def _wait_publishing_moves(m: cluster.Matrix) -> None:
    """Mid-stream: the relays' published counter rises between two scrapes."""
    before = await m.observer.published()

    async def moved() -> bool:
        now = await m.observer.published()
        return now is not None and before is not None and now > before

    await polling.wait_until(moved, "the published counter to move", 30)


async def test_partition_leader_killed_and_restarted(
    mariadb: MariaDB, kafka_cluster: cluster.Cluster, database: str, tmp_path: Path
) -> None:
    async with cluster.matrix("a-leader-kill9", mariadb, kafka_cluster, database, tmp_path) as m:
        leaders = collections.Counter((await kafka_cluster.leaders(m.stage.topic)).values())
        node, led = leaders.most_common(1)[0]
        await _kill_and_restart(m, kafka_cluster, node, f"leader of {led}/{cluster.PARTITIONS}")
        await m.finish("partition leader kill -9, restart")


async def test_controller_quorum_loses_its_leader(
    mariadb: MariaDB, kafka_cluster: cluster.Cluster, database: str, tmp_path: Path
) -> None:
    async with cluster.matrix(
        "e-controller-kill9", mariadb, kafka_cluster, database, tmp_path
    ) as m:
        node = await kafka_cluster.quorum_leader()
        assert node is not None, "the quorum has no leader"
        await _kill_and_restart(m, kafka_cluster, node, "active controller", controller=True)
        await m.finish("active controller kill -9, restart")
