"""Fault matrix on the 3-node cluster: a broker that leads partitions dies (``kill -9``) in the
middle of the stream and comes back; the active controller dies and the quorum goes on with two.

Two relay processes (2 workers each) publish to a topic with replication factor 3 and min ISR 2
while writers commit 300 events/s. Each node death is one fault (it ends once the node is
dead: the cluster must carry on with two), its restart another (it ends once the node is back
in every ISR); tests/chaos.py drives both. For each: time to recover and duplicates (see
tests/cluster.py), and at the end nothing lost, nothing rolled back delivered, per-aggregate
order of first deliveries kept.
"""

from __future__ import annotations

from pathlib import Path

import chaos
import cluster
import pytest
from servers import MariaDB

pytestmark = [pytest.mark.fault, pytest.mark.slow]


async def test_partition_leader_killed_and_restarted(
    mariadb: MariaDB, kafka_cluster: cluster.Cluster, database: str, tmp_path: Path
) -> None:
    async with cluster.matrix("a-leader-kill9", mariadb, kafka_cluster, database, tmp_path) as m:
        await chaos.leader_kill_and_restart(m, kafka_cluster)
        await m.finish("partition leader kill -9, restart")


async def test_controller_quorum_loses_its_leader(
    mariadb: MariaDB, kafka_cluster: cluster.Cluster, database: str, tmp_path: Path
) -> None:
    async with cluster.matrix(
        "e-controller-kill9", mariadb, kafka_cluster, database, tmp_path
    ) as m:
        node = await kafka_cluster.quorum_leader()
        assert node is not None, "the quorum has no leader"
        await chaos.kill_and_restart(m, kafka_cluster, node, "active controller", controller=True)
        await m.finish("active controller kill -9, restart")
