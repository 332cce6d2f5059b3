"""The binlog follower's event decoding on hand-built packets: MariaDB's v1 and MySQL's v2 row
events, table ids reused for another table, truncated and non-event packets (MySQL itself is not
among the test servers; MariaDB's stream is tested in tests/integration/test_binlog.py)."""

from __future__ import annotations

from relay import binlog

WRITE_V1, UPDATE_V1, WRITE_V2, UPDATE_V2 = 23, 24, 30, 31


def _event(kind: int, body: bytes) -> bytes:
    header = binlog.HEADER.pack(0, kind, 1, binlog.HEADER.size + len(body), 0, 0)
    return b"\x00" + header + body


def _table_map(table_id: int, schema: str, table: str) -> bytes:
    names = bytes([len(schema)]) + schema.encode() + b"\x00"
    names += bytes([len(table)]) + table.encode() + b"\x00"
    return _event(binlog.TABLE_MAP_EVENT, table_id.to_bytes(6, "little") + b"\x00\x00" + names)


def _rows(kind: int, table_id: int) -> bytes:
    return _event(kind, table_id.to_bytes(6, "little") + b"\x00\x00" + b"rows...")


XID = _event(binlog.XID_EVENT, b"\x01" * 8)


def _commits(events: binlog.Events, *packets: bytes) -> list[bool]:
    return [events.commit_with_outbox_rows(p) for p in packets]


def test_a_commit_that_wrote_outbox_rows_is_seen_in_both_row_event_versions() -> None:
    for write in (WRITE_V1, WRITE_V2):
        events = binlog.Events("app", "outbox")
        seen = _commits(events, _table_map(7, "app", "outbox"), _rows(write, 7), XID)
        assert seen == [False, False, True]
        assert _commits(events, XID) == [False]  # the next transaction wrote nothing


def test_updates_other_tables_and_other_schemas_are_not() -> None:
    events = binlog.Events("app", "outbox")
    packets = [
        _table_map(7, "app", "outbox"),
        _rows(UPDATE_V1, 7),  # the relay's mark
        _rows(UPDATE_V2, 7),
        _table_map(8, "app", "orders"),
        _rows(WRITE_V2, 8),
        _table_map(9, "other", "outbox"),
        _rows(WRITE_V1, 9),
        XID,
    ]
    assert not any(_commits(events, *packets))


def test_a_table_id_reused_for_another_table_no_longer_counts() -> None:
    events = binlog.Events("app", "outbox")
    _commits(events, _table_map(7, "app", "outbox"), XID)
    assert _commits(events, _table_map(7, "app", "orders"), _rows(WRITE_V1, 7), XID)[-1] is False


def test_truncated_and_non_event_packets_are_ignored() -> None:
    events = binlog.Events("app", "outbox")
    whole = _table_map(7, "app", "outbox")
    for packet in (b"", b"\x00", b"\xfe\x00\x00", whole[:26], whole[:33], b"\x01" + whole[1:]):
        assert events.commit_with_outbox_rows(packet) is False
    assert _commits(events, _rows(WRITE_V1, 7), XID) == [False, False]  # no table map was read
