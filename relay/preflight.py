"""Pre-flight checks behind `relay check`: database, grants, schema, Kafka and topics."""

from __future__ import annotations

import asyncio
import dataclasses

import aiokafka.errors
import structlog

from relay import config, db, envelope, errors, publisher, queries, store

log = structlog.get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class Result:
    name: str
    ok: bool
    detail: str
    warn: bool = False  # ok, but worth a look (printed as "warn")
    config: bool = False  # failed on a setting (a certificate file that cannot be loaded)

    @property
    def exit_code(self) -> int:
        """What a failed check means in the error table: a bad setting (78), missing (4) or
        unavailable (3)."""
        if self.ok:
            return errors.ExitCode.OK
        if self.config:
            return errors.ExitCode.CONFIG
        if self.name in ("schema", "grants"):
            return errors.ExitCode.MISSING
        return errors.ExitCode.UNAVAILABLE


async def run(settings: config.Settings) -> list[Result]:
    """Every check, for ``relay check``: none raises; each says what it found."""
    results: list[Result] = []
    s = store.Store(settings.outbox.table)
    routes: list[tuple[str, str, str | None, str | None]] = []
    try:
        async with db.connection(settings, autocommit=False) as conn:
            results.append(Result("database", True, await s.server_version(conn)))
            problems = await schema_problems(s, conn)
            results.append(Result("schema", not problems, "; ".join(problems) or _schema_ok(s)))
            if not problems:
                problems = await grant_problems(s, conn)
                detail = "; ".join(problems) or "every statement the relay runs is allowed"
                results.append(Result("grants", not problems, detail))
                if "published_at_default" in await s.missing_upgrades(conn):
                    detail = (
                        "published_at has no default: run `relay migrate` (metadata only) so"
                        " that the mark updates rows in place (~40% less database CPU per mark)"
                    )
                    results.append(Result("upgrade", True, detail, warn=True))
                excess = excess_privileges(await s.grants(conn))
                if excess:
                    detail = f"more than the relay needs: {'; '.join(excess)}"
                    results.append(Result("privileges", True, detail, warn=True))
                routes = await s.routing_of_new_rows(conn, 10000)
    except Exception as exc:
        if errors.classify(exc) is errors.Kind.BUG:
            raise
        what = "lost during the checks" if results else "cannot connect"
        results.append(Result("database", False, f"{what}: {errors.one_line(exc)}"))
    results += await _kafka(settings, routes)
    return results


async def verify(settings: config.Settings) -> None:
    """Start-up check of ``relay run``: raise MissingError naming what is missing.

    Connection failures propagate as they are (the caller retries them).
    """
    s = store.Store(settings.outbox.table)
    async with db.connection(settings, autocommit=False) as conn:
        problems = await schema_problems(s, conn)
        if not problems:
            problems = await grant_problems(s, conn)
    if problems:
        raise errors.MissingError("; ".join(problems))


# Privileges no relay needs; least privilege is in README.md ("Grants").
EXCESS = ("ALL PRIVILEGES", "SUPER", "FILE", "PROCESS", "SHUTDOWN", "CREATE USER", "RELOAD")


def excess_privileges(grants: list[str]) -> list[str]:
    """What in the user's GRANT statements goes beyond what the relay needs."""
    found: list[str] = []
    for grant in grants:
        upper = grant.upper()
        on = upper.partition(" ON ")[2].partition(" TO ")[0].strip()
        found += [f"{name} ON {on}" for name in EXCESS if f"GRANT {name}" in upper
                  or f", {name}" in upper]  # fmt: skip
        if "WITH GRANT OPTION" in upper:
            found.append(f"GRANT OPTION ON {on}")
    return found


def _schema_ok(s: store.Store) -> str:
    return f"table {s.table}, schema version {store.SCHEMA_VERSION}"


async def schema_problems(s: store.Store, conn: db.Connection) -> list[str]:
    """What is missing or unknown in the schema, each with the fix."""
    tables = await s.existing_tables(conn)
    if s.table not in tables:
        return [f"table {s.table!r} missing: run `relay migrate`"]
    version = await s.schema_version(conn)
    if version is None:
        return [f"schema version 1: run `relay migrate` to upgrade to {store.SCHEMA_VERSION}"]
    if version > store.SCHEMA_VERSION:
        return [
            f"schema version {version} is newer than this relay knows ({store.SCHEMA_VERSION}):"
            " upgrade the relay"
        ]
    problems = []
    if version < store.SCHEMA_VERSION:
        problems.append(f"schema version {version}: run `relay migrate`")
    missing_tables = {s.table + sfx for sfx in queries.TABLE_SUFFIXES} - tables
    if missing_tables:
        problems.append(f"missing tables {sorted(missing_tables)}: run `relay migrate`")
        return problems
    missing = set(envelope.Row._fields) - {"event_us"} - await s.columns(conn)
    missing_ix = store.EXPECTED_INDEXES - await s.indexes(conn)
    shards = await s.shard_rows(conn)
    if missing:
        problems.append(f"missing columns {sorted(missing)}: run `relay migrate`")
    if missing_ix:
        problems.append(f"missing indexes {sorted(missing_ix)}: run `relay migrate`")
    if shards != store.SHARDS:
        problems.append(f"{shards} shard rows instead of {store.SHARDS}: run `relay migrate`")
    return problems


async def grant_problems(s: store.Store, conn: db.Connection) -> list[str]:
    """Run each kind of statement the relay runs, in a transaction that is rolled back.

    Row id 0 and an impossible aggregate never match a row, but the server checks the
    privilege of every statement all the same.
    """
    key = ("\x00relay-check", "\x00")
    steps = [
        ("locking read (SELECT ... FOR UPDATE) on the shard table, reading the outbox and"
         " hold tables", s.claim_shards(conn, 0, 1)),
        ("SELECT on the hold table", s.holds_of(conn, {key})),
        ("UPDATE on the outbox table", s.mark_published(conn, [0])),
        ("INSERT on the hold table", s.add_hold(
            conn, key, 0, kind="timed", failed_id=None, reason="check", retry_in_s=1.0,
            exists=False,
        )),
        ("UPDATE on the hold table", s.add_hold(
            conn, key, 0, kind="timed", failed_id=None, reason="check", retry_in_s=1.0,
            exists=True,
        )),
        ("DELETE on the hold table", s.drop_hold(conn, key)),
        ("UPDATE on the outbox table (holds)", s.park(conn, [0])),
        ("UPDATE on the shard table", s.count_holds(conn, 0)),
        ("DELETE on the outbox table", s.delete_ids(conn, [0])),
    ]  # fmt: skip
    problems = []
    try:
        for what, step in steps:
            try:
                await step
            except Exception as exc:
                if errors.mysql_errno(exc) not in errors.MYSQL_DENIED:
                    raise
                problems.append(f"{what} denied ({errors.one_line(exc)})")
    finally:
        for _, step in steps:
            step.close()  # the steps not awaited after a failure
        await conn.rollback()
    return problems


async def _kafka_cause(settings: config.Settings, exc: Exception) -> str:
    """aiokafka says only "Unable to bootstrap": ask the servers why (TLS, SASL) when it can."""
    detail = errors.one_line(exc)
    if isinstance(exc, aiokafka.errors.KafkaConnectionError):
        try:
            async with asyncio.timeout(settings.kafka.request_timeout_s):
                detail = await publisher.connect_problem(settings.kafka) or detail
        except Exception as probe:  # noqa: BLE001 - the first error still says enough
            log.debug("kafka_probe_failed", error=errors.one_line(probe))
    return detail


async def _kafka(
    settings: config.Settings, routes: list[tuple[str, str, str | None, str | None]]
) -> list[Result]:
    pub = publisher.Publisher(settings)
    try:
        async with asyncio.timeout(settings.kafka.request_timeout_s):
            await pub.start()
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        await pub.stop()
        if isinstance(exc, errors.ConfigError):
            return [Result("kafka", False, str(exc), config=True)]
        return [Result("kafka", False, f"cannot connect: {await _kafka_cause(settings, exc)}")]
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
