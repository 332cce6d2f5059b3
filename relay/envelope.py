"""Turning an outbox row into a Kafka record: topic, key, value and headers. Pure functions.

A row that can never become a valid record raises :class:`PoisonRowError` with a bounded reason.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import orjson

from relay import config

# Bytes a record costs on the wire beyond key, value and headers (record batch framing).
RECORD_OVERHEAD_BYTES = 128
# Headers the relay sets on every record; a row's own headers may not repeat them.
RESERVED_HEADERS = frozenset({"message_id", "event_type", "aggregate_type"})

# The unit of order and of holding: (aggregate_type, aggregate_id), compared as bytes.
AggregateKey = tuple[str, str]


class Row(NamedTuple):
    """One claimed outbox row, in the column order of the ``claim_rows`` query."""

    id: int
    message_id: str
    aggregate_type: str
    aggregate_id: str
    event_type: str
    op: str
    before_state: str | None
    after_state: str | None
    payload: bytes | None
    headers: str | None
    topic: str | None
    source_table: str | None
    event_us: int
    shard: int = 0

    @property
    def aggregate(self) -> AggregateKey:
        return (self.aggregate_type, self.aggregate_id)


@dataclasses.dataclass(slots=True)
class Record:
    row_id: int
    aggregate: AggregateKey
    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]
    event_us: int
    timestamp_ms: int | None = None  # the record's timestamp; None: the producer's clock


class PoisonRowError(Exception):
    """The row can never be published as it is. ``reason`` is a bounded metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Formatter:
    """Builds records from rows according to the outbox settings."""

    topic_template: str
    value_format: str
    source_db: str
    max_record_bytes: int
    event_time_stamps: bool = False  # the record timestamp is the row's event_time

    @classmethod
    def from_settings(cls, settings: config.Settings) -> Formatter:
        return cls(
            topic_template=settings.outbox.topic_template,
            value_format=settings.outbox.value_format,
            source_db=settings.db.name,
            max_record_bytes=settings.kafka.max_request_bytes - RECORD_OVERHEAD_BYTES,
            event_time_stamps=settings.outbox.record_timestamp == "event_time",
        )

    def topic(self, row: Row) -> str:
        if row.topic:
            return _checked_topic(row.topic)
        if row.source_table is None and "{source_table}" in self.topic_template:
            raise PoisonRowError(
                "bad_row", "the topic template needs source_table, which the row leaves NULL"
            )
        return _template_topic(
            self.topic_template, row.aggregate_type, row.event_type, row.source_table or ""
        )

    def record(self, row: Row, capture_us: int) -> Record:
        headers = self.headers(row)
        if self.value_format == "payload" and row.payload is not None:
            value = row.payload
        else:
            value = self.envelope(row, capture_us)
        key = row.aggregate_id.encode()
        size = len(key) + len(value)
        for name, header in headers:
            size += len(name) + len(header)
        if size > self.max_record_bytes:
            raise PoisonRowError(
                "too_large",
                f"record of {size} bytes exceeds RELAY_KAFKA__MAX_REQUEST_BYTES "
                f"({self.max_record_bytes + RECORD_OVERHEAD_BYTES} incl. overhead)",
            )
        timestamp_ms = row.event_us // 1000 if self.event_time_stamps else None
        return Record(
            row.id, row.aggregate, self.topic(row), key, value, headers, row.event_us, timestamp_ms
        )

    def envelope(self, row: Row, capture_us: int) -> bytes:
        """The design note's domain event: pk, op, before, after, source, event and capture time."""
        before = _json_fragment("before_state", row.before_state)
        after = _json_fragment("after_state", row.after_state)
        doc: dict[str, object] = {
            "message_id": row.message_id,
            "aggregate_type": row.aggregate_type,
            "aggregate_id": row.aggregate_id,
            "event_type": row.event_type,
            "op": row.op,
            "pk": row.aggregate_id,
            "before": before,
            "after": after,
            "source": {"db": self.source_db, "table": row.source_table, "ts_us": row.event_us},
            "event_time_us": row.event_us,
            "capture_time_us": capture_us,
        }
        if row.payload is not None:
            doc["payload"] = _json_fragment("payload", row.payload)
        return orjson.dumps(doc)

    @staticmethod
    def headers(row: Row) -> list[tuple[str, bytes]]:
        headers = [
            ("message_id", row.message_id.encode()),
            ("event_type", row.event_type.encode()),
            ("aggregate_type", row.aggregate_type.encode()),
        ]
        if row.headers is None:
            return headers
        try:
            extra = orjson.loads(row.headers)
        except orjson.JSONDecodeError as exc:
            raise PoisonRowError("bad_headers", f"headers are not JSON: {exc}") from None
        if not isinstance(extra, dict):
            raise PoisonRowError("bad_headers", "headers must be a JSON object of strings")
        for name, value in extra.items():
            if name in RESERVED_HEADERS:
                raise PoisonRowError(
                    "bad_headers", f"header {name!r} is set by the relay; rename it in the row"
                )
            if not isinstance(value, str):
                raise PoisonRowError(
                    "bad_headers", f"header {name!r} must be a string, not {type(value).__name__}"
                )
            headers.append((name, value.encode()))
        return headers


# Rows repeat a few topics: the template's result and the name check are cached (errors are not).
@functools.lru_cache(maxsize=1024)
def _checked_topic(topic: str) -> str:
    if not config.is_topic_name(topic):
        raise PoisonRowError("invalid_topic", f"invalid Kafka topic name {topic!r}")
    return topic


@functools.lru_cache(maxsize=1024)
def _template_topic(template: str, aggregate_type: str, event_type: str, source_table: str) -> str:
    topic = template.format(
        aggregate_type=aggregate_type, event_type=event_type, source_table=source_table
    )
    return _checked_topic(topic)


def _json_fragment(column: str, text: str | bytes | None) -> orjson.Fragment | None:
    """The column's JSON, checked strictly and embedded as is.

    The server's check is not enough: MariaDB's JSON_VALID accepts ``{"a":"\\q","b":1.}``,
    which consumers' parsers refuse.
    """
    if text is None:
        return None
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise PoisonRowError("bad_json", f"{column} is not valid JSON: {exc}") from None
    return orjson.Fragment(text)
