"""Fault matrix: MariaDB killed with ``kill -9`` (crash recovery), not only restarted.

The shared MariaDB is never touched: the case starts a private instance
(tests/private_mariadb.py), holds the outbox, the domain tables and the writers' transactions
there, kills ``mariadbd`` with SIGKILL in the middle of the stream, keeps it down a moment and
starts it again (InnoDB crash recovery: tests/chaos.py), and stops it at the end. Writers
resolve the commits whose answer the crash swallowed; both relays must carry on without an
operator. Figures: time to recover, duplicates (tests/cluster.py); then nothing lost, nothing
rolled back delivered, order kept.
"""

from __future__ import annotations

from pathlib import Path

import chaos
import cluster
import private_mariadb
import pytest
from servers import create_database, unique_name

pytestmark = [pytest.mark.fault, pytest.mark.slow]


async def test_mariadb_killed_minus_nine(kafka_cluster: cluster.Cluster, tmp_path: Path) -> None:
    async with private_mariadb.server() as private:
        database = unique_name("outbox_t_")
        create_database(private.server, database)
        async with cluster.matrix(
            "d-mariadb-kill9", private.server, kafka_cluster, database, tmp_path
        ) as m:
            await chaos.mariadb_kill(m, private)
            await m.finish("MariaDB kill -9, crash recovery")
