"""Test helpers for the real MariaDB and Kafka servers started by deploy/local/servers.sh.

Generic on purpose: nothing here imports the ``relay`` package. Topics are created and deleted
with ``relay.tools.topics`` (pass :attr:`Kafka.options`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pymysql
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVERS_SH = REPO_ROOT / "deploy" / "local" / "servers.sh"
ER_LOG_IN_USE = 1378  # MariaDB: "A purgeable log is in use, will not purge"

T = TypeVar("T")
S = TypeVar("S")


# dev-only users created by deploy/local/servers.sh (user name = password)
ADMIN_USER = "relay_admin"  # the test harness's administrator: ALL WITH GRANT OPTION
RELAY_USER = "relay"  # the daemon: README.md's grants only
MIGRATE_USER = "relay_migrate"  # `relay migrate`: README.md's migrate grants


@dataclass(frozen=True)
class MariaDB:
    """A MariaDB server and its users (``deploy/local/servers.sh`` creates them, dev-only).

    ``user``/``password``: the administrator (the test harness's ``relay_admin``) that
    :meth:`connect` and :func:`server_sql` use: it creates and drops databases, seeds and
    inspects rows, creates users and grants. ``relay_user``: the daemon's least-privilege user,
    the README's grants only (:func:`grant_relay`); every relay under test runs as it.
    ``migrate_user``: the README's ``relay migrate`` user (CREATE, ALTER, INDEX, SELECT, INSERT,
    UPDATE on ``outbox`` and the ``outbox_t_*`` databases).
    """

    host: str
    port: int
    user: str
    password: str
    relay_user: str = RELAY_USER
    relay_password: str = RELAY_USER
    migrate_user: str = MIGRATE_USER
    migrate_password: str = MIGRATE_USER

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def connect(self, database: str | None = None, **kwargs: object) -> pymysql.Connection:
        """A PyMySQL connection (autocommit on unless overridden)."""
        options: dict[str, object] = {"autocommit": True, "connect_timeout": 5, **kwargs}
        return pymysql.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            database=database,
            **options,
        )


@dataclass(frozen=True)
class Kafka:
    bootstrap: str

    @property
    def options(self) -> dict[str, Any]:
        """Client connection options (for ``relay.tools.topics`` and plain aiokafka clients)."""
        return {"bootstrap_servers": self.bootstrap}


def mariadb_from_env() -> MariaDB:
    # dev-only credentials created by deploy/local/servers.sh
    return MariaDB(
        host="127.0.0.1",
        port=int(os.environ.get("OUTBOX_MARIADB_PORT", "3307")),
        user=ADMIN_USER,
        password=ADMIN_USER,
    )


def kafka_from_env() -> Kafka:
    return Kafka(bootstrap=f"127.0.0.1:{os.environ.get('OUTBOX_KAFKA_PORT', '19092')}")


def unique_name(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


# ------------------------------------------------------------------ reachability


def check_mariadb(server: MariaDB) -> None:
    """Raise unless ``SELECT 1`` works over TCP as the administrator."""
    if server_sql(server, "SELECT 1") != [(1,)]:
        raise RuntimeError("SELECT 1 returned something else")


def run_in_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` on a fresh thread: lets sync code call ``asyncio.run`` without touching the
    event loop pytest-asyncio may have installed on the main thread."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn).result()


async def _list_topics(bootstrap: str) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    await admin.start()
    try:
        return [str(t) for t in await admin.list_topics()]
    finally:
        await admin.close()


def check_kafka(server: Kafka) -> None:
    """Raise unless the broker answers a metadata request."""

    async def probe() -> None:
        async with asyncio.timeout(10):
            await _list_topics(server.bootstrap)

    run_in_thread(lambda: asyncio.run(probe()))


_started: set[str] = set()


def start_server(name: str) -> str:
    """Run ``servers.sh up <name>`` (at most once per name and process); return its output."""
    if name in _started:
        return f"(servers.sh up {name} already tried in this session)"
    _started.add(name)
    bash = shutil.which("bash") or "/bin/bash"
    proc = subprocess.run(  # noqa: S603 -- fixed argv, our own script
        [bash, str(SERVERS_SH), "up", name],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return f"servers.sh up {name} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"


def ensure_reachable(server: S, check: Callable[[S], None], name: str, address: str) -> str | None:
    """Check ``server``; if unreachable start it once and re-check.

    Returns None when reachable, else a message suitable for ``pytest.fail``."""
    try:
        check(server)
    except (OSError, pymysql.MySQLError, KafkaError, RuntimeError, TimeoutError):
        pass
    else:
        return None
    start_output = start_server(name)
    try:
        check(server)
    except (OSError, pymysql.MySQLError, KafkaError, RuntimeError, TimeoutError) as exc:
        pretty = {"mariadb": "MariaDB", "kafka": "Kafka"}[name]
        return (
            f"{pretty} at {address} is unreachable: {type(exc).__name__}: {exc}; "
            f"start it with: bash deploy/local/servers.sh up\n{start_output}"
        )
    return None


# ------------------------------------------------------------------ databases


def server_sql(
    server: MariaDB, statement: str, *args: object, database: str | None = None
) -> list[tuple[Any, ...]]:
    """Run one statement with PyMySQL as the server's administrator (autocommit), not through
    the relay's connections; its rows. Without ``args`` the statement is sent as it is (no
    ``%`` escaping)."""
    conn = server.connect(database)
    try:
        with conn.cursor() as cur:
            cur.execute(statement, args or None)
            return list(cur.fetchall())
    finally:
        conn.close()


def create_database(server: MariaDB, name: str) -> None:
    server_sql(server, f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")


def drop_database(server: MariaDB, name: str) -> None:
    """Drop ``name`` and the relay user's table privileges in it (a dropped database keeps its
    rows of ``mysql.tables_priv``)."""
    revoke_relay(server, name)
    server_sql(server, f"DROP DATABASE IF EXISTS `{name}`")
    purge_binary_logs(server)


def purge_binary_logs(server: MariaDB) -> None:
    """Start a new binary log file and delete the older ones: what a test wrote (a big-row test
    writes hundreds of MB) leaves the disk with it. The server's own expiry only purges when a
    file fills up. A file that a binary log follower is still reading is kept (the server
    refuses to purge it: then nothing is purged this time)."""
    with contextlib.closing(server.connect()) as conn, conn.cursor() as cur:
        cur.execute("SELECT @@log_bin")
        if not cur.fetchone()[0]:
            return
        cur.execute("FLUSH BINARY LOGS")
        cur.execute("SHOW MASTER STATUS")
        current = cur.fetchone()[0]
        try:
            cur.execute("PURGE BINARY LOGS TO %s", (current,))
        except pymysql.MySQLError as exc:
            if exc.args[0] != ER_LOG_IN_USE:
                raise


# README.md ("Grants"): the daemon's privileges, per table suffix of the outbox table.
RELAY_GRANTS = {
    "": "SELECT, UPDATE, DELETE",
    "_shard": "SELECT, UPDATE",
    "_hold": "SELECT, INSERT, UPDATE, DELETE",
    "_meta": "SELECT",
}
HOSTS = ("%", "localhost")  # servers.sh creates each user at both


def grant_relay(server: MariaDB, database: str, table: str = "outbox") -> list[str]:
    """Grant ``server.relay_user`` the README's privileges on the tables of ``table`` in
    ``database`` that exist (a GRANT on a missing table fails: grant after ``relay migrate``,
    again after an upgrade adds tables). The tables granted."""
    names = {table + suffix: privileges for suffix, privileges in RELAY_GRANTS.items()}
    existing = server_sql(
        server,
        "SELECT table_name FROM information_schema.tables"
        " WHERE table_schema = %s AND table_name IN %s",
        database,
        tuple(names),
    )
    granted = sorted(str(name) for (name,) in existing)
    for name in granted:
        for host in HOSTS:
            server_sql(
                server,
                f"GRANT {names[name]} ON `{database}`.`{name}` TO %s@%s",
                server.relay_user,
                host,
            )
    return granted


def revoke_relay(server: MariaDB, database: str) -> None:
    """Revoke every table privilege ``server.relay_user`` has in ``database``."""
    rows = server_sql(
        server,
        "SELECT Host, Table_name FROM mysql.tables_priv WHERE Db = %s AND User = %s",
        database,
        server.relay_user,
    )
    for host, name in rows:
        server_sql(
            server,
            f"REVOKE ALL PRIVILEGES ON `{database}`.`{name}` FROM %s@%s",
            server.relay_user,
            host,
        )
