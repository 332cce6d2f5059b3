"""Rows to Kafka records: topic routing, headers, value formats, size limit, envelope fields."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from relay import config, envelope

EVENT_US = 1_700_000_000_123_456
CAPTURE_US = 1_700_000_001_000_000


def make_row(**changes: Any) -> envelope.Row:
    row = envelope.Row(
        id=42,
        message_id="6f1c2a7e-0000-4000-8000-000000000042",
        aggregate_type="order",
        aggregate_id="order-17",
        event_type="OrderPaid",
        op="u",
        before_state='{"status": "new"}',
        after_state='{"status": "paid", "total": 12.5}',
        payload=None,
        headers=None,
        topic=None,
        source_table="orders",
        event_us=EVENT_US,
    )
    return row._replace(**changes)


def make_formatter(**changes: Any) -> envelope.Formatter:
    defaults: dict[str, Any] = {
        "topic_template": "outbox.{aggregate_type}",
        "value_format": "envelope",
        "source_db": "shop",
        "max_record_bytes": 100_000,
    }
    return envelope.Formatter(**{**defaults, **changes})


def poison_reason(formatter: envelope.Formatter, row: envelope.Row) -> str:
    with pytest.raises(envelope.PoisonRowError) as raised:
        formatter.record(row, CAPTURE_US)
    return raised.value.reason


# ------------------------------------------------------------------ topic


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("outbox.{aggregate_type}", "outbox.order"),
        ("{aggregate_type}.{event_type}", "order.OrderPaid"),
        ("cdc.{source_table}", "cdc.orders"),
        ("all-events", "all-events"),
    ],
)
def test_topic_from_template(template: str, expected: str) -> None:
    assert make_formatter(topic_template=template).topic(make_row()) == expected
    assert make_formatter(topic_template=template).record(make_row(), CAPTURE_US).topic == expected


def test_explicit_topic_wins_over_template() -> None:
    record = make_formatter().record(make_row(topic="billing_v2"), CAPTURE_US)
    assert record.topic == "billing_v2"


@pytest.mark.parametrize(
    "row",
    [
        make_row(topic="has space"),
        make_row(topic="slash/topic"),
        make_row(topic="x" * 250),
        make_row(topic="caf\u00e9"),
        make_row(topic="."),  # Kafka forbids "." and ".." as topic names
        make_row(topic=".."),
        make_row(aggregate_type="Order Line"),  # through the template
        make_row(aggregate_type="a" * 250),
    ],
    ids=["space", "slash", "too-long", "non-ascii", "dot", "dotdot", "template", "template-long"],
)
def test_invalid_topic_is_poison(row: envelope.Row) -> None:
    assert poison_reason(make_formatter(), row) == "invalid_topic"


def test_template_field_the_row_leaves_empty_is_poison() -> None:
    formatter = make_formatter(topic_template="cdc.{source_table}")
    assert poison_reason(formatter, make_row(source_table=None)) == "bad_row"
    # a row with its own topic does not need the template
    assert formatter.topic(make_row(source_table=None, topic="explicit")) == "explicit"


def test_longest_valid_topic_is_accepted() -> None:
    assert make_formatter().topic(make_row(topic="t" * 249)) == "t" * 249


# ------------------------------------------------------------------ headers


def test_default_headers() -> None:
    record = make_formatter().record(make_row(), CAPTURE_US)
    assert record.headers == [
        ("message_id", b"6f1c2a7e-0000-4000-8000-000000000042"),
        ("event_type", b"OrderPaid"),
        ("aggregate_type", b"order"),
    ]


def test_extra_headers_object_of_strings() -> None:
    row = make_row(headers='{"trace_id": "abc", "tenant": "t\u00e9"}')
    headers = make_formatter().record(row, CAPTURE_US).headers
    assert headers[3:] == [("trace_id", b"abc"), ("tenant", "t\u00e9".encode())]


@pytest.mark.parametrize(
    "headers",
    ["[1, 2]", '"just a string"', "42", "null", '{"a": 1}', '{"a": {"b": "c"}}', '{"a": null}'],
)
def test_bad_headers_are_poison(headers: str) -> None:
    assert poison_reason(make_formatter(), make_row(headers=headers)) == "bad_headers"


def test_headers_not_json_are_poison() -> None:
    assert poison_reason(make_formatter(), make_row(headers="{not json")) == "bad_headers"


# ------------------------------------------------------------------ value


def test_envelope_fields() -> None:
    record = make_formatter().record(make_row(), CAPTURE_US)
    doc = orjson.loads(record.value)
    assert doc == {
        "message_id": "6f1c2a7e-0000-4000-8000-000000000042",
        "aggregate_type": "order",
        "aggregate_id": "order-17",
        "event_type": "OrderPaid",
        "op": "u",
        "pk": "order-17",
        "before": {"status": "new"},
        "after": {"status": "paid", "total": 12.5},
        "source": {"db": "shop", "table": "orders", "ts_us": EVENT_US},
        "event_time_us": EVENT_US,
        "capture_time_us": CAPTURE_US,
    }
    assert record.key == b"order-17"
    assert record.row_id == 42
    assert record.event_us == EVENT_US


def test_envelope_create_and_delete_have_null_states() -> None:
    created = orjson.loads(
        make_formatter().envelope(make_row(op="c", before_state=None), CAPTURE_US)
    )
    deleted = orjson.loads(make_formatter().envelope(make_row(op="d", after_state=None), 0))
    assert created["before"] is None
    assert created["after"] == {"status": "paid", "total": 12.5}
    assert deleted["after"] is None
    assert deleted["source"]["table"] == "orders"


def test_envelope_embeds_json_payload() -> None:
    row = make_row(payload=b'{"amount": 3, "items": [1, 2]}')
    doc = orjson.loads(make_formatter().record(row, CAPTURE_US).value)
    assert doc["payload"] == {"amount": 3, "items": [1, 2]}


def test_envelope_without_payload_has_no_payload_field() -> None:
    doc = orjson.loads(make_formatter().record(make_row(), CAPTURE_US).value)
    assert "payload" not in doc


def test_envelope_with_non_json_payload_is_poison() -> None:
    assert poison_reason(make_formatter(), make_row(payload=b"\x00\x01binary")) == "bad_json"


@pytest.mark.parametrize("column", ["before_state", "after_state"])
@pytest.mark.parametrize(
    "text",
    ['{"a":"\\q","b":1.}', '{"a": 1,}', "{'a': 1}", '{"a": NaN}'],
    ids=["bad-escape-and-number", "trailing-comma", "single-quotes", "nan"],
)
def test_json_the_server_accepts_but_parsers_refuse_is_poison(column: str, text: str) -> None:
    """MariaDB's JSON_VALID accepts some of these; consumers' parsers do not."""
    assert poison_reason(make_formatter(), make_row(**{column: text})) == "bad_json"


@pytest.mark.parametrize("name", ["message_id", "event_type", "aggregate_type"])
def test_reserved_header_names_are_poison(name: str) -> None:
    row = make_row(headers=orjson.dumps({name: "mine"}).decode())
    assert poison_reason(make_formatter(), row) == "bad_headers"


def test_record_carries_its_aggregate() -> None:
    row = make_row()
    record = make_formatter().record(row, CAPTURE_US)
    assert record.aggregate == (row.aggregate_type, row.aggregate_id)


def test_payload_mode_sends_raw_payload() -> None:
    formatter = make_formatter(value_format="payload")
    raw = b"\x00\x01 not json at all"
    assert formatter.record(make_row(payload=raw), CAPTURE_US).value == raw


def test_payload_mode_without_payload_falls_back_to_envelope() -> None:
    formatter = make_formatter(value_format="payload")
    doc = orjson.loads(formatter.record(make_row(payload=None), CAPTURE_US).value)
    assert doc["message_id"] == "6f1c2a7e-0000-4000-8000-000000000042"


# ------------------------------------------------------------------ size


def test_record_at_limit_passes_and_one_byte_more_is_too_large() -> None:
    base = make_formatter(value_format="payload")
    row = make_row(payload=b"p" * 1000)
    record = base.record(row, CAPTURE_US)
    size = len(record.key) + len(record.value) + sum(len(k) + len(v) for k, v in record.headers)
    assert make_formatter(value_format="payload", max_record_bytes=size).record(row, CAPTURE_US)
    too_small = make_formatter(value_format="payload", max_record_bytes=size - 1)
    assert poison_reason(too_small, row) == "too_large"


def test_too_large_envelope() -> None:
    big_after = orjson.dumps({"blob": "x" * 5000}).decode()
    formatter = make_formatter(max_record_bytes=4096)
    with pytest.raises(envelope.PoisonRowError) as raised:
        formatter.record(make_row(after_state=big_after), CAPTURE_US)
    assert raised.value.reason == "too_large"
    assert "RELAY_KAFKA__MAX_REQUEST_BYTES" in str(raised.value)


def test_from_settings_leaves_room_for_record_overhead() -> None:
    settings = config.load(
        db={"name": "shop"},
        kafka={"max_request_bytes": 2048},
        outbox={"topic_template": "x.{event_type}", "value_format": "payload"},
    )
    formatter = envelope.Formatter.from_settings(settings)
    assert formatter == envelope.Formatter(
        topic_template="x.{event_type}",
        value_format="payload",
        source_db="shop",
        max_record_bytes=2048 - envelope.RECORD_OVERHEAD_BYTES,
    )
