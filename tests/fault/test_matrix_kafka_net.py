"""Fault matrix, relay -> Kafka through toxiproxy: a 5 s black hole, a reset every few seconds,
500 ms of latency.

Both relay processes reach the three brokers only through proxies (each broker's PROXIED
listener is advertised at its proxy's port, so clients stay on the proxies); Service B reads
directly. The brokers themselves are never touched; tests/chaos.py injects the faults. Per
fault: time to recover and duplicates (tests/cluster.py); at the end nothing lost, nothing
rolled back delivered, order kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from pathlib import Path

import chaos
import cluster
import proxies
import pytest
from servers import MariaDB

pytestmark = [pytest.mark.fault, pytest.mark.slow]


@dataclasses.dataclass(frozen=True)
class Case:
    case: str
    title: str
    inject: Callable[[cluster.Matrix, proxies.ProxyGroup], Awaitable[cluster.Record]]


CASES = [
    Case("b1-kafka-black-hole", "black hole", chaos.kafka_black_hole),
    Case("b2-kafka-resets", "resets", chaos.kafka_resets),
    Case("b3-kafka-latency", "latency", chaos.kafka_latency),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.case)
async def test_relay_to_kafka_network_fault(
    mariadb: MariaDB,
    kafka_cluster: cluster.Cluster,
    toxiproxy: proxies.Toxiproxy,
    database: str,
    tmp_path: Path,
    *,
    case: Case,
) -> None:
    async with proxies.group(toxiproxy, "broker", kafka_cluster.proxy_routes()) as brokers:
        through_proxies = {"kafka__bootstrap_servers": brokers.listen}
        async with cluster.matrix(
            case.case,
            mariadb,
            kafka_cluster,
            database,
            tmp_path,
            per_process=(through_proxies, through_proxies),
        ) as m:
            await case.inject(m, brokers)
            await m.finish(case.title)
