"""The secured side of the local servers (deploy/local/servers.sh and certs.sh): the test CA and
client certificate, Kafka's SSL (mTLS) and SASL_SSL (SCRAM-SHA-512) listeners, MariaDB users
that require TLS, and a CA that has signed nothing of ours.

Generic like ``servers.py``: nothing here imports the ``relay`` package.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from servers import REPO_ROOT, MariaDB, server_sql, unique_name

# dev-only SCRAM-SHA-512 credentials created by deploy/local/servers.sh
SCRAM_USER = "relay"
SCRAM_PASSWORD = "relay"  # noqa: S105

RESTART_HINT = (
    "servers started by a servers.sh from before TLS lack it: restart them with"
    " `bash deploy/local/servers.sh down && bash deploy/local/servers.sh up`"
)


@dataclass(frozen=True)
class Certs:
    """The files deploy/local/certs.sh made under ``<state dir>/certs``."""

    directory: Path

    @property
    def ca(self) -> str:
        return str(self.directory / "ca.pem")

    @property
    def client_cert(self) -> str:
        return str(self.directory / "client.pem")

    @property
    def client_key(self) -> str:
        return str(self.directory / "client.key")


@dataclass(frozen=True)
class SecureKafka:
    ssl_bootstrap: str  # TLS, a client certificate from the test CA required
    sasl_bootstrap: str  # SASL_SSL, SCRAM-SHA-512, no client certificate


def certs_from_env() -> Certs:
    """Under ``$OUTBOX_LOCAL_DIR`` (default ``<repo>/.local``), as servers.sh puts them."""
    state = Path(os.environ.get("OUTBOX_LOCAL_DIR") or REPO_ROOT / ".local")
    return Certs(state.resolve() / "certs")


def secure_kafka_from_env() -> SecureKafka:
    return SecureKafka(
        ssl_bootstrap=f"127.0.0.1:{os.environ.get('OUTBOX_KAFKA_SSL_PORT', '19094')}",
        sasl_bootstrap=f"127.0.0.1:{os.environ.get('OUTBOX_KAFKA_SASL_PORT', '19095')}",
    )


def tls_problems(server: MariaDB, certs: Certs, kafka: SecureKafka) -> list[str]:
    """What is missing for the TLS tests (empty when nothing): certificates, MariaDB's TLS, the
    Kafka listeners."""
    problems = [
        f"missing {path}"
        for path in (certs.ca, certs.client_cert, certs.client_key)
        if not Path(path).is_file()
    ]
    rows = server_sql(server, "SELECT @@have_ssl")
    row = rows[0] if rows else None
    if not row or row[0] != "YES":
        problems.append(f"MariaDB at {server.address} runs without TLS (have_ssl={row})")
    for bootstrap in (kafka.ssl_bootstrap, kafka.sasl_bootstrap):
        host, _, port = bootstrap.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=3).close()
        except OSError as exc:
            problems.append(f"no Kafka listener at {bootstrap} ({exc})")
    return problems


def create_user(server: MariaDB, database: str, require: str) -> tuple[str, str]:
    """A user ``tls_<hex>``@'%' with every privilege on ``database`` and ``REQUIRE <require>``
    (``SSL``, ``X509``, ``NONE``); returns (user, password)."""
    user, password = unique_name("tls_"), unique_name("pw_")
    server_sql(server, f"CREATE USER '{user}'@'%%' IDENTIFIED BY %s REQUIRE {require}", password)
    server_sql(server, f"GRANT ALL PRIVILEGES ON `{database}`.* TO '{user}'@'%'")
    return user, password


def drop_user(server: MariaDB, user: str) -> None:
    server_sql(server, f"DROP USER IF EXISTS '{user}'@'%'")


def make_other_ca(directory: Path) -> str:
    """A self-signed CA certificate (PEM) that has signed nothing of the servers'; its path."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not the outbox-relay test CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = directory / "other-ca.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)
