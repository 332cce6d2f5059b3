"""The real servers behave as the relay relies on: idempotent Kafka produce, and SKIP LOCKED
claims on the relay's own outbox schema (``relay migrate``) through its shard locking."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pymysql
import pytest
import servers
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from integration import helpers
from servers import Kafka, MariaDB

from relay import db, preflight, queries, store

pytestmark = pytest.mark.integration

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


# ------------------------------------------- MariaDB: FOR UPDATE SKIP LOCKED on the relay's tables

S = store.Store(helpers.TABLE)
CLAIM_SHARDS = 5


async def _claim(conn: db.Connection, limit: int = CLAIM_SHARDS) -> set[int]:
    """Begin a cycle as a worker does: claim up to ``limit`` shards with new rows from shard 0
    up; the locks stay held."""
    await conn.begin()
    return set(await S.claim_shards(conn, 0, limit))


async def test_skip_locked_claims_are_disjoint(
    mariadb: MariaDB, kafka: Kafka, database: str
) -> None:
    settings = helpers.make_settings(mariadb, database, kafka.bootstrap)
    await helpers.migrate(settings)
    await helpers.write(settings, *(helpers.event(f"job-{i}") for i in range(200)))
    conns = [await db.connect(settings, autocommit=False) for _ in range(4)]
    c1, c2, c3, c4 = conns
    try:
        ready = await _claim(c1, store.SHARDS)  # every shard with new rows
        await c1.rollback()
        assert len(ready) > 3 * CLAIM_SHARDS  # 200 aggregates spread over the 64 shards

        # two transactions claim concurrently, a third while both still hold their locks
        first, second = await asyncio.gather(_claim(c1), _claim(c2))
        third = await _claim(c3)
        for claimed in (first, second, third):
            assert len(claimed) == CLAIM_SHARDS
            assert claimed <= ready
        assert first.isdisjoint(second)
        assert third.isdisjoint(first | second)

        # the claimed shard rows really are locked: a non-skipping locking read cannot take one
        await c4.begin()
        with pytest.raises(pymysql.err.OperationalError) as locked:
            async with c4.cursor() as cur:
                await cur.execute(
                    f"SELECT shard FROM {helpers.TABLE}_shard WHERE shard = %s FOR UPDATE NOWAIT",
                    (min(first),),
                )
        assert locked.value.args[0] == 1205  # ER_LOCK_WAIT_TIMEOUT (NOWAIT)
        await c4.rollback()

        # the first claimer ends without publishing: its shards are the first claimable again
        await c1.rollback()
        assert await _claim(c4) == first
        await c4.rollback()

        # the second marks its shards' rows published and commits: they are gone for good
        statement, params = queries.bind(
            f"SELECT id FROM {helpers.TABLE} WHERE status = 'new' AND shard IN %(shards)s",
            {"shards": sorted(second)},
        )
        async with c2.cursor() as cur:
            await cur.execute(statement, params)
            ids = [int(r[0]) for r in await cur.fetchall()]
        assert ids
        await S.mark_published(c2, ids, commit=True)
        await c3.rollback()
        remaining = await _claim(c1, store.SHARDS)
        await c1.rollback()
        assert remaining == ready - second
        again, rest = await _claim(c1), await _claim(c4)
        assert len(again) == len(rest) == CLAIM_SHARDS
        assert again.isdisjoint(rest)
        assert not (again | rest) & second
        await c1.rollback()
        await c4.rollback()
    finally:
        for conn in conns:
            db.close(conn)


# ------------------------------------------- the relay under test has README's grants, no more


async def test_the_tests_relay_user_has_only_the_readme_grants(
    mariadb: MariaDB, kafka: Kafka, database: str
) -> None:
    """The relay the tests run (``make_settings``, the e2e fleet's ``relay_user``) is the
    least-privilege user of deploy/local/servers.sh: after ``migrate`` it has exactly README's
    ("Grants") daemon grants on the test database and nothing global; `relay check`'s
    excess-privilege test finds nothing; it cannot create tables. Dropping the database takes
    its grants there away."""
    settings = helpers.make_settings(mariadb, database, kafka.bootstrap)
    assert (settings.db.user, mariadb.relay_user) == ("relay", "relay")
    assert mariadb.user != mariadb.relay_user  # the administrator seeds and inspects
    await helpers.migrate(settings)
    async with db.connection(settings) as conn:
        grants = await store.Store(helpers.TABLE).grants(conn)
        assert preflight.excess_privileges(grants) == []
        with pytest.raises(pymysql.err.OperationalError) as denied:
            async with conn.cursor() as cur:
                await cur.execute("CREATE TABLE scratch (id INT PRIMARY KEY)")
        assert denied.value.args[0] == 1142  # ER_TABLEACCESS_DENIED_ERROR
    ours = sorted(g.replace("`", "") for g in grants if f"`{database}`" in g)
    assert ours == sorted(
        f"GRANT {servers.RELAY_GRANTS[sfx]} ON {database}.outbox{sfx} TO relay@%"
        for sfx in queries.TABLE_SUFFIXES
    )
    assert [g.replace("`", "").split(" IDENTIFIED")[0] for g in grants if " *.* " in g] == [
        "GRANT USAGE ON *.* TO relay@%"
    ]
    # the whole user: README's grants, on outbox tables only, of the local `outbox` database
    # and of test databases (other tests running against this server at the same time have
    # theirs)
    for grant in grants:
        on = grant.partition(" ON ")[2].partition(" TO ")[0].replace("`", "")
        if on != "*.*":
            db_name, _, table = on.partition(".")
            assert db_name == "outbox" or db_name.startswith("outbox_t_"), grant
            assert table in {f"outbox{sfx}" for sfx in queries.TABLE_SUFFIXES}, grant
            sfx = table.removeprefix("outbox")
            assert grant.startswith(f"GRANT {servers.RELAY_GRANTS[sfx]} ON "), grant
    await preflight.verify(settings)  # and they are enough for `relay run`

    servers.drop_database(mariadb, database)
    left = servers.server_sql(
        mariadb, "SELECT COUNT(*) FROM mysql.tables_priv WHERE Db = %s", database
    )
    assert left == [(0,)]
