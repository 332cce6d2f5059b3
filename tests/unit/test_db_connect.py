"""Opening a database connection is bounded as a whole by RELAY_DB__CONNECT_TIMEOUT_S."""

from __future__ import annotations

import asyncio

import pymysql.err
import pytest

from relay import config, db, errors


async def test_a_server_that_accepts_but_never_speaks_times_out_as_a_passing_failure() -> None:
    held: list[asyncio.StreamWriter] = []  # connections accepted and left silent

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = config.Settings(
        db=config.DatabaseSettings(
            host="127.0.0.1", port=port, connect_timeout_s=0.2, ssl_mode="required"
        )
    )
    try:
        with pytest.raises(pymysql.err.OperationalError) as raised:
            await db.connect(settings)
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
    assert held, "the relay never reached the server"
    code, message = raised.value.args
    assert code == db.CR_CONN_HOST_ERROR
    assert "RELAY_DB__CONNECT_TIMEOUT_S (0.2 s)" in message
    assert errors.classify(raised.value) is errors.Kind.TRANSIENT
