"""TLS to MariaDB (RELAY_DB__SSL_*) and to Kafka (mTLS, and SASL_SSL with SCRAM-SHA-512), against
the local servers as deploy/local/servers.sh secures them with the test CA of certs.sh.

Servers without that TLS (started by an older servers.sh) make these tests fail, naming the fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import struct
import subprocess
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import pymysql
import pytest
import secure_servers
from integration import helpers
from pymysql.constants import CLIENT
from secure_servers import Certs, SecureKafka
from servers import Kafka, MariaDB

from relay import app, config, db, errors, publisher

pytestmark = pytest.mark.integration

WRONG_PASSWORD = "not-the-password"  # noqa: S105 - must never be printed


@dataclasses.dataclass(frozen=True)
class Secured:
    """The servers, a fresh database, the test CA's files and the secured Kafka listeners."""

    mariadb: MariaDB
    kafka: Kafka
    database: str
    certs: Certs
    listeners: SecureKafka

    def settings(self, **groups: Mapping[str, Any]) -> config.Settings:
        return helpers.make_settings(self.mariadb, self.database, self.kafka.bootstrap, **groups)

    def mtls(self, **changes: str) -> dict[str, Any]:
        """Kafka settings for the SSL listener, with the client certificate."""
        return {
            "bootstrap_servers": self.listeners.ssl_bootstrap,
            "security_protocol": "SSL",
            "ssl_cafile": self.certs.ca,
            "ssl_certfile": self.certs.client_cert,
            "ssl_keyfile": self.certs.client_key,
            **changes,
        }

    def scram(self, **changes: str) -> dict[str, Any]:
        """Kafka settings for the SASL_SSL listener."""
        return {
            "bootstrap_servers": self.listeners.sasl_bootstrap,
            "security_protocol": "SASL_SSL",
            "ssl_cafile": self.certs.ca,
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": secure_servers.SCRAM_USER,
            "sasl_password": secure_servers.SCRAM_PASSWORD,
            **changes,
        }


@pytest.fixture(scope="module")
def secure_setup(mariadb: MariaDB, kafka: Kafka) -> tuple[Certs, SecureKafka]:
    """Fails, naming what is missing, unless the servers have their TLS."""
    certs, listeners = secure_servers.certs_from_env(), secure_servers.secure_kafka_from_env()
    problems = secure_servers.tls_problems(mariadb, certs, listeners)
    if problems:
        pytest.fail(f"{'; '.join(problems)}: {secure_servers.RESTART_HINT}", pytrace=False)
    return certs, listeners


@pytest.fixture
def tls(
    mariadb: MariaDB, kafka: Kafka, database: str, secure_setup: tuple[Certs, SecureKafka]
) -> Secured:
    return Secured(mariadb, kafka, database, *secure_setup)


@pytest.fixture
def tls_user(tls: Secured) -> Iterator[dict[str, str]]:
    """Database settings of a user created ``REQUIRE SSL`` (no TLS mode yet)."""
    user, password = secure_servers.create_user(tls.mariadb, tls.database, "SSL")
    try:
        yield {"user": user, "password": password}
    finally:
        secure_servers.drop_user(tls.mariadb, user)


async def _cipher(settings: config.Settings) -> str:
    rows = await helpers.sql(settings, "SHOW SESSION STATUS LIKE 'Ssl_cipher'")
    return str(rows[0][1])


def _relay(
    args: list[str], settings: config.Settings, tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    """``relay <args>`` in a process, configured by environment variables from ``settings``."""
    env = helpers.relay_env(tmp_path)
    groups: dict[str, Mapping[str, Any]] = {
        "DB": settings.db.model_dump(exclude_none=True),
        "KAFKA": settings.kafka.model_dump(exclude_none=True),
        "OUTBOX": settings.outbox.model_dump(exclude_none=True),
    }
    for group, values in groups.items():
        for name, value in values.items():
            secret = getattr(value, "get_secret_value", None)
            env[f"RELAY_{group}__{name.upper()}"] = str(secret() if secret else value)
    return helpers.run_relay(args, env)


def _check_fails_once(settings: config.Settings, tmp_path: Path, component: str) -> tuple[str, str]:
    """``relay check`` exits 3 without a traceback and has exactly one line on ``component``:
    that line, and everything the command printed (stdout, then stderr)."""
    check = _relay(["check"], settings, tmp_path)
    assert check.returncode == 3, check.stdout + check.stderr
    assert "Traceback" not in check.stderr
    lines = [line for line in check.stdout.splitlines() if f" {component}: " in line]
    assert len(lines) == 1, check.stdout
    return lines[0], check.stdout + check.stderr


# ------------------------------------------------------------------ MariaDB


async def test_the_default_preferred_mode_uses_tls(tls: Secured) -> None:
    settings = tls.settings()
    assert settings.db.ssl_mode == "preferred"
    assert await _cipher(settings)  # the server offers TLS: taken, though nothing is verified
    plain = tls.settings(db={"ssl_mode": "disabled"})
    assert await _cipher(plain) == ""  # users without REQUIRE SSL may keep plain TCP


@pytest.mark.parametrize("mode", ["verify_identity", "verify_ca", "required"])
async def test_require_ssl_user_connects_over_tls(
    tls: Secured, tls_user: dict[str, str], mode: str
) -> None:
    ca = {"ssl_ca": tls.certs.ca} if mode.startswith("verify") else {}
    settings = tls.settings(db={**tls_user, "ssl_mode": mode, **ca})
    await helpers.migrate(settings)  # the relay's own session set-up and DDL, over TLS
    assert await _cipher(settings)
    rows = await helpers.sql(settings, "SELECT CURRENT_USER()")
    assert rows == [(f"{tls_user['user']}@%",)]


async def test_x509_user_connects_with_the_client_certificate(tls: Secured) -> None:
    user, password = secure_servers.create_user(tls.mariadb, tls.database, "X509")
    try:
        verify = {"user": user, "password": password, "ssl_mode": "verify_identity"}
        verify["ssl_ca"] = tls.certs.ca
        client = {"ssl_cert": tls.certs.client_cert, "ssl_key": tls.certs.client_key}
        assert await _cipher(tls.settings(db={**verify, **client}))
        with pytest.raises(pymysql.err.OperationalError) as denied:
            await db.connect(tls.settings(db=verify))
        assert denied.value.args[0] == 1045
    finally:
        secure_servers.drop_user(tls.mariadb, user)


async def test_wrong_ca_fails_with_one_clear_line(
    tls: Secured, tls_user: dict[str, str], tmp_path: Path
) -> None:
    other_ca = secure_servers.make_other_ca(tmp_path)
    settings = tls.settings(db={**tls_user, "ssl_mode": "verify_identity", "ssl_ca": other_ca})
    with pytest.raises(pymysql.err.OperationalError) as raised:
        await db.connect(settings)
    assert raised.value.args[0] == db.CR_SSL_CONNECTION_ERROR
    message = errors.one_line(raised.value)
    assert "SSL connection error: certificate verify failed" in message
    assert f"RELAY_DB__SSL_CA={other_ca}" in message
    assert tls_user["password"] not in message
    assert errors.exit_code(raised.value) == errors.ExitCode.UNAVAILABLE

    migrate = _relay(["migrate"], settings, tmp_path)
    assert migrate.returncode == 3, migrate.stderr
    assert migrate.stdout == ""
    lines = migrate.stderr.splitlines()
    assert len(lines) == 1, migrate.stderr  # one line, no traceback
    assert lines[0].startswith("relay migrate: OperationalError: (2026, 'SSL connection error:")
    assert "certificate verify failed" in lines[0]

    line, _ = _check_fails_once(settings, tmp_path, "database")
    assert line.startswith("FAIL database: cannot connect: OperationalError: (2026")
    assert "certificate verify failed" in line


async def test_disabled_tls_is_refused_for_a_require_ssl_user(
    tls: Secured, tls_user: dict[str, str], tmp_path: Path
) -> None:
    settings = tls.settings(db={**tls_user, "ssl_mode": "disabled"})
    with pytest.raises(pymysql.err.OperationalError) as raised:
        await db.connect(settings)
    assert raised.value.args[0] == 1045  # access denied: the server wants TLS for this user
    migrate = _relay(["migrate"], settings, tmp_path)
    assert migrate.returncode == 3, migrate.stderr
    assert len(migrate.stderr.splitlines()) == 1, migrate.stderr
    assert '(1045, "Access denied for user' in migrate.stderr


async def test_a_missing_ca_file_is_a_configuration_error(tls: Secured, tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere.pem")
    settings = tls.settings(db={"ssl_mode": "verify_ca", "ssl_ca": missing})
    with pytest.raises(config.ConfigError, match="RELAY_DB__SSL_CA: cannot load"):
        await db.connect(settings)
    migrate = _relay(["migrate"], settings, tmp_path)
    assert migrate.returncode == 78, migrate.stderr
    assert migrate.stderr.splitlines() == [
        "relay migrate: ConfigError: invalid configuration: RELAY_DB__SSL_CA: cannot load"
        f" {missing}: No such file or directory"
    ]


# A MySQL server without TLS (the local MariaDB has TLS): what the client sends it, per mode.

HANDSHAKE_CAPABILITIES = (
    CLIENT.LONG_PASSWORD
    | CLIENT.CONNECT_WITH_DB
    | CLIENT.PROTOCOL_41
    | CLIENT.SECURE_CONNECTION
    | CLIENT.PLUGIN_AUTH
)


def _packet(payload: bytes, seq: int) -> bytes:
    return struct.pack("<I", len(payload))[:3] + bytes([seq]) + payload


def _greeting() -> bytes:
    """Protocol 10 handshake of a server that does not offer CLIENT_SSL."""
    salt = b"0123456789abcdefghij"
    return _packet(
        b"\x0a5.5.5-10.11.0-no-tls\x00"
        + struct.pack("<I", 7)
        + salt[:8]
        + b"\x00"
        + struct.pack("<H", HANDSHAKE_CAPABILITIES & 0xFFFF)
        + b"\x2d"  # utf8mb4
        + struct.pack("<H", 2)
        + struct.pack("<H", HANDSHAKE_CAPABILITIES >> 16)
        + bytes([21])
        + b"\x00" * 10
        + salt[8:]
        + b"\x00"
        + b"mysql_native_password\x00",
        0,
    )


@contextlib.asynccontextmanager
async def _server_without_tls() -> AsyncIterator[tuple[int, list[bytes]]]:
    """Greets without CLIENT_SSL, records the client's first packet (b"" when the client hung
    up without one), answers access denied."""
    received: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(_greeting())
        await writer.drain()
        header = await reader.read(4)
        body = await reader.readexactly(int.from_bytes(header[:3], "little")) if header else b""
        received.append(body)
        if body:
            denied = b"\xff" + struct.pack("<H", 1045) + b"#28000" + b"Access denied (fake)"
            writer.write(_packet(denied, header[3] + 1))
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], received
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("mode", ["required", "verify_identity"])
async def test_required_tls_sends_no_credentials_to_a_server_without_tls(
    tls: Secured, mode: str
) -> None:
    async with _server_without_tls() as (port, received):
        ca = {"ssl_ca": tls.certs.ca} if mode.startswith("verify") else {}
        settings = tls.settings(db={"port": port, "ssl_mode": mode, **ca})
        with pytest.raises(pymysql.err.OperationalError) as raised:
            await db.connect(settings)
        await helpers.wait_until(lambda: received, "the server to see the client go")
    assert raised.value.args[0] == db.CR_SSL_CONNECTION_ERROR
    assert "does not offer TLS" in str(raised.value)
    assert received == [b""]  # hung up before any handshake response: no user, no scramble


async def test_preferred_falls_back_to_plain_only_when_the_server_has_no_tls(
    tls: Secured,
) -> None:
    async with _server_without_tls() as (port, received):
        with pytest.raises(pymysql.err.OperationalError) as raised:
            await db.connect(tls.settings(db={"port": port}))
    assert raised.value.args[0] == 1045  # it went on in plain text, as MySQL clients do
    (response,) = received
    flags = struct.unpack("<I", response[:4])[0]
    assert flags & CLIENT.PROTOCOL_41
    assert not flags & CLIENT.SSL  # and did not claim TLS in its handshake response


# ------------------------------------------------------------------ Kafka


@pytest.mark.parametrize("listener", ["mtls", "scram"])
async def test_relays_end_to_end_over_tls(
    tls: Secured, tls_user: dict[str, str], topic: str, listener: str
) -> None:
    """The whole relay with TLS everywhere: a REQUIRE SSL database user (verify_identity) and
    the mTLS or SASL_SSL listener; the records are read back from the plain listener."""
    settings = tls.settings(
        db={**tls_user, "ssl_mode": "verify_identity", "ssl_ca": tls.certs.ca},
        kafka=tls.mtls() if listener == "mtls" else tls.scram(),
        outbox={"topic_template": topic},
    )
    await helpers.migrate(settings)
    ids = await helpers.write(settings, helpers.event("tls-1"), helpers.event("tls-2", 2))
    async with helpers.running(settings) as (relay, task):
        await helpers.wait_for_statuses(settings, dict.fromkeys(ids, "published"))

        async def ready() -> bool:
            return await relay.readiness() == {}

        await helpers.wait_until(ready, "the relay to be ready")
        assert not task.done()
    assert task.result() == 0
    messages = await helpers.consume(tls.kafka, topic, helpers.has_ids(set(ids)))
    assert {m.message_id for m in messages} == set(ids)


@pytest.mark.parametrize("listener", ["mtls", "scram"])
async def test_publisher_over_each_secured_listener(
    tls: Secured, topic: str, listener: str
) -> None:
    settings = tls.settings(
        kafka=tls.mtls() if listener == "mtls" else tls.scram(), outbox={"topic_template": topic}
    )
    pub = publisher.Publisher(settings)
    await pub.start()
    try:
        assert await pub.missing_topics({topic}) == set()
        assert await publisher.connect_problem(settings.kafka) is None
    finally:
        await pub.stop()


# what is wrong -> what connect_problem says
REFUSALS = {
    "mtls-wrong-ca": "TLS: certificate verify failed",
    "mtls-no-client-certificate": "closed",  # the broker ends the connection after the handshake
    "scram-wrong-ca": "TLS: certificate verify failed",
    "scram-wrong-password": "SaslAuthenticationFailed",
}


def _refused(tls: Secured, what: str, other_ca: str) -> dict[str, Any]:
    if what == "mtls-wrong-ca":
        return tls.mtls(ssl_cafile=other_ca)
    if what == "mtls-no-client-certificate":
        mtls = tls.mtls()
        del mtls["ssl_certfile"], mtls["ssl_keyfile"]
        return mtls
    if what == "scram-wrong-ca":
        return tls.scram(ssl_cafile=other_ca)
    return tls.scram(sasl_password=WRONG_PASSWORD)


async def _stays_not_ready(relay: app.App, task: asyncio.Task[int], check: str, state: str) -> None:
    """Until the readiness report says ``check: state``; two backoffs later the relay still runs."""

    async def reported() -> bool:
        return (await relay.readiness()).get(check) == state

    await helpers.wait_until(reported, f"readiness to say {check}: {state}")
    await asyncio.sleep(2 * relay.settings.worker.backoff_max_s)
    assert not task.done()


@pytest.mark.parametrize("what", list(REFUSALS))
async def test_refused_kafka_is_reported_and_the_relay_stays_up(
    tls: Secured, tmp_path: Path, what: str
) -> None:
    kafka = _refused(tls, what, secure_servers.make_other_ca(tmp_path))
    settings = tls.settings(kafka={**kafka, "request_timeout_s": 2.0})
    await helpers.migrate(settings)

    # the reason, in one line, without the password
    problem = await publisher.connect_problem(settings.kafka)
    assert problem is not None
    assert REFUSALS[what] in problem
    assert problem.startswith(kafka["bootstrap_servers"] + ": ")
    assert "\n" not in problem
    assert WRONG_PASSWORD not in problem

    # `relay check`: one FAIL line for Kafka, exit 3, no traceback, no password
    line, output = _check_fails_once(settings, tmp_path, "kafka")
    assert line.startswith("FAIL kafka: cannot connect: ")
    assert REFUSALS[what] in line  # the cause, not only "Unable to bootstrap"
    assert WRONG_PASSWORD not in output

    # `relay run`: not ready, naming Kafka; retries with backoff, never exits
    async with helpers.running(settings) as (relay, task):
        await _stays_not_ready(relay, task, "kafka", "not_connected")
        assert (await relay.readiness()).get("kafka") == "not_connected"
        assert not relay.publisher.started
    assert task.result() == 0  # stopped on request


async def test_wrong_database_ca_keeps_the_relay_up_and_not_ready(
    tls: Secured, tls_user: dict[str, str], tmp_path: Path
) -> None:
    other_ca = secure_servers.make_other_ca(tmp_path)
    settings = tls.settings(db={**tls_user, "ssl_mode": "verify_identity", "ssl_ca": other_ca})
    async with helpers.running(settings) as (relay, task):
        await _stays_not_ready(relay, task, "startup", "database_unreachable")
    assert task.result() == 0
