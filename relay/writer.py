"""Writer helper for Service A: add outbox events inside the caller's own transaction.

It only runs an INSERT on the cursor it is given; it never begins, commits or rolls back.
Commit (or roll back) your domain change and the events together, then optionally call
:meth:`OutboxWriter.notify` so relays wake up at once instead of at their next poll.

Per-aggregate order: ids must follow commit order within an aggregate. Insert the outbox rows
after the statement that locks the aggregate (its ``UPDATE`` or ``SELECT ... FOR UPDATE``), so
two transactions on one aggregate cannot interleave their inserts.

With aiomysql::

    async with conn.cursor() as cur:
        await cur.execute("UPDATE orders SET status='paid' WHERE id=%s", (order_id,))
        await writer.add(cur, writer_mod.Event("order", str(order_id), "OrderPaid", after={...}))
    await conn.commit()
    writer.notify()

With PyMySQL use :meth:`OutboxWriter.add_sync` the same way.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import uuid
from collections.abc import Mapping
from typing import Any

import orjson

from relay import store, wakeup

OPS = frozenset({"c", "u", "d", "r"})
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """One domain event. ``before``/``after`` are JSON-serialisable states of the aggregate."""

    aggregate_type: str
    aggregate_id: str
    event_type: str
    op: str = "u"
    before: Mapping[str, Any] | None = None
    after: Mapping[str, Any] | None = None
    payload: bytes | None = None
    headers: Mapping[str, str] | None = None
    topic: str | None = None
    source_table: str | None = None
    event_time: datetime.datetime | None = None
    message_id: str = dataclasses.field(default_factory=lambda: str(uuid.uuid4()))

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"op must be one of {sorted(OPS)}, not {self.op!r}")
        if self.event_time is not None and self.event_time.tzinfo is None:
            raise ValueError("event_time must be timezone-aware")

    def params(self) -> dict[str, object]:
        return {
            "message_id": self.message_id,
            "aggregate_type": self.aggregate_type,
            "aggregate_id": self.aggregate_id,
            "event_type": self.event_type,
            "op": self.op,
            "before_state": _json(self.before),
            "after_state": _json(self.after),
            "payload": self.payload,
            "headers": _json(self.headers),
            "topic": self.topic,
            "source_table": self.source_table,
            "event_ts": None if self.event_time is None else _epoch_seconds(self.event_time),
        }


def _epoch_seconds(when: datetime.datetime) -> decimal.Decimal:
    """Exact to the microsecond (a float would round some of them away)."""
    delta = when - EPOCH
    micros = (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds
    return decimal.Decimal(micros).scaleb(-6)


def _json(value: Mapping[str, Any] | None) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


class OutboxWriter:
    def __init__(self, table: str = "outbox", notify_to: str | None = None) -> None:
        """``notify_to``: relay wake-up addresses ``"host:port,..."`` (RELAY_WAKEUP__PORT)."""
        self._store = store.Store(table)
        self._notifier = wakeup.Notifier.parse(notify_to) if notify_to else None

    async def add(self, cursor: Any, *events: Event) -> list[str]:
        """Insert events with an aiomysql cursor; returns their message ids."""
        await self._store.insert_events(cursor, [e.params() for e in events])
        return [e.message_id for e in events]

    def add_sync(self, cursor: Any, *events: Event) -> list[str]:
        """Insert events with a PyMySQL (DB-API) cursor; returns their message ids."""
        self._store.insert_events_sync(cursor, [e.params() for e in events])
        return [e.message_id for e in events]

    def notify(self) -> None:
        """After commit: nudge the relays (best effort, never raises)."""
        if self._notifier is not None:
            self._notifier.notify()

    def close(self) -> None:
        if self._notifier is not None:
            self._notifier.close()
