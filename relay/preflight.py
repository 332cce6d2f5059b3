"""Pre-flight checks behind `relay check`: database, grants, schema, Kafka and topics."""

from __future__ import annotations

import asyncio
import dataclasses

from relay import config, db, envelope, publisher, store


@dataclasses.dataclass(frozen=True)
class Result:
    name: str
    ok: bool
    detail: str


async def run(settings: config.Settings) -> list[Result]:
    results: list[Result] = []
    s = store.Store(settings.outbox.table)
    routes: list[tuple[str, str, str | None, str | None]] = []
    try:
        conn = await db.connect(settings, autocommit=False)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        results.append(Result("database", False, f"cannot connect: {type(exc).__name__}: {exc}"))
    else:
        try:
            results.append(Result("database", True, await s.server_version(conn)))
            results += await _schema(s, conn)
            if all(r.ok for r in results):
                results.append(await _grants(s, conn))
                routes = await s.routing_of_new_rows(conn, 10000)
        finally:
            db.close(conn)
    results += await _kafka(settings, routes)
    return results


async def _schema(s: store.Store, conn: db.Connection) -> list[Result]:
    columns = await s.columns(conn)
    if not columns:
        return [Result("schema", False, f"table {s.table!r} missing: run `relay migrate`")]
    missing = set(envelope.Row._fields) - {"event_us"} - columns
    indexes = await s.indexes(conn)
    missing_ix = store.EXPECTED_INDEXES - indexes
    shards = await s.shard_rows(conn)
    problems = []
    if missing:
        problems.append(f"missing columns {sorted(missing)}")
    if missing_ix:
        problems.append(f"missing indexes {sorted(missing_ix)}")
    if shards != store.SHARDS:
        problems.append(f"{shards} shard rows instead of {store.SHARDS}")
    if problems:
        return [Result("schema", False, "; ".join(problems) + ": run `relay migrate`")]
    return [Result("schema", True, f"table {s.table}, indexes {sorted(indexes)}")]


async def _grants(s: store.Store, conn: db.Connection) -> Result:
    """Exercise SELECT ... FOR UPDATE, UPDATE and DELETE in a transaction that is rolled back."""
    try:
        await conn.begin()
        ready = await s.ready_shards(conn)
        await s.lock_shards(conn, ready or [0], 1)
        await s.mark_published(conn, [0])
        await s.delete_expired(conn, 1e9, 1)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return Result("grants", False, f"{type(exc).__name__}: {exc}")
    finally:
        await conn.rollback()
    return Result("grants", True, "select, lock, update and delete allowed")


async def _kafka(
    settings: config.Settings, routes: list[tuple[str, str, str | None, str | None]]
) -> list[Result]:
    pub = publisher.Publisher(settings)
    try:
        async with asyncio.timeout(settings.kafka.request_timeout_s):
            await pub.start()
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        await pub.stop()
        return [Result("kafka", False, f"cannot connect: {type(exc).__name__}: {exc}")]
    try:
        results = [Result("kafka", True, f"connected to {settings.kafka.bootstrap_servers}")]
        formatter = envelope.Formatter.from_settings(settings)
        topics: set[str] = set()
        for aggregate_type, event_type, source_table, topic in routes:
            row = envelope.Row(
                0, "", aggregate_type, "", event_type, "u", None, None, None, None, topic,
                source_table, 0,
            )  # fmt: skip
            try:
                topics.add(formatter.topic(row))
            except envelope.PoisonRowError as exc:
                results.append(Result("topics", False, str(exc)))
        if settings.outbox.dead_letter_topic:
            topics.add(settings.outbox.dead_letter_topic)
        missing = await pub.missing_topics(topics)
        if missing:
            results.append(Result("topics", False, f"missing topics {sorted(missing)}"))
        else:
            results.append(Result("topics", True, f"{len(topics)} topic(s) in use exist"))
        return results
    finally:
        await pub.stop()
