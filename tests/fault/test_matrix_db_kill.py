"""Fault matrix: MariaDB killed with ``kill -9`` (crash recovery), not only restarted.

The shared MariaDB is never touched: the case starts a private instance with
``deploy/local/servers.sh up mariadb`` (its own state dir and port: ``OUTBOX_LOCAL_DIR``,
``OUTBOX_MARIADB_PORT``), holds the outbox, the domain tables and the writers' transactions
there, kills ``mariadbd`` with SIGKILL in the middle of the stream, keeps it down a moment and
starts it again (InnoDB crash recovery), and stops it at the end. Writers resolve the commits
whose answer the crash swallowed; both relays must carry on without an operator. Figures: time
to recover, duplicates (tests/cluster.py); then nothing lost, nothing rolled back delivered,
order kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import cluster
import harness
import pytest
from servers import SERVERS_SH, MariaDB, create_database, unique_name

from relay.tools import net, polling

pytestmark = [pytest.mark.fault, pytest.mark.slow]

DOWN_S = 3.0  # the server stays dead this long


@dataclasses.dataclass(frozen=True)
class PrivateMariaDB:
    server: MariaDB
    state_dir: Path

    @property
    def env(self) -> dict[str, str]:
        return {
            "OUTBOX_LOCAL_DIR": str(self.state_dir),
            "OUTBOX_MARIADB_PORT": str(self.server.port),
        }

    def sh(self, action: str) -> subprocess.CompletedProcess[str]:
        """``servers.sh <action> mariadb`` for this instance (not checked)."""
        return subprocess.run(  # noqa: S603 - fixed argv, our own script
            ["bash", str(SERVERS_SH), action, "mariadb"],  # noqa: S607
            capture_output=True,
            text=True,
            timeout=300,
            env=os.environ | self.env,
            check=False,
        )

    async def up(self) -> float:
        """Start (or restart after a crash); the seconds until it answered."""
        started = time.monotonic()
        proc = await asyncio.to_thread(self.sh, "up")
        if proc.returncode != 0:
            raise RuntimeError(f"servers.sh up mariadb exited {proc.returncode}:\n{proc.stderr}")
        return time.monotonic() - started

    async def kill(self) -> None:
        """SIGKILL ``mariadbd`` and wait until it is gone."""
        pid = int((self.state_dir / "run" / "mariadb.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        await polling.wait_until(
            lambda: not Path(f"/proc/{pid}").exists(), "mariadbd to die", 30, 0.02
        )


@contextlib.asynccontextmanager
async def private_mariadb() -> AsyncIterator[PrivateMariaDB]:
    """A private MariaDB (short state path: its socket lives there); stopped and removed
    afterwards. Fails the test when it cannot start."""
    state = Path(tempfile.mkdtemp(prefix="fm-db-"))
    private = PrivateMariaDB(
        MariaDB("127.0.0.1", net.free_port(), "relay", "relay"),  # dev-only credentials
        state,
    )
    try:
        await private.up()
        yield private
    finally:
        await asyncio.to_thread(private.sh, "down")
        shutil.rmtree(state, ignore_errors=True)


async def test_mariadb_killed_minus_nine(kafka_cluster: cluster.Cluster, tmp_path: Path) -> None:
    async with private_mariadb() as private:
        database = unique_name("outbox_t_")
        create_database(private.server, database)
        async with cluster.matrix(
            "d-mariadb-kill9", private.server, kafka_cluster, database, tmp_path
        ) as m:
            async with m.fault("MariaDB killed (kill -9), restarted") as fault:
                await private.kill()
                await harness.asyncio_sleep(DOWN_S)  # the outage itself
                fault.figures["restart_s"] = round(await private.up(), 1)
            fault.figures["writers_unknown_commits"] = m.writers.stats.unknown_commits
            await m.recovered(fault)
            await m.finish("MariaDB kill -9, crash recovery")
