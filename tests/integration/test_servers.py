"""The real servers behave as the relay relies on: idempotent Kafka produce, SKIP LOCKED claims."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import aiomysql
import pymysql
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from servers import Kafka, MariaDB

pytestmark = pytest.mark.integration

CLAIM = "SELECT id FROM jobs WHERE done = 0 ORDER BY id LIMIT 5 FOR UPDATE SKIP LOCKED"

Record = tuple[int, bytes, bytes]  # (offset, key, value)


async def test_idempotent_producer_round_trip(kafka: Kafka, topic: str) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap, enable_idempotence=True, acks="all"
    )
    await producer.start()
    try:
        futures = []
        for i in range(100):
            key, value = f"key-{i % 17}".encode(), f"value-{i}".encode()
            futures.append((key, value, await producer.send(topic, value=value, key=key)))
        sent: dict[int, list[Record]] = defaultdict(list)
        partition_of_key: dict[bytes, int] = {}
        for key, value, fut in futures:
            meta = await fut
            sent[meta.partition].append((meta.offset, key, value))
            # the same key always lands on the same partition
            assert partition_of_key.setdefault(key, meta.partition) == meta.partition
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap, group_id=None, enable_auto_commit=False
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(3)]  # the topic fixture has 3 partitions
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        received: dict[int, list[Record]] = defaultdict(list)
        async with asyncio.timeout(30):
            while sum(len(v) for v in received.values()) < 100:
                batches = await consumer.getmany(*tps, timeout_ms=1000)
                for tp, records in batches.items():
                    received[tp.partition].extend(
                        (r.offset, r.key or b"", r.value or b"") for r in records
                    )
        end_offsets = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()

    # exactly what was sent, in per-partition order, nothing extra
    assert set(sent) <= {0, 1, 2}
    assert len(sent) > 1, "17 distinct keys should spread over more than one partition"
    assert dict(received) == dict(sent)
    for tp in tps:
        offsets = [offset for offset, _, _ in received[tp.partition]]
        assert offsets == sorted(offsets)
        assert end_offsets[tp] == (offsets[-1] + 1 if offsets else 0)
    assert sum(len(v) for v in received.values()) == 100


# ---------------------------------------------------------------- MariaDB: FOR UPDATE SKIP LOCKED


async def _connect(mariadb: MariaDB, database: str) -> aiomysql.Connection:
    conn = await aiomysql.connect(
        host=mariadb.host,
        port=mariadb.port,
        user=mariadb.user,
        password=mariadb.password,
        db=database,
        autocommit=False,
    )
    async with conn.cursor() as cur:
        await cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
        await cur.execute("SELECT @@tx_isolation")
        assert await cur.fetchone() == ("READ-COMMITTED",)
    return conn


async def _claim(conn: aiomysql.Connection) -> set[int]:
    """Start a transaction and claim up to 5 pending jobs; the row locks stay held."""
    await conn.begin()
    async with conn.cursor() as cur:
        await cur.execute(CLAIM)
        return {int(row[0]) for row in await cur.fetchall()}


async def test_skip_locked_claims_are_disjoint(mariadb: MariaDB, database: str) -> None:
    with mariadb.connect(database) as setup, setup.cursor() as cur:
        cur.execute(
            "CREATE TABLE jobs (id INT PRIMARY KEY AUTO_INCREMENT,"
            " done TINYINT NOT NULL DEFAULT 0) ENGINE=InnoDB"
        )
        cur.executemany("INSERT INTO jobs (done) VALUES (%s)", [(0,)] * 20)

    conns = [await _connect(mariadb, database) for _ in range(4)]
    c1, c2, c3, c4 = conns
    try:
        # two transactions claim concurrently, a third while both still hold their locks
        first, second = await asyncio.gather(_claim(c1), _claim(c2))
        third = await _claim(c3)
        for claimed in (first, second, third):
            assert len(claimed) == 5
        assert first.isdisjoint(second)
        assert third.isdisjoint(first | second)
        assert first | second | third == set(range(1, 16))  # lowest pending ids, none skipped twice

        # the claimed rows really are locked: a non-skipping locking read cannot take one
        async with c4.cursor() as cur:
            await c4.begin()
            with pytest.raises(pymysql.err.OperationalError) as locked:
                await cur.execute(f"SELECT id FROM jobs WHERE id = {min(first)} FOR UPDATE NOWAIT")
            assert locked.value.args[0] == 1205  # ER_LOCK_WAIT_TIMEOUT (NOWAIT)
            await c4.rollback()

        # the first claimer finishes without marking its rows done: they are claimable again
        await c1.rollback()
        assert await _claim(c4) == first
        await c4.rollback()

        # the second marks its rows done and commits: they are gone for good; the third rolls back
        async with c2.cursor() as cur:
            ids = ",".join(str(i) for i in sorted(second))
            await cur.execute(f"UPDATE jobs SET done = 1 WHERE id IN ({ids})")
        await c2.commit()
        await c3.rollback()
        again = await _claim(c1)
        assert again == first  # lowest pending ids again; second's rows are done
        rest = await _claim(c4)
        assert rest == third
        await c1.rollback()
        await c4.rollback()
    finally:
        for conn in conns:
            await conn.ensure_closed()
