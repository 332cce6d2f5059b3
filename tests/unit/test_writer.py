"""The writer helper: Event validation, INSERT parameters, and that it never ends a transaction."""

from __future__ import annotations

import datetime
import decimal
import re
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pymysql.converters
import pytest

from relay import store, writer

INSERT_PARAMS = set(re.findall(r"%\((\w+)\)s", store.Store("outbox").sql["insert_event"]))


class FakeCursor:
    """Records every call; has the methods a transaction could be ended with, to catch them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def executemany(self, sql: str, params: list[dict[str, object]]) -> int:
        self.calls.append(("executemany", (sql, params)))
        return len(params)

    def execute(self, *args: Any) -> int:
        self.calls.append(("execute", args))
        return 0

    @property
    def connection(self) -> Any:
        self.calls.append(("connection", ()))
        raise AssertionError("the writer must not touch the connection")


class AsyncFakeCursor(FakeCursor):
    async def executemany(self, sql: str, params: list[dict[str, object]]) -> int:  # type: ignore[override]
        return super().executemany(sql, params)

    async def execute(self, *args: Any) -> int:  # type: ignore[override]
        return super().execute(*args)


def test_event_defaults() -> None:
    event = writer.Event("order", "17", "OrderCreated")
    assert event.op == "u"
    assert uuid.UUID(event.message_id).version == 4
    assert writer.Event("order", "17", "OrderCreated").message_id != event.message_id


@pytest.mark.parametrize("op", ["x", "U", "", "update"])
def test_event_rejects_unknown_op(op: str) -> None:
    with pytest.raises(ValueError, match="op must be one of"):
        writer.Event("order", "17", "OrderCreated", op=op)


def test_event_rejects_naive_event_time() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        writer.Event("order", "17", "E", event_time=datetime.datetime(2024, 1, 1))  # noqa: DTZ001


def test_params_match_the_insert_statement() -> None:
    assert set(writer.Event("order", "17", "E").params()) == INSERT_PARAMS


def test_params_values() -> None:
    when = datetime.datetime(
        2024, 5, 6, 7, 8, 9, 123456, tzinfo=datetime.timezone(datetime.timedelta(hours=2))
    )
    event = writer.Event(
        "order",
        "17",
        "OrderPaid",
        op="c",
        before=None,
        after={"status": "paid", "lines": [1, 2]},
        payload=b"raw",
        headers={"trace": "t1"},
        topic="orders",
        source_table="orders",
        event_time=when,
        message_id="00000000-0000-4000-8000-000000000001",
    )
    params = event.params()
    event_ts = params.pop("event_ts")
    assert params == {
        "message_id": "00000000-0000-4000-8000-000000000001",
        "aggregate_type": "order",
        "aggregate_id": "17",
        "event_type": "OrderPaid",
        "op": "c",
        "before_state": None,
        "after_state": '{"status":"paid","lines":[1,2]}',
        "payload": b"raw",
        "headers": '{"trace":"t1"}',
        "topic": "orders",
        "source_table": "orders",
    }
    # 05:08:09.123456 UTC, to the microsecond whatever the offset, as the SQL literal the driver
    # sends to FROM_UNIXTIME: a DOUBLE literal ("...e0") loses the last microsecond on the server
    literal = pymysql.converters.escape_item(event_ts, "utf8mb4")
    utc = datetime.datetime(2024, 5, 6, 5, 8, 9, 123456, tzinfo=datetime.UTC)
    assert decimal.Decimal(literal) == decimal.Decimal(int(utc.timestamp())) + decimal.Decimal(
        "0.123456"
    )
    assert "e" not in literal.lower(), f"event_ts is sent as DOUBLE literal {literal}"
    assert orjson.loads(str(params["after_state"])) == {"status": "paid", "lines": [1, 2]}


def test_params_without_event_time_leave_it_to_the_server() -> None:
    assert writer.Event("order", "17", "E").params()["event_ts"] is None


def test_add_sync_only_inserts_on_the_given_cursor() -> None:
    cursor = FakeCursor()
    events = [writer.Event("order", "1", "A"), writer.Event("order", "2", "B")]
    ids = writer.OutboxWriter("my_outbox").add_sync(cursor, *events)
    assert ids == [e.message_id for e in events]
    assert len(cursor.calls) == 1
    name, (sql, params) = cursor.calls[0]
    assert name == "executemany"
    assert sql.startswith("INSERT INTO `my_outbox`")
    assert params == [e.params() for e in events]


async def test_add_only_inserts_on_the_given_cursor() -> None:
    cursor = AsyncFakeCursor()
    event = writer.Event("order", "1", "A")
    ids = await writer.OutboxWriter().add(cursor, event)
    assert ids == [event.message_id]
    assert [name for name, _ in cursor.calls] == ["executemany"]
    assert cursor.calls[0][1][1] == [event.params()]


@pytest.fixture
def udp_listener() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    try:
        yield sock
    finally:
        sock.close()


def test_notify_sends_a_wakeup_datagram(udp_listener: socket.socket) -> None:
    port = udp_listener.getsockname()[1]
    w = writer.OutboxWriter(notify_to=f"127.0.0.1:{port}")
    try:
        w.notify()
        data, _ = udp_listener.recvfrom(64)
    finally:
        w.close()
    assert data == b"outbox"


def test_notify_without_addresses_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    sockets: list[socket.socket] = []
    sent: list[tuple[Any, ...]] = []
    real_socket = socket.socket

    def watched_socket(*args: Any, **kwargs: Any) -> socket.socket:
        sock = real_socket(*args, **kwargs)
        sockets.append(sock)
        return sock

    monkeypatch.setattr(socket, "socket", watched_socket)
    monkeypatch.setattr(real_socket, "sendto", lambda _sock, *args: sent.append(args))
    for w in (writer.OutboxWriter(), writer.OutboxWriter(notify_to="")):
        w.notify()
        w.close()
    assert sockets == []  # no notifier: no socket at all
    assert sent == []
