"""Fault matrix, relay -> Kafka through toxiproxy: a 5 s black hole, a reset every few seconds,
500 ms of latency.

Both relay processes reach the three brokers only through proxies (each broker's PROXIED
listener is advertised at its proxy's port, so clients stay on the proxies); Service B reads
directly. The brokers themselves are never touched. Per fault: time to recover and duplicates
(tests/cluster.py); at the end nothing lost, nothing rolled back delivered, order kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from pathlib import Path

import cluster
import harness
import proxies
import pytest
from servers import MariaDB

pytestmark = [pytest.mark.fault, pytest.mark.slow]

BLACK_HOLE_S = 5.0
RESETS = 4
RESET_EVERY_S = 3.0
RESET_HELD_S = 0.5  # connections made while the reset toxic is on are reset too
LATENCY_MS = 500
LATENCY_S = 8.0


async def black_hole(m: cluster.Matrix, brokers: proxies.ProxyGroup) -> None:
    name = f"relay->Kafka black hole {BLACK_HOLE_S:g} s"
    async with m.fault(name) as fault, brokers.black_hole():
        await harness.asyncio_sleep(BLACK_HOLE_S)  # the fault's length
    record = await m.recovered(fault)
    # the relays stayed on the proxies (metadata gave them the proxies' addresses)
    assert record.peak_age_s >= BLACK_HOLE_S - 1, record.line()


async def resets(m: cluster.Matrix, brokers: proxies.ProxyGroup) -> None:
    name = f"relay->Kafka connections reset every {RESET_EVERY_S:g} s, {RESETS} times"
    async with m.fault(name, count=RESETS) as fault:
        for index in range(RESETS):
            if index:
                await harness.asyncio_sleep(RESET_EVERY_S - RESET_HELD_S)  # between resets
            async with brokers.resetting():
                await harness.asyncio_sleep(RESET_HELD_S)  # the reset toxic stays this long
    await m.recovered(fault)


async def latency(m: cluster.Matrix, brokers: proxies.ProxyGroup) -> None:
    name = f"relay->Kafka +{LATENCY_MS} ms latency for {LATENCY_S:g} s"
    async with m.fault(name) as fault, brokers.latency(LATENCY_MS):
        await harness.asyncio_sleep(LATENCY_S)  # the fault's length
    await m.recovered(fault)


@dataclasses.dataclass(frozen=True)
class Case:
    case: str
    inject: Callable[[cluster.Matrix, proxies.ProxyGroup], Awaitable[None]]


CASES = [
    Case("b1-kafka-black-hole", black_hole),
    Case("b2-kafka-resets", resets),
    Case("b3-kafka-latency", latency),
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
            await m.finish(case.inject.__name__.replace("_", " "))
