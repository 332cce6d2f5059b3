"""The `relay` command against the real servers: schema, migrate, check, replay."""

from __future__ import annotations

from pathlib import Path

import pymysql
import pytest
import servers
from integration import helpers
from servers import Kafka, MariaDB

pytestmark = pytest.mark.integration


@pytest.fixture
def env(mariadb: MariaDB, kafka: Kafka, database: str, tmp_path: Path) -> dict[str, str]:
    """The environment of a `relay` command on the test servers and the test's database, as the
    relay's least-privilege user (README's grants, given by :func:`migrate`)."""
    return helpers.relay_env(
        tmp_path,
        RELAY_DB__HOST=mariadb.host,
        RELAY_DB__PORT=str(mariadb.port),
        RELAY_DB__USER=mariadb.relay_user,
        RELAY_DB__PASSWORD=mariadb.relay_password,
        RELAY_DB__NAME=database,
        RELAY_KAFKA__BOOTSTRAP_SERVERS=kafka.bootstrap,
        RELAY_KAFKA__REQUEST_TIMEOUT_S="5",
    )


def migrate(mariadb: MariaDB, database: str, env: dict[str, str]) -> str:
    """`relay migrate` as the migrate user, then the relay user's grants on its tables (as a
    deployment does: README "Grants"); its output."""
    as_migrate = {
        "RELAY_DB__USER": mariadb.migrate_user,
        "RELAY_DB__PASSWORD": mariadb.migrate_password,
    }
    proc = helpers.run_relay(["migrate"], env | as_migrate)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    servers.grant_relay(mariadb, database, env.get("RELAY_OUTBOX__TABLE", "outbox"))
    return proc.stdout


def test_schema_prints_runnable_create_tables(
    mariadb: MariaDB, database: str, env: dict[str, str]
) -> None:
    env["RELAY_OUTBOX__TABLE"] = "events"
    proc = helpers.run_relay(["schema"], env)
    assert proc.returncode == 0, proc.stderr
    assert "CREATE TABLE IF NOT EXISTS `events` (" in proc.stdout
    assert "CREATE TABLE IF NOT EXISTS `events_shard` (" in proc.stdout
    # the printed script is what a DBA would run: it creates the schema
    conn = mariadb.connect(database)
    try:
        with conn.cursor() as cur:
            for statement in proc.stdout.split(";\n"):
                if statement.strip() and not all(
                    line.startswith("--") for line in statement.strip().splitlines()
                ):
                    cur.execute(statement)
            cur.execute("SELECT COUNT(*) FROM events_shard")
            assert cur.fetchone() == (64,)
            cur.execute("SHOW TABLES")
            assert {r[0] for r in cur.fetchall()} == {
                "events",
                "events_shard",
                "events_hold",
                "events_meta",
            }
            cur.execute("SELECT value FROM events_meta WHERE name = 'schema_version'")
            assert cur.fetchone() == ("2",)
    finally:
        conn.close()


def test_migrate_then_check(
    mariadb: MariaDB, database: str, topic: str, env: dict[str, str]
) -> None:
    env["RELAY_OUTBOX__TOPIC_TEMPLATE"] = topic
    for _ in range(2):  # idempotent
        out = migrate(mariadb, database, env)
        assert f"schema version 2 current: {database}.outbox" in out
    # a new row routed to the fixture topic: the check looks that topic up
    _insert_new_row(mariadb, database, "order")
    proc = helpers.run_relay(["check"], env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    for name in ("database", "schema", "grants", "kafka", "topics"):
        assert any(line.startswith(f"ok   {name}:") for line in lines), (name, proc.stdout)
    assert not any(line.startswith("FAIL") for line in lines)
    # the relay user has README's grants: nothing excess to say
    assert "privileges" not in proc.stdout, proc.stdout
    # the administrator has ALL WITH GRANT OPTION: said, without its password hash
    as_admin = {"RELAY_DB__USER": mariadb.user, "RELAY_DB__PASSWORD": mariadb.password}
    proc = helpers.run_relay(["check"], env | as_admin)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "warn privileges: more than the relay needs: ALL PRIVILEGES ON *.*" in proc.stdout
    assert "GRANT OPTION ON *.*" in proc.stdout
    assert "PASSWORD '*" not in proc.stdout
    # the checks' grant tests rolled back: the row is still new
    statuses = helpers.server_sql(mariadb, "SELECT status FROM outbox", database=database)
    assert statuses == [("new",)]


def test_check_fails_on_a_missing_topic(
    mariadb: MariaDB, database: str, env: dict[str, str]
) -> None:
    env["RELAY_OUTBOX__TOPIC_TEMPLATE"] = "missing.{aggregate_type}"
    migrate(mariadb, database, env)
    _insert_new_row(mariadb, database, "nowhere")
    proc = helpers.run_relay(["check"], env)
    assert proc.returncode == 3, proc.stdout + proc.stderr  # operational: the topic is missing
    assert "FAIL topics: missing topics ['missing.nowhere']" in proc.stdout


def test_check_fails_when_table_missing(
    mariadb: MariaDB, database: str, env: dict[str, str]
) -> None:
    # before `relay migrate` the relay user has no grant in the database (a GRANT needs the
    # table): the server refuses the database itself
    proc = helpers.run_relay(["check"], env)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "FAIL database: cannot connect: OperationalError: (1044" in proc.stdout
    # granted, then the tables are gone: the schema check names the fix
    migrate(mariadb, database, env)
    helpers.server_sql(
        mariadb, "DROP TABLE outbox, outbox_shard, outbox_hold, outbox_meta", database=database
    )
    proc = helpers.run_relay(["check"], env)
    assert proc.returncode == 4, proc.stdout + proc.stderr  # missing schema
    assert "FAIL schema: table 'outbox' missing: run `relay migrate`" in proc.stdout


def test_check_fails_when_database_unreachable(env: dict[str, str]) -> None:
    env["RELAY_DB__PORT"] = str(helpers.closed_port())
    env["RELAY_DB__CONNECT_TIMEOUT_S"] = "2"
    proc = helpers.run_relay(["check"], env)
    assert proc.returncode == 3, proc.stdout + proc.stderr  # dependency unreachable
    assert "FAIL database: cannot connect" in proc.stdout


def test_replay_puts_failed_rows_back(mariadb: MariaDB, database: str, env: dict[str, str]) -> None:
    migrate(mariadb, database, env)
    conn = mariadb.connect(database)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "INSERT INTO outbox (message_id, aggregate_type, aggregate_id, event_type,"
                " status, last_error) SELECT UUID(), 'order', seq, 'E', 'failed', 'too_large: x'"
                " FROM seq_1_to_4"
            )
            cur.execute("SELECT id FROM outbox ORDER BY id")
            ids = [int(r[0]) for r in cur.fetchall()]
        proc = helpers.run_relay(["replay", "--id", str(ids[0]), "--id", str(ids[2])], env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "rows put back to new: 2; holds released: 0" in proc.stdout
        statuses = _statuses(conn)
        assert statuses == [("new", None), ("failed", "too_large: x")] * 2
        proc = helpers.run_relay(["replay"], env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "rows put back to new: 2" in proc.stdout
        assert _statuses(conn) == [("new", None)] * 4
    finally:
        conn.close()


def _insert_new_row(mariadb: MariaDB, database: str, aggregate_type: str) -> None:
    """One new outbox row of ``aggregate_type``, routed by the topic template."""
    helpers.server_sql(
        mariadb,
        "INSERT INTO outbox (message_id, aggregate_type, aggregate_id, event_type)"
        " VALUES (UUID(), %s, '1', 'E')",
        aggregate_type,
        database=database,
    )


def _statuses(conn: pymysql.Connection) -> list[tuple[str, str | None]]:
    with conn.cursor() as cur:
        cur.execute("SELECT status, last_error FROM outbox ORDER BY id")
        return [(str(s), e) for s, e in cur.fetchall()]
