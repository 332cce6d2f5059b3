"""Session fixtures of the fault matrix: a private 3-node Kafka cluster and a private toxiproxy.

Each pytest session gets its own (state under the session's temporary directory, a free block
of ports), started through ``deploy/local/cluster.sh`` and ``deploy/local/toxiproxy.sh`` when
a test first needs them and stopped at the end of the session, so that concurrent sessions and
the shared servers never interfere. A cluster or toxiproxy that cannot start FAILS the tests
that need it (never a skip).
"""

from __future__ import annotations

from collections.abc import Iterator

import cluster
import proxies
import pytest

from relay.tools import net


@pytest.fixture(scope="session")
def kafka_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cluster.Cluster]:
    """Three KRaft nodes (broker+controller), replication factor 3, min ISR 2."""
    c = cluster.Cluster(tmp_path_factory.mktemp("cluster"), cluster.free_port_block())
    up = c.sh("up")
    if up.returncode != 0:
        c.sh("down")
        pytest.fail(f"cluster.sh up exited {up.returncode}:\n{up.stdout}{up.stderr}", pytrace=False)
    try:
        yield c
    finally:
        c.sh("down")


@pytest.fixture(scope="session")
def toxiproxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[proxies.Toxiproxy]:
    """A toxiproxy server with no proxy; tests create theirs (tests/proxies.py)."""
    state = tmp_path_factory.mktemp("toxiproxy")
    port = net.free_port()
    env = {"OUTBOX_LOCAL_DIR": str(state), "OUTBOX_TOXIPROXY_PORT": str(port)}
    up = proxies.toxiproxy_sh("up", env=env)
    if up.returncode != 0:
        proxies.toxiproxy_sh("down", env=env)
        pytest.fail(
            f"toxiproxy.sh up exited {up.returncode}:\n{up.stdout}{up.stderr}", pytrace=False
        )
    try:
        yield proxies.Toxiproxy(port)
    finally:
        proxies.toxiproxy_sh("down", env=env)
