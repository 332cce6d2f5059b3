"""Fixtures for the real MariaDB and Kafka servers (see deploy/local/servers.sh).

Session fixtures are synchronous on purpose (pytest-asyncio 1.x gives each test its own loop);
an unreachable server is a test FAILURE, never a skip.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from servers import (
    Kafka,
    MariaDB,
    check_kafka,
    check_mariadb,
    create_database,
    create_topic,
    delete_topic,
    drop_database,
    ensure_reachable,
    kafka_from_env,
    mariadb_from_env,
    unique_name,
)


@pytest.fixture(scope="session")
def mariadb() -> MariaDB:
    """The project's MariaDB (127.0.0.1:$OUTBOX_MARIADB_PORT, default 3307), started if needed."""
    server = mariadb_from_env()
    problem = ensure_reachable(server, check_mariadb, "mariadb", server.address)
    if problem is not None:
        pytest.fail(problem, pytrace=False)
    return server


@pytest.fixture(scope="session")
def kafka() -> Kafka:
    """The project's Kafka (127.0.0.1:$OUTBOX_KAFKA_PORT, default 19092), started if needed."""
    server = kafka_from_env()
    problem = ensure_reachable(server, check_kafka, "kafka", server.bootstrap)
    if problem is not None:
        pytest.fail(problem, pytrace=False)
    return server


@pytest.fixture
def database(mariadb: MariaDB) -> Iterator[str]:
    """A fresh, empty database ``outbox_t_<8 hex>``; dropped afterwards."""
    name = unique_name("outbox_t_")
    create_database(mariadb, name)
    try:
        yield name
    finally:
        drop_database(mariadb, name)


@pytest_asyncio.fixture
async def topic(kafka: Kafka) -> AsyncIterator[str]:
    """A fresh topic ``t_<8 hex>`` with 3 partitions (all with a leader); deleted afterwards."""
    name = unique_name("t_")
    await create_topic(kafka.bootstrap, name, partitions=3)
    try:
        yield name
    finally:
        await delete_topic(kafka.bootstrap, name)
