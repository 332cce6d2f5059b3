"""Fixtures for the real MariaDB and Kafka servers (see deploy/local/servers.sh).

Session fixtures are synchronous on purpose (pytest-asyncio 1.x gives each test its own loop);
an unreachable server is a test FAILURE, never a skip.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

import pytest
import pytest_asyncio
import servers

from relay.tools import topics

S = TypeVar("S")


def _reachable(server: S, check: Callable[[S], None], name: str, address: str) -> S:
    problem = servers.ensure_reachable(server, check, name, address)
    if problem is not None:
        pytest.fail(problem, pytrace=False)
    return server


@pytest.fixture(scope="session")
def mariadb() -> servers.MariaDB:
    """The project's MariaDB (127.0.0.1:$OUTBOX_MARIADB_PORT, default 3307), started if needed."""
    server = servers.mariadb_from_env()
    return _reachable(server, servers.check_mariadb, "mariadb", server.address)


@pytest.fixture(scope="session")
def kafka() -> servers.Kafka:
    """The project's Kafka (127.0.0.1:$OUTBOX_KAFKA_PORT, default 19092), started if needed."""
    server = servers.kafka_from_env()
    return _reachable(server, servers.check_kafka, "kafka", server.bootstrap)


@pytest.fixture
def database(mariadb: servers.MariaDB) -> Iterator[str]:
    """A fresh, empty database ``outbox_t_<8 hex>``; dropped afterwards."""
    name = servers.unique_name("outbox_t_")
    servers.create_database(mariadb, name)
    try:
        yield name
    finally:
        servers.drop_database(mariadb, name)


@pytest_asyncio.fixture
async def topic(kafka: servers.Kafka) -> AsyncIterator[str]:
    """A fresh topic ``t_<8 hex>`` with 3 partitions (all with a leader); deleted afterwards."""
    name = servers.unique_name("t_")
    await topics.create(kafka.options, name, partitions=3)
    try:
        yield name
    finally:
        await topics.delete(kafka.options, [name])
