"""A private MariaDB for faults that must not touch the shared server (``kill -9``).

Started with ``deploy/local/servers.sh up mariadb`` in a state dir and on a port of its own
(``OUTBOX_LOCAL_DIR``, ``OUTBOX_MARIADB_PORT``), with the same dev-only users as the shared
one; stopped and removed when the block exits::

    async with private_mariadb.server() as private:
        ...  # private.server is a MariaDB like the fixture's
        await private.kill()  # SIGKILL mariadbd, wait until it is gone
        await private.up()  # start again: InnoDB crash recovery

A server that cannot start raises RuntimeError: the test fails, never skips.
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
from servers import ADMIN_USER, SERVERS_SH, MariaDB

from relay.tools import polling


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


def port() -> int:
    """A free port below the ephemeral range: while the server is down (killed on purpose), no
    client connection can take it as its local port and keep the server from restarting."""
    return cluster.free_port_block(2) + 1


@contextlib.asynccontextmanager
async def server() -> AsyncIterator[PrivateMariaDB]:
    """A private MariaDB (short state path: its socket lives there); stopped and removed
    afterwards. Fails the test when it cannot start."""
    state = Path(tempfile.mkdtemp(prefix="fm-db-"))
    private = PrivateMariaDB(
        MariaDB("127.0.0.1", port(), ADMIN_USER, ADMIN_USER),  # dev-only credentials
        state,
    )
    try:
        await private.up()
        yield private
    finally:
        await asyncio.to_thread(private.sh, "down")
        shutil.rmtree(state, ignore_errors=True)
