"""The store against the real MariaDB: migrate, shard locking, claim plans, the writer helper.

Design note criticisms shown impossible here:

* concurrent recovery: two transactions claiming shards get disjoint shards and disjoint rows,
  and a claim locks only the shard rows it returns (no outbox row, no shard it passed over);
* full-table-scan recovery query: the shard claim, the idle look and the row claim use their
  indexes, with no filesort, also with ~100k published rows in the table;
* event written outside the domain transaction: the writer helper never commits; its rows are
  invisible to others until the caller commits, and gone if the caller rolls back.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import time
import warnings
import zlib
from collections.abc import AsyncIterator
from typing import Any

import pymysql
import pytest
import pytest_asyncio
from integration import helpers
from servers import Kafka, MariaDB

from relay import config, db, envelope, queries, store, triage, writer

MAX_BYTES = 1 << 24

pytestmark = pytest.mark.integration

S = store.Store(helpers.TABLE)


@pytest_asyncio.fixture
async def settings(mariadb: MariaDB, kafka: Kafka, database: str) -> config.Settings:
    settings = helpers.make_settings(mariadb, database, kafka.bootstrap)
    await helpers.migrate(settings)
    return settings


@pytest_asyncio.fixture
async def conns(settings: config.Settings) -> AsyncIterator[list[db.Connection]]:
    """Three relay connections (READ COMMITTED, autocommit off), closed afterwards."""
    opened = [await db.connect(settings, autocommit=False) for _ in range(3)]
    try:
        yield opened
    finally:
        for conn in opened:
            db.close(conn)


async def shard_of(settings: config.Settings) -> dict[str, int]:
    rows = await helpers.sql(settings, "SELECT aggregate_id, shard FROM outbox")
    return {str(a): int(s) for a, s in rows}


async def test_migrate_is_idempotent_without_warnings(
    mariadb: MariaDB, kafka: Kafka, database: str
) -> None:
    settings = helpers.make_settings(mariadb, database, kafka.bootstrap)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await helpers.migrate(settings)
        await helpers.write(settings, helpers.event("a"))
        await helpers.migrate(settings)
    assert [str(w.message) for w in caught] == []
    conn = await db.connect(settings)
    try:
        assert await S.shard_rows(conn) == store.SHARDS
        assert await S.indexes(conn) == store.EXPECTED_INDEXES
        assert {"id", "shard", "status", "attempts", "published_at"} <= await S.columns(conn)
    finally:
        db.close(conn)
    assert list((await helpers.statuses(settings)).values()) == ["new"]  # data survives


async def test_shard_is_crc32_of_aggregate_id(settings: config.Settings) -> None:
    await helpers.write(settings, *(helpers.event(f"agg-{i}") for i in range(20)))
    for aggregate_id, shard in (await shard_of(settings)).items():
        rows = await helpers.sql(settings, "SELECT MOD(CRC32(%s), 64)", [aggregate_id])
        assert shard == rows[0][0]


async def test_concurrent_lockers_get_disjoint_shards_and_rows(
    settings: config.Settings, conns: list[db.Connection]
) -> None:
    """Concurrent recovery: two claimers never own the same shard or the same row."""
    await helpers.write(settings, *(helpers.event(f"agg-{i}", i) for i in range(400)))
    every = set(range(store.SHARDS))
    assert await _new_shards(settings) == every  # 400 aggregates cover every shard
    a, b, c = conns
    await a.begin()
    await b.begin()
    await c.begin()
    shards_a, shards_b = await asyncio.gather(S.claim_shards(a, 0, 16), S.claim_shards(b, 0, 16))
    assert len(shards_a) == len(shards_b) == 16
    assert not set(shards_a) & set(shards_b)
    rows_a = await S.claim_rows(a, list(shards_a), 1000, MAX_BYTES)
    rows_b = await S.claim_rows(b, list(shards_b), 1000, MAX_BYTES)
    assert rows_a
    # b's shards have ~100 new rows nobody else owns; a's claim must not hide them from b
    # (fails when a's claim scans ix_claim past its own shards and keeps those index records)
    assert rows_b, "b owns 16 shards with new rows yet claims nothing while a holds its claim"
    assert not {r.id for r in rows_a} & {r.id for r in rows_b}
    owner = await shard_of(settings)
    assert {owner[r.aggregate_id] for r in rows_a} <= set(shards_a)
    assert {owner[r.aggregate_id] for r in rows_b} <= set(shards_b)
    # a third takes what is left, without waiting on the locks held by the other two
    shards_c = await S.claim_shards(c, 0, store.SHARDS)
    assert set(shards_c) == every - set(shards_a) - set(shards_b)
    assert await S.claim_shards(c, 0, store.SHARDS) == shards_c  # re-claiming own shards is fine
    await c.rollback()
    # the first finishes: only its own rows become published
    await S.mark_published(a, [r.id for r in rows_a])
    await a.commit()
    await b.rollback()
    published = {m for m, s in (await helpers.statuses(settings)).items() if s == "published"}
    assert published == {r.message_id for r in rows_a}
    # b's shards are free again and their rows still new; a's shards have no new row left
    await b.begin()
    left = await S.claim_shards(b, 0, store.SHARDS)
    assert set(left) == every - set(shards_a) == await _new_shards(settings)
    again = await S.claim_rows(b, list(left), 1000, MAX_BYTES)
    assert {r.id for r in again} == {r.id for r in rows_b} | {
        r[0] for r in await _new_rows(settings)
    }
    await b.rollback()


async def _new_rows(settings: config.Settings) -> list[Any]:
    return await helpers.sql(settings, "SELECT id FROM outbox WHERE status = 'new'")


async def _new_shards(settings: config.Settings) -> set[int]:
    """The shards that have new rows, as the administrator sees them."""
    rows = await helpers.sql(settings, "SELECT DISTINCT shard FROM outbox WHERE status = 'new'")
    return {int(r[0]) for r in rows}


def _aggregate_in(shard: int, prefix: str = "a-") -> str:
    """An aggregate id of ``shard`` (the schema's ``CRC32(aggregate_id) % 64``)."""
    return next(
        f"{prefix}{i}"
        for i in itertools.count()
        if zlib.crc32(f"{prefix}{i}".encode()) % store.SHARDS == shard
    )


async def _claim_everything(conn: db.Connection) -> tuple[list[int], list[envelope.Row]]:
    """One claim of every shard with new rows (up to 64) and up to 1,000 rows, rolled back: the
    shards it locked, the rows it claimed."""
    await conn.begin()
    shards = list(await S.claim_shards(conn, 0, store.SHARDS))
    rows = await S.claim_rows(conn, shards, 1000, MAX_BYTES) if shards else []
    await conn.rollback()
    return shards, rows


async def test_claim_is_a_per_shard_prefix_in_id_order(
    settings: config.Settings, conns: list[db.Connection]
) -> None:
    # five aggregates, ten events each, interleaved
    await helpers.write(
        settings, *(helpers.event(f"agg-{a}", seq) for seq in range(10) for a in range(5))
    )
    conn = conns[0]
    shards, rows = await _claim_everything(conn)
    owner = await shard_of(settings)
    ids = [r.id for r in rows]
    assert ids == sorted(ids)  # the batch is in outbox order, hence in order per aggregate
    assert len(rows) == 50
    for a in range(5):
        seqs = [r.after_state for r in rows if r.aggregate_id == f"agg-{a}"]
        assert seqs == [f'{{"seq":{seq}}}' for seq in range(10)]
    # a limit takes the oldest rows of the first shard first
    await conn.begin()
    first = await S.claim_rows(conn, [min(shards)], 3, MAX_BYTES)
    await conn.rollback()
    oldest = sorted(r.id for r in rows if owner[r.aggregate_id] == min(shards))[:3]
    assert [r.id for r in first] == oldest


async def test_claim_goes_up_from_start_then_wraps_around_taking_only_shards_with_new_rows(
    settings: config.Settings, conns: list[db.Connection]
) -> None:
    """claim_shards takes shards from ``start`` up in shard order (not in the order their rows
    came), then wraps around to the shards below ``start`` when it is still short; a shard
    whose rows are all published is not taken, nor is any empty shard."""
    low, mid, done, high = 3, 20, 30, 40
    for shard in (high, low, mid):  # rows come newest shard first: the order plays no part
        await helpers.write(settings, helpers.event(_aggregate_in(shard)))
    (finished,) = await helpers.write(settings, helpers.event(_aggregate_in(done)))
    await helpers.sql(
        settings, "UPDATE outbox SET status = 'published' WHERE message_id = %s", [finished]
    )
    conn = conns[0]
    cases = [
        (0, store.SHARDS, [low, mid, high]),  # only the shards with new rows, in shard order
        (mid, 2, [mid, high]),  # from start up; full without wrapping around
        (mid, 3, [mid, high, low]),  # short: wraps around to the shards below start
        (mid + 1, 3, [high, low, mid]),
        (high + 1, store.SHARDS, [low, mid, high]),  # nothing from start up: all from below
        (mid, 1, [mid]),
    ]
    for start, limit, expected in cases:
        await conn.begin()
        owned = await S.claim_shards(conn, start, limit)
        await conn.rollback()
        assert list(owned.items()) == [(shard, 0) for shard in expected], (start, limit)


async def test_uncommitted_rows_are_neither_claimable_nor_claimed(
    settings: config.Settings, mariadb: MariaDB, database: str, conns: list[db.Connection]
) -> None:
    """SKIP LOCKED passes over rows of a writer transaction that has not committed yet: their
    shard is not claimable (and the idle look sees no work), and a claim of that shard
    (claimable through a committed row of another aggregate) skips them although they are
    older."""
    shard = zlib.crc32(b"pending") % store.SHARDS
    neighbour = _aggregate_in(shard, "n-")
    conn = conns[0]
    probe = await db.connect(settings)  # autocommit, as worker.Probe's
    service_a = mariadb.connect(database, autocommit=False)
    try:
        with service_a.cursor() as cur:
            writer.OutboxWriter().add_sync(cur, helpers.event("pending"))
            await conn.begin()
            assert await S.claim_shards(conn, 0, store.SHARDS) == {}  # the row makes no claim
            await conn.rollback()
            assert not await S.has_work(probe)
            await helpers.write(settings, helpers.event(neighbour))
            assert await S.has_work(probe)
            await conn.begin()
            owned = await S.claim_shards(conn, 0, store.SHARDS)
            assert list(owned) == [shard]  # precondition: the pending row's shard is claimed
            claimed = await S.claim_rows(conn, list(owned), 100, MAX_BYTES)
            assert [r.aggregate_id for r in claimed] == [neighbour]
            await conn.rollback()
        service_a.commit()
    finally:
        service_a.close()
        db.close(probe)
    await conn.begin()
    owned = await S.claim_shards(conn, 0, store.SHARDS)
    claimed = await S.claim_rows(conn, list(owned), 100, MAX_BYTES)
    assert [r.aggregate_id for r in claimed] == ["pending", neighbour]
    await conn.rollback()


async def _nowait(conn: db.Connection, statement: str, *args: object) -> list[tuple[Any, ...]]:
    """Run a locking read (``... NOWAIT``) on ``conn``; its rows."""
    async with conn.cursor() as cur:
        await cur.execute(statement, args or None)
        return list(await cur.fetchall())


LOCK_SHARD = "SELECT shard FROM outbox_shard WHERE shard = %s FOR UPDATE NOWAIT"


async def test_claim_locks_only_the_shard_rows_it_returns(
    settings: config.Settings, conns: list[db.Connection]
) -> None:
    """While a claim is held, the shard rows it did not return are free (those its scan read and
    rejected, the one past its limit, the ones it never reached), and so is every outbox row,
    its own shards' rows included: the subqueries are plain reads. Only the shard rows it
    returned are locked."""
    for shard in (10, 12, 13):
        await helpers.write(settings, *(helpers.event(_aggregate_in(shard), seq) for seq in (0, 1)))
    (finished,) = await helpers.write(settings, helpers.event(_aggregate_in(11)))
    await helpers.sql(
        settings, "UPDATE outbox SET status = 'published' WHERE message_id = %s", [finished]
    )
    a, b = conns[:2]
    await a.begin()
    owned = await S.claim_shards(a, 0, 2)
    assert list(owned) == [10, 12]  # shards 0 to 9 and 11 read and rejected; 13 past the limit
    await b.begin()
    for shard in (0, 9, 11, 13, 63):
        assert await _nowait(b, LOCK_SHARD, shard) == [(shard,)], shard
    new = await _nowait(b, "SELECT id FROM outbox WHERE status = 'new' FOR UPDATE NOWAIT")
    assert len(new) == 6  # through ix_claim, a's shards' rows included
    every = await _nowait(b, "SELECT shard FROM outbox FOR UPDATE NOWAIT")
    assert sorted(r[0] for r in every) == [10, 10, 11, 12, 12, 13, 13]  # through the primary key
    await b.rollback()
    await b.begin()
    for shard in owned:
        with pytest.raises(pymysql.err.OperationalError) as locked:
            await _nowait(b, LOCK_SHARD, shard)
        assert locked.value.args[0] == 1205, shard  # ER_LOCK_WAIT_TIMEOUT (NOWAIT)
    await b.rollback()
    await a.rollback()


async def _timed_hold(
    settings: config.Settings, aggregate_id: str, shard: int, retry_in_s: int
) -> None:
    """A timed hold of an aggregate of ``shard``, due in ``retry_in_s`` (negative: due), with the
    shard row counting it, as a worker leaves them (as the administrator)."""
    await helpers.sql(
        settings,
        "INSERT INTO outbox_hold (aggregate_type, aggregate_id, shard, kind, reason, retry_at)"
        " VALUES ('order', %s, %s, 'timed', 'test',"
        " TIMESTAMPADD(SECOND, %s, CURRENT_TIMESTAMP(6)))",
        [aggregate_id, shard, retry_in_s],
    )
    await helpers.sql(
        settings,
        "UPDATE outbox_shard SET holds = (SELECT COUNT(*) FROM outbox_hold WHERE shard = %s)"
        " WHERE shard = %s",
        [shard, shard],
    )


async def test_a_due_timed_hold_makes_its_shard_claimable_without_new_rows(
    settings: config.Settings, conns: list[db.Connection]
) -> None:
    """A shard whose timed hold is due is claimed (the worker opens the hold) though it has no
    new row, its rows being held; a shard whose timed hold is not due yet is not."""
    due, later = 7, 8
    for shard in (due, later):
        aggregate_id = _aggregate_in(shard, "h-")
        (held,) = await helpers.write(settings, helpers.event(aggregate_id))
        await helpers.sql(
            settings, "UPDATE outbox SET status = 'held' WHERE message_id = %s", [held]
        )
        await _timed_hold(settings, aggregate_id, shard, -60 if shard == due else 3600)
    conn = conns[0]
    for start in (0, due, due + 1):  # from below, at it, and wrapping around to it
        await conn.begin()
        assert await S.claim_shards(conn, start, store.SHARDS) == {due: 1}, start
        await conn.rollback()


async def _in_transaction(conn: db.Connection) -> bool:
    async with conn.cursor() as cur:
        await cur.execute("SELECT @@in_transaction")
        ((flag,),) = await cur.fetchall()
    return bool(flag)


async def _tables_free(settings: config.Settings) -> bool:
    """Whether the administrator can take the outbox and hold tables for writing within a
    second: not while a session's open transaction has read them (its metadata locks).
    (INFORMATION_SCHEMA.INNODB_TRX does not show such a read-only READ COMMITTED transaction
    on MariaDB.)"""
    conn = await db.connect(helpers.as_admin(settings))
    try:
        async with conn.cursor() as cur:
            await cur.execute("SET SESSION lock_wait_timeout = 1")
            try:
                await cur.execute("LOCK TABLES outbox WRITE, outbox_hold WRITE")
            except pymysql.err.OperationalError as exc:
                if exc.args[0] != 1205:  # ER_LOCK_WAIT_TIMEOUT
                    raise
                return False
            await cur.execute("UNLOCK TABLES")
            return True
    finally:
        db.close(conn)


async def test_has_work_sees_only_new_rows_and_due_holds_and_leaves_no_transaction(
    settings: config.Settings,
) -> None:
    """The idle look: nothing on an empty table, nor with only published, failed or held rows
    and holds not due; a new row or a due timed hold is work. On an autocommit connection it
    leaves no transaction open and no lock, not even a metadata lock (the same look without
    autocommit does leave both: the checks see them when they are there)."""
    probe = await db.connect(settings)  # autocommit, as worker.Probe's
    try:
        assert await S.has_work(probe) is False  # empty
        done, bad, held = await helpers.write(
            settings, helpers.event("p-1"), helpers.event("f-1"), helpers.event("h-1")
        )
        for message_id, status in ((done, "published"), (bad, "failed"), (held, "held")):
            await helpers.sql(
                settings,
                "UPDATE outbox SET status = %s WHERE message_id = %s",
                [status, message_id],
            )
        await _timed_hold(settings, "h-1", zlib.crc32(b"h-1") % store.SHARDS, 3600)
        assert await S.has_work(probe) is False  # no new row, no due hold
        (new,) = await helpers.write(settings, helpers.event("n-1"))
        assert await S.has_work(probe) is True
        await helpers.sql(
            settings, "UPDATE outbox SET status = 'published' WHERE message_id = %s", [new]
        )
        assert await S.has_work(probe) is False
        await helpers.sql(
            settings,
            "UPDATE outbox_hold SET retry_at = TIMESTAMPADD(SECOND, -1, CURRENT_TIMESTAMP(6))",
        )
        assert await S.has_work(probe) is True  # only a due timed hold
        assert not await _in_transaction(probe)
        assert await _tables_free(settings)
    finally:
        db.close(probe)
    conn = await db.connect(settings, autocommit=False)
    try:
        assert await S.has_work(conn) is True
        assert await _in_transaction(conn)
        assert not await _tables_free(settings)
    finally:
        db.close(conn)


async def test_mark_published_with_commit_publishes_and_frees_the_shards_at_once(
    settings: config.Settings, conns: list[db.Connection]
) -> None:
    """mark_published(commit=True), the common cycle's last call, commits: another session sees
    the rows published right after, and the claimer's shards are free again (another claim
    takes them), with no further call on the claimer's connection."""
    await helpers.write(
        settings, *(helpers.event(f"m-{i}", seq) for seq in range(3) for i in range(20))
    )
    a, b = conns[:2]
    await a.begin()
    owned = list(await S.claim_shards(a, 0, 4))
    rows = await S.claim_rows(a, owned, 4, MAX_BYTES)  # each shard's oldest row: all keep more
    assert len(owned) == len(rows) == 4
    await b.begin()
    assert not set(await S.claim_shards(b, 0, store.SHARDS)) & set(owned)  # a owns them
    await b.rollback()
    assert await S.mark_published(a, [r.id for r in rows], commit=True) == 4
    # nothing more on a: the rows are published for everyone, a's shards free
    published = {m for m, s in (await helpers.statuses(settings)).items() if s == "published"}
    assert published == {r.message_id for r in rows}
    await b.begin()
    assert set(owned) <= set(await S.claim_shards(b, 0, store.SHARDS))
    await b.rollback()
    await S.ping(a)  # and a is in step: both results of the round trip were read


def _count(mariadb: MariaDB, database: str) -> int:
    """Outbox rows as another session sees them."""
    ((count,),) = helpers.server_sql(mariadb, "SELECT COUNT(*) FROM outbox", database=database)
    return int(count)


async def test_writer_sync_never_commits(
    settings: config.Settings, mariadb: MariaDB, database: str
) -> None:
    """The event is written inside the domain transaction: visible only when the caller commits."""
    service_a = mariadb.connect(database, autocommit=False)
    try:
        with service_a.cursor() as cur:
            cur.execute("CREATE TABLE orders (id INT PRIMARY KEY, status VARCHAR(10))")
            service_a.commit()
            cur.execute("INSERT INTO orders VALUES (1, 'paid')")
            ids = writer.OutboxWriter().add_sync(cur, helpers.event("1"), helpers.event("1", 1))
            assert _count(mariadb, database) == 0
            service_a.rollback()
            assert _count(mariadb, database) == 0
            cur.execute("INSERT INTO orders VALUES (2, 'paid')")
            committed = writer.OutboxWriter().add_sync(cur, helpers.event("2"))
            assert _count(mariadb, database) == 0
        service_a.commit()
    finally:
        service_a.close()
    assert _count(mariadb, database) == 1
    current = await helpers.statuses(settings)
    assert set(current) == set(committed)
    assert not set(ids) & set(current)
    orders = await helpers.sql(settings, "SELECT id FROM orders")
    assert orders == [(2,)]  # the domain change and its event, together


async def test_writer_async_never_commits(
    settings: config.Settings, mariadb: MariaDB, database: str
) -> None:
    conn = await db.connect(helpers.as_admin(settings), autocommit=False)  # Service A, not relay
    try:
        async with conn.cursor() as cur:
            await writer.OutboxWriter().add(cur, helpers.event("x"))
        assert _count(mariadb, database) == 0
        await conn.rollback()
        assert _count(mariadb, database) == 0
        async with conn.cursor() as cur:
            await writer.OutboxWriter().add(cur, helpers.event("y"))
        assert _count(mariadb, database) == 0
        await conn.commit()
    finally:
        db.close(conn)
    assert _count(mariadb, database) == 1


async def test_writer_stores_event_time_in_utc(settings: config.Settings) -> None:
    when = datetime.datetime(
        2024, 1, 2, 3, 4, 5, 678901, tzinfo=datetime.timezone(datetime.timedelta(hours=-5))
    )
    await helpers.write(settings, helpers.event("t", event_time=when))
    conn = await db.connect(settings, autocommit=False)
    try:
        _, (row,) = await _claim_everything(conn)
    finally:
        db.close(conn)
    assert row.event_us == int(when.timestamp() * 1_000_000)


async def test_mark_failed_note_attempt_and_replay(
    settings: config.Settings, conns: list[db.Connection]
) -> None:
    ids = await helpers.write(settings, *(helpers.event(f"r-{i}") for i in range(4)))
    rows = await helpers.rows_by_message_id(settings)
    row_ids = [rows[m]["id"] for m in ids]
    conn = conns[0]
    await S.mark_failed(conn, row_ids[0], "too_large: " + "x" * 5000)
    await S.mark_failed(conn, row_ids[1], "bad_headers: nope")
    await S.note_attempt(conn, [row_ids[2]], "KafkaTimeoutError")
    await conn.commit()
    rows = await helpers.rows_by_message_id(settings)
    assert [rows[m]["status"] for m in ids] == ["failed", "failed", "new", "new"]
    assert len(rows[ids[0]]["last_error"]) == 1024
    assert rows[ids[2]]["attempts"] == 1
    assert rows[ids[2]]["last_error"] == "KafkaTimeoutError"
    # replay by id: only that row
    assert (await triage.replay(settings, [row_ids[1]], 100)).changed == 1
    rows = await helpers.rows_by_message_id(settings)
    assert [rows[m]["status"] for m in ids] == ["failed", "new", "new", "new"]
    assert rows[ids[1]]["last_error"] is None
    # replay all failed
    assert (await triage.replay(settings, None, 100)).changed == 1
    assert set((await helpers.statuses(settings)).values()) == {"new"}
    assert (await triage.replay(settings, None, 100)).changed == 0


async def test_backlog(settings: config.Settings, conns: list[db.Connection]) -> None:
    conn = conns[0]
    assert await S.backlog(conn, 1000) == store.Backlog(0, 0.0, 0, 0, {})
    ids = await helpers.write(settings, *(helpers.event(f"b-{i}") for i in range(5)))
    rows = await helpers.rows_by_message_id(settings)
    await S.mark_failed(conn, rows[ids[0]]["id"], "bad_row: x")
    await S.park(conn, [rows[ids[1]]["id"]])
    await S.add_hold(
        conn, ("order", "b-1"), 0, kind="poison", failed_id=1, reason="x", retry_in_s=None,
        exists=False,
    )  # fmt: skip
    await conn.commit()
    backlog = await S.backlog(conn, 1000)
    assert (backlog.new, backlog.failed, backlog.held, backlog.holds) == (3, 1, 1, {"poison": 1})
    assert backlog.oldest_age_s >= 0.0
    assert (await S.backlog(conn, 2)).new == 2  # capped


# ------------------------------------------------------------------ query plans


async def _explain(
    conn: db.Connection, name: str, params: dict[str, object]
) -> list[dict[str, Any]]:
    if name == "claim_union":  # the statement claim_rows really runs for 16 shards
        heads = queries.union_all(S.sql["claim_shard_heads"], "shard", 16)
        sql, bound = S.sql["claim_rows"].replace("{candidates}", heads), dict(params)
    else:
        sql, bound = queries.bind(S.sql[name], params)
    async with conn.cursor() as cur:
        await cur.execute("EXPLAIN " + sql, bound)
        columns = [d[0] for d in cur.description]
        return [dict(zip(columns, row, strict=True)) for row in await cur.fetchall()]


def _assert_indexed(
    name: str,
    plan: list[dict[str, Any]],
    table_key: dict[str, str],
    select_types: dict[str, str] | None = None,
) -> None:
    """Each named table (alias) is read through the given index (``a|b``: either); no full
    scan, no filesort; and a table of ``select_types`` is read by a step of that kind (e.g. a
    DEPENDENT SUBQUERY: one dive per outer row, not a MATERIALIZED scan of the whole range)."""
    for step in plan:
        assert "filesort" not in (step["Extra"] or ""), (name, plan)
        if step["table"] in table_key:
            assert step["key"] in table_key[step["table"]].split("|"), (name, plan)
            assert step["type"] != "ALL", (name, plan)
        if select_types and step["table"] in select_types:
            assert step["select_type"] == select_types[step["table"]], (name, plan)
    assert {s["table"] for s in plan} >= set(table_key) | set(select_types or {}), (name, plan)


async def _fill_published(settings: config.Settings, rows: int) -> None:
    """About ``rows`` published rows, inserted fast by doubling; then fresh statistics."""
    await helpers.sql(
        settings,
        "INSERT INTO outbox (message_id, aggregate_type, aggregate_id, event_type, status,"
        " published_at) SELECT UUID(), 'order', CONCAT('p-', seq), 'E', 'published',"
        " CURRENT_TIMESTAMP(6) FROM seq_1_to_1000",
    )
    total = 1000
    while total < rows:
        await helpers.sql(
            settings,
            "INSERT INTO outbox (message_id, aggregate_type, aggregate_id, event_type, status,"
            " published_at) SELECT UUID(), aggregate_type, CONCAT(aggregate_id, '-', id),"
            " event_type, 'published', published_at FROM outbox WHERE status = 'published'",
        )
        total *= 2
    await helpers.sql(settings, "ANALYZE TABLE outbox")


DEPENDENT = "DEPENDENT SUBQUERY"

PLAN_CHECKS: list[tuple[str, dict[str, object], dict[str, str], dict[str, str]]] = [
    # (statement, parameters, {table or alias: index it must use}, {table or alias: the kind
    # of step reading it}); none may sort
    (
        "claim_shards",
        {"low": 0, "high": store.SHARDS, "limit": 16},
        {"s": "PRIMARY", "o": "ix_claim", "h": "ix_hold_due|ix_hold_shard"},
        {"o": DEPENDENT, "h": DEPENDENT},
    ),
    (
        "claim_shards",  # the wrap-around statement
        {"low": 0, "high": 20, "limit": 4},
        {"s": "PRIMARY", "o": "ix_claim", "h": "ix_hold_due|ix_hold_shard"},
        {"o": DEPENDENT, "h": DEPENDENT},
    ),
    # one dive each: EXISTS stops at the first entry of status 'new' of either index
    ("has_work", {}, {"outbox": "ix_claim|ix_clean", "outbox_hold": "ix_hold_due"}, {}),
    ("claim_shard_heads", {"shard": 7, "limit": 500}, {"outbox": "ix_claim"}, {}),
    (
        "claim_union",
        {"limit": 32, "max_bytes": 1 << 24, **{f"shard__{i}": i for i in range(16)}},
        {"outbox": "ix_claim", "o": "PRIMARY"},
        {},
    ),
    ("due_holds", {"shards": (1, 2, 3)}, {"outbox_hold": "ix_hold_due"}, {}),
    ("holds_of", {"aggregate_ids": ("a", "b")}, {"outbox_hold": "PRIMARY"}, {}),
    ("park_rows", {"ids": (1, 2, 3)}, {"outbox": "PRIMARY"}, {}),
    (
        "unpark_aggregate",
        {"shard": 3, "aggregate_type": "order", "aggregate_id": "a"},
        {"outbox": "ix_claim|ix_clean"},  # either is a range over held rows only
        {},
    ),
    ("backlog_oldest_age", {}, {"x": "ix_claim", "o": "PRIMARY"}, {}),
    ("expired_ids", {"retention_us": 1, "limit": 1000}, {"outbox": "ix_clean"}, {}),
    ("mark_published", {"ids": (1, 2, 3)}, {"outbox": "PRIMARY"}, {}),
]


@pytest.mark.parametrize("published_rows", [0, 100_000], ids=["empty", "100k-published"])
async def test_hot_queries_use_their_indexes(
    settings: config.Settings, conns: list[db.Connection], published_rows: int
) -> None:
    """Recovery is never a full table scan: not with an empty table, not with 100k rows done."""
    if published_rows:
        await _fill_published(settings, published_rows)
    await helpers.write(settings, *(helpers.event(f"n-{i}") for i in range(300)))
    await helpers.sql(settings, "ANALYZE TABLE outbox")
    count = await helpers.sql(settings, "SELECT COUNT(*) FROM outbox")
    assert count[0][0] >= published_rows + 300
    for name, params, keys, kinds in PLAN_CHECKS:
        _assert_indexed(name, await _explain(conns[0], name, params), keys, kinds)


@pytest.mark.slow
async def test_claim_returns_only_new_rows_among_many_published(
    settings: config.Settings, conns: list[db.Connection]
) -> None:
    await _fill_published(settings, 100_000)
    ids = await helpers.write(settings, *(helpers.event(f"n-{i}") for i in range(50)))
    _, rows = await _claim_everything(conns[0])
    assert {r.message_id for r in rows} == set(ids)


async def test_statements_raise_no_server_warnings(
    settings: config.Settings, conns: list[db.Connection]
) -> None:
    """filterwarnings=error turns MySQL warnings into failures; exercise every relay statement."""
    conn = conns[0]
    await helpers.write(settings, helpers.event("w"), helpers.event("w", 1))
    probe = await db.connect(settings)  # autocommit, as worker.Probe's
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pymysql.Warning)
            await S.prepare_session(conn, lock_wait_timeout_s=1.5)
            await S.ping(conn)
            assert "MariaDB" in await S.server_version(conn)
            assert await S.has_work(probe)
            await conn.begin()
            shards = await S.claim_shards(conn, 1, 4)  # and its wrap-around statement
            rows = await S.claim_rows(conn, list(shards), 10, MAX_BYTES)
            assert len(rows) == 2
            await S.mark_published(conn, [rows[0].id])
            await S.mark_published(conn, [rows[1].id], commit=True)
            await S.backlog(conn, 10)
            await S.routing_of_new_rows(conn, 10)
            assert await S.delete_expired(conn, 0, 10) == 2
    finally:
        db.close(probe)


async def test_server_ends_a_silent_session_and_frees_its_shards(
    settings: config.Settings, conns: list[db.Connection]
) -> None:
    """A relay that goes silent inside a cycle (a network black hole) must not keep its shards
    until wait_timeout (8 h): the session's idle timeout ends it, and another claimer gets the
    shard. (The relay sets publish_timeout_s and half as much again; 2 s here.)"""
    await helpers.write(settings, helpers.event(_aggregate_in(5)))  # claim_shards wants work
    silent = await db.connect(settings, autocommit=False)
    try:
        await S.prepare_session(silent, lock_wait_timeout_s=1, idle_timeout_s=2)
        assert list(await S.claim_shards(silent, 5, 1)) == [5]
        other = conns[0]
        assert await S.claim_shards(other, 5, 1) == {}  # owned by the silent session
        await other.rollback()
        started = time.monotonic()

        async def taken_over() -> bool:
            owned = await S.claim_shards(other, 5, 1)
            if not owned:
                await other.rollback()
            return bool(owned)

        await helpers.wait_until(taken_over, "the silent session's shard", timeout_s=30)
        waited_s = time.monotonic() - started
        await other.rollback()
        assert 1.0 < waited_s < 10.0, waited_s  # ended by the server, not by us
    finally:
        db.close(silent)


async def test_writer_async_sends_binary_payloads(settings: config.Settings) -> None:
    """aiomysql with PyMySQL 1.2 could not bind bytes (pyproject pins PyMySQL below 1.2)."""
    blob = bytes(range(256))
    (message_id,) = await helpers.write(settings, helpers.event("bin", payload=blob))
    rows = await helpers.sql(
        settings, "SELECT payload FROM outbox WHERE message_id = %s", [message_id]
    )
    assert rows == [(blob,)]
