"""The store against the real MariaDB: migrate, shard locking, claim plans, the writer helper.

Design note criticisms shown impossible here:

* concurrent recovery: two transactions locking shards get disjoint shards and disjoint rows;
* full-table-scan recovery query: the claim, ready-shard and lock queries use their indexes, with
  no filesort, also with ~100k published rows in the table;
* event written outside the domain transaction: the writer helper never commits; its rows are
  invisible to others until the caller commits, and gone if the caller rolls back.
"""

from __future__ import annotations

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
    a, b, c = conns
    ready = await S.ready_shards(a)
    assert len(ready) == store.SHARDS  # 400 aggregates cover every shard
    await a.begin()
    await b.begin()
    await c.begin()
    shards_a = await S.lock_shards(a, ready, 16)
    shards_b = await S.lock_shards(b, ready, 16)
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
    shards_c = await S.lock_shards(c, ready, 64)
    assert set(shards_c) == set(ready) - set(shards_a) - set(shards_b)
    assert await S.lock_shards(c, ready, 64) == shards_c  # re-locking own shards is fine
    await c.rollback()
    # the first finishes: only its own rows become published
    await S.mark_published(a, [r.id for r in rows_a])
    await a.commit()
    await b.rollback()
    published = {m for m, s in (await helpers.statuses(settings)).items() if s == "published"}
    assert published == {r.message_id for r in rows_a}
    # b's shards are free again and their rows still new
    await b.begin()
    assert set(await S.lock_shards(b, ready, 64)) == set(ready)
    again = await S.claim_rows(b, ready, 1000, MAX_BYTES)
    assert {r.id for r in again} == {r.id for r in rows_b} | {
        r[0] for r in await _new_rows(settings)
    }
    await b.rollback()


async def _new_rows(settings: config.Settings) -> list[Any]:
    return await helpers.sql(settings, "SELECT id FROM outbox WHERE status = 'new'")


async def _claim_everything(conn: db.Connection) -> tuple[list[int], list[envelope.Row]]:
    """One claim of every ready shard (up to 64) and up to 1,000 rows, rolled back: the shards
    it locked, the rows it claimed."""
    ready = await S.ready_shards(conn)
    await conn.begin()
    shards = list(await S.lock_shards(conn, ready, 64))
    rows = await S.claim_rows(conn, shards, 1000, MAX_BYTES)
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


async def test_ready_shards_oldest_head_first_and_lock_wraps_around(
    settings: config.Settings, conns: list[db.Connection]
) -> None:
    # pick three aggregates in distinct shards and insert them newest-shard-first
    candidates: dict[int, str] = {}
    for i in range(200):
        rows = await helpers.sql(settings, "SELECT MOD(CRC32(%s), 64)", [f"w-{i}"])
        candidates.setdefault(int(rows[0][0]), f"w-{i}")
    high, mid, low = sorted(candidates)[-1], sorted(candidates)[32], sorted(candidates)[0]
    for shard in (mid, low, high):  # insertion order = head order
        await helpers.write(settings, helpers.event(candidates[shard]))
    conn = conns[0]
    ready = await S.ready_shards(conn)
    assert ready == [mid, low, high]
    await conn.begin()
    # from the oldest head (mid) upwards in shard order, then wrapping around to low
    assert list(await S.lock_shards(conn, ready, 2)) == [mid, high]
    await conn.rollback()
    await conn.begin()
    assert sorted(await S.lock_shards(conn, ready, 3)) == sorted([mid, high, low])  # all fit
    await conn.rollback()


async def test_uncommitted_rows_are_not_ready_nor_claimed(
    settings: config.Settings, mariadb: MariaDB, database: str, conns: list[db.Connection]
) -> None:
    """SKIP LOCKED passes over rows of a writer transaction that has not committed yet: their
    shard is not ready, and a claim of that shard (ready through a committed row of another
    aggregate) skips them although they are older."""
    shard = zlib.crc32(b"pending") % store.SHARDS
    neighbour = next(
        f"n-{i}" for i in itertools.count() if zlib.crc32(f"n-{i}".encode()) % store.SHARDS == shard
    )
    conn = conns[0]
    service_a = mariadb.connect(database, autocommit=False)
    try:
        with service_a.cursor() as cur:
            writer.OutboxWriter().add_sync(cur, helpers.event("pending"))
            assert await S.ready_shards(conn) == []  # the uncommitted row makes nothing ready
            await conn.rollback()
            await helpers.write(settings, helpers.event(neighbour))
            ready = await S.ready_shards(conn)
            assert ready == [shard]  # precondition: the pending row's shard is ready and claimed
            await conn.begin()
            claimed = await S.claim_rows(conn, ready, 100, MAX_BYTES)
            assert [r.aggregate_id for r in claimed] == [neighbour]
            await conn.rollback()
        service_a.commit()
    finally:
        service_a.close()
    ready = await S.ready_shards(conn)
    await conn.begin()
    claimed = await S.claim_rows(conn, ready, 100, MAX_BYTES)
    assert [r.aggregate_id for r in claimed] == ["pending", neighbour]
    await conn.rollback()


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
        ready = await S.ready_shards(conn)
        await conn.begin()
        (row,) = await S.claim_rows(conn, ready, 10, MAX_BYTES)
        await conn.rollback()
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


def _assert_indexed(name: str, plan: list[dict[str, Any]], table_key: dict[str, str]) -> None:
    """Each named table (alias) is read through the given index (``a|b``: either); no full
    scan, no filesort."""
    for step in plan:
        assert "filesort" not in (step["Extra"] or ""), (name, plan)
        if step["table"] in table_key:
            assert step["key"] in table_key[step["table"]].split("|"), (name, plan)
            assert step["type"] != "ALL", (name, plan)
    assert {s["table"] for s in plan} >= set(table_key), (name, plan)


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


PLAN_CHECKS: list[tuple[str, dict[str, object], dict[str, str]]] = [
    # (statement, parameters, {table or alias: index it must use}); none may sort
    ("claim_shard_heads", {"shard": 7, "limit": 500}, {"outbox": "ix_claim"}),
    (
        "claim_union",
        {"limit": 32, "max_bytes": 1 << 24, **{f"shard__{i}": i for i in range(16)}},
        {"outbox": "ix_claim", "o": "PRIMARY"},
    ),
    ("due_holds", {"shards": (1, 2, 3)}, {"outbox_hold": "ix_hold_due"}),
    ("holds_of", {"aggregate_ids": ("a", "b")}, {"outbox_hold": "PRIMARY"}),
    ("park_rows", {"ids": (1, 2, 3)}, {"outbox": "PRIMARY"}),
    (
        "unpark_aggregate",
        {"shard": 3, "aggregate_type": "order", "aggregate_id": "a"},
        {"outbox": "ix_claim|ix_clean"},  # either is a range over held rows only
    ),
    ("ready_shards", {}, {"o": "ix_claim", "s": "PRIMARY"}),
    ("lock_shards", {"shards": tuple(range(10, 40)), "limit": 16}, {"outbox_shard": "PRIMARY"}),
    ("backlog_oldest_age", {}, {"x": "ix_claim", "o": "PRIMARY"}),
    ("expired_ids", {"retention_us": 1, "limit": 1000}, {"outbox": "ix_clean"}),
    ("mark_published", {"ids": (1, 2, 3)}, {"outbox": "PRIMARY"}),
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
    for name, params, keys in PLAN_CHECKS:
        _assert_indexed(name, await _explain(conns[0], name, params), keys)


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
    await helpers.write(settings, helpers.event("w"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", pymysql.Warning)
        await S.prepare_session(conn, lock_wait_timeout_s=1.5)
        await S.ping(conn)
        assert "MariaDB" in await S.server_version(conn)
        ready = await S.ready_shards(conn)
        await conn.begin()
        shards = await S.lock_shards(conn, ready, 4)
        rows = await S.claim_rows(conn, list(shards), 10, MAX_BYTES)
        await S.mark_published(conn, [r.id for r in rows])
        await conn.commit()
        await S.backlog(conn, 10)
        await S.routing_of_new_rows(conn, 10)
        assert await S.delete_expired(conn, 0, 10) == 1


async def test_server_ends_a_silent_session_and_frees_its_shards(
    settings: config.Settings, conns: list[db.Connection]
) -> None:
    """A relay that goes silent inside a cycle (a network black hole) must not keep its shards
    until wait_timeout (8 h): the session's idle timeout ends it, and another claimer gets the
    shard. (The relay sets publish_timeout_s and half as much again; 2 s here.)"""
    silent = await db.connect(settings, autocommit=False)
    try:
        await S.prepare_session(silent, lock_wait_timeout_s=1, idle_timeout_s=2)
        assert list(await S.lock_shards(silent, [5], 1)) == [5]
        other = conns[0]
        assert await S.lock_shards(other, [5], 1) == {}  # owned by the silent session
        await other.rollback()
        started = time.monotonic()

        async def taken_over() -> bool:
            owned = await S.lock_shards(other, [5], 1)
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
