"""Opening relay connections to MySQL/MariaDB. Statements themselves live in ``relay.store``."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiomysql
import pymysql.err
from pymysql.constants import CLIENT

from relay import config, errors, store

Connection = Any  # aiomysql.Connection is untyped
ConnectionContext = contextlib.AbstractAsyncContextManager[Connection]
IDLE_MARGIN_MIN_S = 2.0
IDLE_MARGIN_MAX_S = 10.0


async def connect(
    settings: config.Settings, *, autocommit: bool = True, lock_wait_timeout_s: float | None = None
) -> Connection:
    """A connection set up for the relay: READ COMMITTED, UTC, a bounded lock wait (by default
    ``RELAY_WORKER__LOCK_WAIT_TIMEOUT_S``)."""
    db = settings.db
    conn = _Connection(
        host=db.host,
        port=db.port,
        user=db.user,
        password=db.password.get_secret_value(),
        db=db.name,
        autocommit=autocommit,
        connect_timeout=db.connect_timeout_s,
        charset="utf8mb4",
        ssl=ssl_context(db),
        tls_required=db.ssl_mode not in ("disabled", "preferred"),
    )
    try:
        # The whole of it (TCP, TLS handshake, login) within the connect timeout: aiomysql
        # bounds only the TCP connect, and asyncio the TLS handshake at 60 s.
        async with asyncio.timeout(db.connect_timeout_s):
            await conn._connect()  # what aiomysql.connect does, with the class above
    except TimeoutError:
        conn.close()
        raise pymysql.err.OperationalError(
            CR_CONN_HOST_ERROR,
            f"connecting to {db.host}:{db.port} took over RELAY_DB__CONNECT_TIMEOUT_S"
            f" ({db.connect_timeout_s} s) (TCP, TLS handshake or login)",
        ) from None
    except pymysql.err.OperationalError as exc:
        if isinstance(exc.__cause__, ssl.SSLError):  # aiomysql says only "Can't connect"
            raise pymysql.err.OperationalError(
                CR_SSL_CONNECTION_ERROR, _tls_failure(db, _ssl_reason(exc.__cause__))
            ) from exc
        raise
    try:
        await store.Store(settings.outbox.table, settings.db.call_timeout_s).prepare_session(
            conn,
            lock_wait_timeout_s=lock_wait_timeout_s or settings.worker.lock_wait_timeout_s,
            idle_timeout_s=idle_transaction_timeout_s(settings),
        )
    except BaseException:
        conn.close()
        raise
    return conn


# The MySQL client's "Can't connect to MySQL server" (CR_CONN_HOST_ERROR).
CR_CONN_HOST_ERROR = 2003
# The MySQL client's "SSL connection error" (CR_SSL_CONNECTION_ERROR): TLS failed while
# connecting. Like any failure to connect it is retried by `relay run` (one-shot commands exit 3).
CR_SSL_CONNECTION_ERROR = 2026


def ssl_context(settings: config.DatabaseSettings) -> ssl.SSLContext | None:
    """The TLS context of ``RELAY_DB__SSL_*``; None when ``disabled``.

    As MySQL clients: ``preferred`` and ``required`` check no certificate; ``verify_ca`` checks
    the server's chain against ``ssl_ca`` (the system's CAs without it); ``verify_identity``
    also that the certificate names ``host``. TLS 1.2 or later. Files are read on each call, so
    new connections pick up renewed certificates. Raises ConfigError naming the variable when a
    file cannot be used.
    """
    mode = settings.ssl_mode
    if mode == "disabled":
        return None
    if mode in ("verify_ca", "verify_identity"):
        try:
            context = ssl.create_default_context(cafile=settings.ssl_ca)  # None: system CAs
        except (OSError, ssl.SSLError) as exc:
            raise errors.ConfigError(
                f"invalid configuration: RELAY_DB__SSL_CA: cannot load {settings.ssl_ca}:"
                f" {_ssl_reason(exc)}"
            ) from None
        context.check_hostname = mode == "verify_identity"
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if settings.ssl_cert:
        try:
            context.load_cert_chain(settings.ssl_cert, settings.ssl_key)
        except (OSError, ssl.SSLError) as exc:
            raise errors.ConfigError(
                "invalid configuration: RELAY_DB__SSL_CERT/RELAY_DB__SSL_KEY: cannot load"
                f" {settings.ssl_cert}, {settings.ssl_key}: {_ssl_reason(exc)}"
            ) from None
    return context


class _Connection(aiomysql.Connection):  # type: ignore[misc] # aiomysql is untyped
    """aiomysql's connection, minus its silent fallback: given a TLS context it goes on in plain
    text when the server (or anyone in between) does not offer TLS. Here ``required`` and
    ``verify_*`` refuse before any credential is sent, and ``preferred`` falls back without
    claiming TLS in its handshake response (as MySQL's own client)."""

    _writer: Any  # aiomysql's stream writer and reader, None once closed
    _reader: Any

    def __init__(self, *args: Any, tls_required: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tls_required = tls_required

    async def _request_authentication(self) -> None:
        if self._ssl_context is not None and not self.server_capabilities & CLIENT.SSL:
            if self._tls_required:
                raise pymysql.err.OperationalError(
                    CR_SSL_CONNECTION_ERROR,
                    f"SSL connection error: the server {self._host}:{self._port} does not offer"
                    " TLS, and RELAY_DB__SSL_MODE requires it",
                )
            self.client_flag &= ~CLIENT.SSL
        await super()._request_authentication()

    def close(self) -> None:
        """Close at once, over TLS too: a TLS transport's close() first waits for the server's
        close_notify, and a loop that stops meanwhile leaks the socket. The MySQL protocol
        frames its own packets, so nothing is lost by not waiting (as in plain text)."""
        writer = self._writer
        if writer is not None and writer.get_extra_info("ssl_object") is not None:
            self._writer = self._reader = None
            writer.transport.abort()
            return
        super().close()


def _ssl_reason(exc: BaseException) -> str:
    """``certificate verify failed: unable to get local issuer certificate``, say."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return errors.one_line(exc)


def _tls_failure(db: config.DatabaseSettings, reason: str) -> str:
    ca = f", RELAY_DB__SSL_CA={db.ssl_ca}" if db.ssl_ca else ""
    return (
        f"SSL connection error: {reason} (server {db.host}:{db.port},"
        f" RELAY_DB__SSL_MODE={db.ssl_mode}{ca})"
    )


def idle_transaction_timeout_s(settings: config.Settings) -> float:
    """How long the server lets a relay session idle inside a transaction: a cycle idles while
    it publishes (``publish_timeout_s``, dead-letter copy included), plus a margin of half the
    publish timeout (2 to 10 s), so that other relays take a silent relay's shards over within
    twice the publish timeout."""
    publish_s = settings.worker.publish_timeout_s
    return publish_s + max(IDLE_MARGIN_MIN_S, min(IDLE_MARGIN_MAX_S, publish_s / 2))


@contextlib.asynccontextmanager
async def connection(
    settings: config.Settings, *, autocommit: bool = True, lock_wait_timeout_s: float | None = None
) -> AsyncIterator[Connection]:
    """``async with db.connection(settings) as conn:`` a relay connection, closed afterwards."""
    conn = await connect(settings, autocommit=autocommit, lock_wait_timeout_s=lock_wait_timeout_s)
    try:
        yield conn
    finally:
        close(conn)


def close(conn: Connection | None) -> None:
    """Close without waiting on a server that may be gone."""
    if conn is not None:
        conn.close()
