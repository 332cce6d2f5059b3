"""Schema versions against the real MariaDB: `relay migrate` upgrades a version 1 install in
place with rows in every state, is idempotent, and `relay run`'s start-up check refuses an
unknown version, a missing table or a missing grant, naming it. The claim stays index-driven
with a million retained rows and ten thousand held aggregates (the server's handler counters)."""

from __future__ import annotations

import pathlib
import re
import uuid
from typing import Any

import pydantic
import pytest
import servers
from integration import helpers
from servers import Kafka, MariaDB

from relay import config, db, errors, preflight, store

pytestmark = pytest.mark.integration

V1_SCHEMA = pathlib.Path(__file__).with_name("schema_v1.sql")


def _v1_statements() -> list[str]:
    """The schema of the first release (before holds and versions), as it was shipped."""
    blocks = re.split(r"^--\s*name:\s*\w+\s*$", V1_SCHEMA.read_text(), flags=re.MULTILINE)[1:]
    statements = []
    for block in blocks:
        lines = [ln for ln in block.strip().splitlines() if not ln.lstrip().startswith("--")]
        sql = "\n".join(lines)
        sql = sql.replace("{outbox}", "`outbox`").replace("{outbox_shard}", "`outbox_shard`")
        statements.append(sql)
    return statements


@pytest.fixture
def settings(mariadb: MariaDB, kafka: Kafka, database: str) -> config.Settings:
    return helpers.make_settings(mariadb, database, kafka.bootstrap)


async def _install_v1(settings: config.Settings) -> dict[str, str]:
    for statement in _v1_statements():
        await helpers.sql(settings, statement)
    rows = {"new": "n", "published": "p", "failed": "f"}
    for status, aggregate in rows.items():
        await helpers.sql(
            settings,
            "INSERT INTO outbox (message_id, aggregate_type, aggregate_id, event_type, status,"
            " after_state) VALUES (%s, 'order', %s, 'E', %s, '{}')",
            [str(uuid.uuid4()), aggregate, status],
        )
    return rows


async def test_migrate_upgrades_version_1_in_place_and_is_idempotent(
    settings: config.Settings, mariadb: MariaDB, database: str
) -> None:
    await _install_v1(settings)
    assert servers.grant_relay(mariadb, database) == ["outbox", "outbox_shard"]  # v1's tables
    with pytest.raises(errors.MissingError, match="schema version 1: run `relay migrate`"):
        await preflight.verify(settings)
    async with db.connection(helpers.as_migrate(settings)) as conn:  # README's migrate user
        steps = await store.Store("outbox").migrate(conn)
        assert steps == [
            "outbox_statuses_v2",
            "outbox_resolved_v2",
            "shard_holds_v2",
            "published_at_default",
        ]
        assert await store.Store("outbox").schema_version(conn) == store.SCHEMA_VERSION
        assert await store.Store("outbox").migrate(conn) == []  # idempotent
    kept = await helpers.sql(settings, "SELECT aggregate_id, status FROM outbox ORDER BY id")
    assert kept == [("n", "new"), ("p", "published"), ("f", "failed")]
    servers.grant_relay(mariadb, database)  # the tables the upgrade added
    await preflight.verify(settings)  # now acceptable to `relay run`
    # the new statuses and tables work on the upgraded schema
    await helpers.sql(settings, "UPDATE outbox SET status = 'held' WHERE aggregate_id = 'n'")
    holds = await helpers.sql(settings, "SELECT holds FROM outbox_shard WHERE shard = 0")
    assert holds == [(0,)]


async def test_migrate_gives_published_at_its_default_in_place(settings: config.Settings) -> None:
    """A version 2 table from before published_at had a default gets one (metadata only: the
    upgrade says ALGORITHM = INSTANT), old rows keep their NULL and new rows are stamped."""
    await helpers.migrate(settings)
    await helpers.sql(settings, "ALTER TABLE outbox ALTER COLUMN published_at SET DEFAULT NULL")
    await helpers.write(settings, helpers.event("old", 0))
    tips = [r for r in await preflight.run(settings) if r.name == "upgrade"]
    assert [(r.ok, r.warn) for r in tips] == [(True, True)]  # `relay check` says so
    assert "run `relay migrate`" in tips[0].detail
    async with db.connection(helpers.as_migrate(settings)) as conn:
        assert await store.Store("outbox").migrate(conn) == ["published_at_default"]
        assert await store.Store("outbox").migrate(conn) == []
    await helpers.write(settings, helpers.event("new", 0))
    stamps = await helpers.sql(
        settings, "SELECT aggregate_id, published_at = event_time FROM outbox ORDER BY id"
    )
    assert stamps == [("old", None), ("new", 1)]
    assert not [r for r in await preflight.run(settings) if r.name == "upgrade"]


async def test_fresh_install_records_the_version(settings: config.Settings) -> None:
    await helpers.migrate(settings)
    rows = await helpers.sql(settings, "SELECT value FROM outbox_meta")
    assert rows == [(str(store.SCHEMA_VERSION),)]
    await preflight.verify(settings)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("UPDATE outbox_meta SET value = '3'", "schema version 3 is newer than this relay"),
        ("DROP TABLE outbox_hold", "missing tables ['outbox_hold']"),
        ("DROP TABLE outbox", "table 'outbox' missing: run `relay migrate`"),
        ("ALTER TABLE outbox DROP INDEX ix_claim", "missing indexes ['ix_claim']"),
    ],
    ids=["newer-version", "no-hold-table", "no-table", "no-index"],
)
async def test_start_up_check_names_what_is_missing(
    settings: config.Settings, breakage: str, message: str
) -> None:
    await helpers.migrate(settings)
    await helpers.sql(settings, breakage)
    with pytest.raises(errors.MissingError) as raised:
        await preflight.verify(settings)
    assert message in str(raised.value)
    assert raised.value.exit_code == errors.ExitCode.MISSING


async def test_start_up_check_names_a_missing_grant(
    settings: config.Settings, mariadb: MariaDB, database: str
) -> None:
    """A relay user without UPDATE on the outbox: the check exercises each statement (rolled
    back) and names what is denied, instead of publishing and failing to mark forever."""
    await helpers.migrate(settings)
    user = f"ro_{uuid.uuid4().hex[:8]}"
    admin = mariadb.connect()
    try:
        with admin.cursor() as cur:
            cur.execute(f"CREATE USER '{user}'@'%' IDENTIFIED BY 'pw'")
            cur.execute(f"GRANT SELECT, DELETE ON `{database}`.* TO '{user}'@'%'")
            cur.execute(f"GRANT INSERT, UPDATE ON `{database}`.`outbox_hold` TO '{user}'@'%'")
            cur.execute(f"GRANT UPDATE ON `{database}`.`outbox_shard` TO '{user}'@'%'")
        restricted = settings.model_copy(
            update={
                "db": settings.db.model_copy(
                    update={"user": user, "password": pydantic.SecretStr("pw")}
                )
            }
        )
        with pytest.raises(errors.MissingError) as raised:
            await preflight.verify(restricted)
        assert "UPDATE on the outbox table denied" in str(raised.value)
        assert "DELETE" not in str(raised.value)  # what is granted is not reported
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP USER IF EXISTS '{user}'@'%'")
        admin.close()


def _as_user(settings: config.Settings, user: str) -> config.Settings:
    secret = pydantic.SecretStr("pw")
    return settings.model_copy(
        update={"db": settings.db.model_copy(update={"user": user, "password": secret})}
    )


async def test_the_readme_least_privilege_grants_are_enough(
    settings: config.Settings, mariadb: MariaDB, database: str
) -> None:
    """The grants README.md ("Grants") lists: the migrate user creates and upgrades the schema,
    the relay user passes the start-up check and `relay check` has nothing excess to say."""
    suffix = uuid.uuid4().hex[:8]
    relay_user, migrate_user = f"lp_{suffix}", f"lpm_{suffix}"
    db_ = f"`{database}`"
    grants = [
        f"GRANT SELECT, UPDATE, DELETE ON {db_}.`outbox` TO '{relay_user}'@'%'",
        f"GRANT SELECT, UPDATE ON {db_}.`outbox_shard` TO '{relay_user}'@'%'",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON {db_}.`outbox_hold` TO '{relay_user}'@'%'",
        f"GRANT SELECT ON {db_}.`outbox_meta` TO '{relay_user}'@'%'",
        f"GRANT CREATE, ALTER, INDEX, SELECT, INSERT, UPDATE ON {db_}.* TO '{migrate_user}'@'%'",
    ]
    for user in (relay_user, migrate_user):
        helpers.server_sql(mariadb, f"CREATE USER '{user}'@'%' IDENTIFIED BY 'pw'")
    try:
        for user in (relay_user, migrate_user):
            helpers.server_sql(mariadb, f"GRANT USAGE ON *.* TO '{user}'@'%'")
        helpers.server_sql(mariadb, grants[-1])
        async with db.connection(_as_user(settings, migrate_user)) as conn:
            await store.Store("outbox").migrate(conn)  # tables exist only now: grant after
        for grant in grants[:-1]:
            helpers.server_sql(mariadb, grant)
        relay_settings = _as_user(settings, relay_user)
        await preflight.verify(relay_settings)
        async with db.connection(relay_settings) as conn:
            assert preflight.excess_privileges(await store.Store("outbox").grants(conn)) == []
    finally:
        for user in (relay_user, migrate_user):
            helpers.server_sql(mariadb, f"DROP USER IF EXISTS '{user}'@'%'")


async def _handler_reads(conn: db.Connection) -> dict[str, int]:
    async with conn.cursor() as cur:
        await cur.execute("SHOW SESSION STATUS LIKE 'Handler_read%'")
        return {str(k): int(v) for k, v in await cur.fetchall()}


@pytest.mark.slow
async def test_claim_reads_do_not_grow_with_retained_rows_or_holds(
    settings: config.Settings,
) -> None:
    """1,000,000 published rows and 10,000 held aggregates (each with a held row) stay out of
    the claim's way: the rows the server reads for one whole claim (find and lock the shards,
    due holds, claim, holds of the claimed aggregates) are a small multiple of what it
    returns."""
    await helpers.migrate(settings)
    s = store.Store("outbox")
    await helpers.sql(
        settings,
        "INSERT INTO outbox (message_id, aggregate_type, aggregate_id, event_type, status,"
        " published_at) SELECT UUID(), 'order', CONCAT('p-', seq), 'E', 'published',"
        " CURRENT_TIMESTAMP(6) FROM seq_1_to_1000000",
    )
    await helpers.sql(
        settings,
        "INSERT INTO outbox (message_id, aggregate_type, aggregate_id, event_type, status)"
        " SELECT UUID(), 'order', CONCAT('h-', seq), 'E', 'held' FROM seq_1_to_10000",
    )
    await helpers.sql(
        settings,
        "INSERT INTO outbox_hold (aggregate_type, aggregate_id, shard, kind, reason)"
        " SELECT 'order', CONCAT('h-', seq), CRC32(CONCAT('h-', seq)) % 64, 'poison', 'x'"
        " FROM seq_1_to_10000",
    )
    await helpers.sql(
        settings,
        "UPDATE outbox_shard s SET holds ="
        " (SELECT COUNT(*) FROM outbox_hold h WHERE h.shard = s.shard)",
    )
    # new rows: 200 of fresh aggregates, plus a new row of 100 held aggregates
    await helpers.write(settings, *(helpers.event(f"n-{i}") for i in range(200)))
    await helpers.write(settings, *(helpers.event(f"h-{i}") for i in range(1, 101)))
    await helpers.sql(settings, "ANALYZE TABLE outbox, outbox_hold")
    async with db.connection(settings, autocommit=False) as conn:
        before = await _handler_reads(conn)
        owned = await s.claim_shards(conn, 0, store.SHARDS)
        held = [shard for shard, n in owned.items() if n]
        due = await s.due_holds(conn, held)
        rows = await s.claim_rows(conn, list(owned), 1000, 1 << 24)
        holds = await s.holds_of(conn, {r.aggregate for r in rows})
        after = await _handler_reads(conn)
        await conn.rollback()
    reads: dict[str, Any] = {k: after[k] - before[k] for k in after}
    total = sum(reads.values())
    assert len(rows) == 300
    assert due == []
    assert {h.key[1] for h in holds} == {f"h-{i}" for i in range(1, 101)}
    # per row returned: an index dive or step, a primary-key read, temp-table passes; plus 64
    # shard heads. Nothing proportional to the 1,010,000 rows or 10,000 holds the claim skips.
    print(f"claim of {len(rows)} rows: handler reads {reads}")  # noqa: T201 - the figure
    assert total < 20 * (len(rows) + 64), reads
