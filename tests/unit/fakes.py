"""In-memory fakes of the store, the publisher and the Kafka producer, for unit tests of the
worker cycle, the ordering rule and the daemon's lifecycle (no servers).

- :class:`FakeStore` implements :class:`relay.store.Claiming` over a dict of rows with
  transactions (an undo log per connection), shard locks and holds, like the SQL does.
- :class:`FakePublisher` implements :class:`relay.publisher.Publishing`: it "delivers" records
  to an in-memory log unless a result is scripted for a row.
- :class:`FakeProducer` stands in for ``aiokafka.AIOKafkaProducer`` under the real
  :class:`relay.publisher.Publisher`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import zlib
from collections.abc import Callable, Collection, Sequence
from typing import Any

import aiokafka.errors

from relay import envelope, publisher, store


@dataclasses.dataclass
class FakeRow:
    row: envelope.Row
    status: str = "new"
    attempts: int = 0
    last_error: str | None = None


class FakeConnection:
    """A connection of the fake store: commit and rollback end its transaction."""

    def __init__(self, owner: FakeStore) -> None:
        self.owner = owner
        self.closed = False

    async def commit(self) -> None:
        await self.owner.commit(self)

    async def rollback(self) -> None:
        self.owner.rollback(self)

    def close(self) -> None:
        self.closed = True
        self.owner.rollback(self)


def shard_of(aggregate_id: str) -> int:
    return zlib.crc32(aggregate_id.encode()) % store.SHARDS


class FakeStore:
    """The outbox, its shards and holds in memory, with the SQL's semantics."""

    def __init__(self) -> None:
        self.rows: dict[int, FakeRow] = {}
        self.hold_rows: dict[envelope.AggregateKey, dict[str, Any]] = {}
        self.locks: dict[int, FakeConnection] = {}
        self.now = 0.0  # the clock of timed holds
        self.fail: dict[str, BaseException] = {}  # method name -> raised on every call
        self.commit_gate: asyncio.Event | None = None  # commits wait for it when set
        self.commit_waiting = asyncio.Event()  # set while a commit waits for the gate
        self.commits = 0
        self.combined_commits = 0  # commits sent with the mark, in one round trip
        self.looks = 0  # idle looks (has_work)
        self.claims = 0  # full looks (claim_shards)
        self._undo: dict[FakeConnection, list[Callable[[], None]]] = {}
        self._next_id = 1

    # -- test side ---------------------------------------------------------------------------

    def connect(self) -> FakeConnection:
        return FakeConnection(self)

    async def aconnect(self) -> FakeConnection:
        if "connect" in self.fail:
            raise self.fail["connect"]
        return self.connect()

    def insert(
        self, aggregate_id: str, *, aggregate_type: str = "order", **columns: Any
    ) -> envelope.Row:
        row_id = self._next_id
        self._next_id += 1
        fields: dict[str, Any] = {
            "id": row_id,
            "message_id": f"m-{row_id}",
            "aggregate_type": aggregate_type,
            "aggregate_id": aggregate_id,
            "event_type": "Changed",
            "op": "u",
            "before_state": None,
            "after_state": '{"n": %d}' % row_id,  # noqa: UP031 - JSON braces
            "payload": None,
            "headers": None,
            "topic": None,
            "source_table": None,
            "event_us": 1_700_000_000_000_000 + row_id,
            "shard": shard_of(aggregate_id),
        }
        fields.update(columns)
        row = envelope.Row(**fields)
        self.rows[row_id] = FakeRow(row)
        return row

    def status(self, row_id: int) -> str:
        return self.rows[row_id].status

    def statuses(self) -> dict[int, str]:
        return {i: r.status for i, r in self.rows.items()}

    # -- transactions ------------------------------------------------------------------------

    def _change(self, conn: FakeConnection, undo: Callable[[], None]) -> None:
        self._undo.setdefault(conn, []).append(undo)

    async def commit(self, conn: FakeConnection) -> None:
        if "commit" in self.fail:
            raise self.fail["commit"]
        if self.commit_gate is not None:
            self.commit_waiting.set()
            await self.commit_gate.wait()
        self._undo.pop(conn, None)
        self._release(conn)
        self.commits += 1

    def rollback(self, conn: FakeConnection) -> None:
        for undo in reversed(self._undo.pop(conn, [])):
            undo()
        self._release(conn)

    def _release(self, conn: FakeConnection) -> None:
        for shard in [s for s, owner in self.locks.items() if owner is conn]:
            del self.locks[shard]

    def _check(self, name: str) -> None:
        if name in self.fail:
            raise self.fail[name]

    def _set_status(self, conn: FakeConnection, row: FakeRow, status: str) -> None:
        old = (row.status, row.attempts, row.last_error)

        def undo() -> None:
            row.status, row.attempts, row.last_error = old

        self._change(conn, undo)
        row.status = status

    # -- store.Claiming ----------------------------------------------------------------------

    def _due(self, hold: dict[str, Any]) -> bool:
        """A timed hold whose retry time has come."""
        return hold["retry_at"] is not None and hold["retry_at"] <= self.now

    async def has_work(self, conn: FakeConnection) -> bool:
        self._check("has_work")
        self.looks += 1
        return any(r.status == "new" for r in self.rows.values()) or any(
            map(self._due, self.hold_rows.values())
        )

    async def claim_shards(self, conn: FakeConnection, start: int, limit: int) -> dict[int, int]:
        self._check("claim_shards")
        self.claims += 1
        ready = {r.row.shard for r in self.rows.values() if r.status == "new"}
        ready.update(h["shard"] for h in self.hold_rows.values() if self._due(h))
        owned: dict[int, int] = {}
        for shard in [*range(start, store.SHARDS), *range(start)]:
            if len(owned) == limit:
                break
            if shard in ready and self.locks.get(shard, conn) is conn:
                self.locks[shard] = conn
                owned[shard] = sum(1 for h in self.hold_rows.values() if h["shard"] == shard)
        return owned

    def _hold(self, key: envelope.AggregateKey) -> store.Hold:
        h = self.hold_rows[key]
        return store.Hold(
            key[0],
            key[1],
            h["shard"],
            h["kind"],
            h["failed_id"],
            h["attempts"],
            due=self._due(h),
            open=h["kind"] == "timed" and h["retry_at"] is None,
        )

    async def due_holds(self, conn: FakeConnection, shards: Sequence[int]) -> list[store.Hold]:
        self._check("due_holds")
        holds = [self._hold(key) for key, h in self.hold_rows.items() if h["shard"] in shards]
        return [h for h in holds if h.due]

    async def holds_of(
        self, conn: FakeConnection, aggregates: Collection[envelope.AggregateKey]
    ) -> list[store.Hold]:
        self._check("holds_of")
        return [self._hold(key) for key in self.hold_rows if key in aggregates]

    async def claim_rows(
        self, conn: FakeConnection, shards: Sequence[int], limit: int, max_bytes: int
    ) -> list[envelope.Row]:
        self._check("claim_rows")
        per_shard = -(-limit // len(shards))
        candidates: list[envelope.Row] = []
        for shard in shards:
            assert self.locks.get(shard) is conn, "claiming a shard it does not own"
            new = [r.row for _, r in sorted(self.rows.items()) if r.status == "new"]
            candidates += [row for row in new if row.shard == shard][:per_shard]
        taken: list[envelope.Row] = []
        running = 0
        for row in sorted(candidates, key=lambda r: r.id):
            size = sum(
                len(v) if v is not None else 0
                for v in (row.before_state, row.after_state, row.payload, row.headers)
            )
            running += size
            if running > max_bytes and taken:
                break
            taken.append(row)
        return taken

    async def park(self, conn: FakeConnection, ids: Sequence[int]) -> None:
        self._check("park")
        for row_id in ids:
            row = self.rows[row_id]
            if row.status == "new":
                self._set_status(conn, row, "held")

    async def add_hold(
        self,
        conn: FakeConnection,
        key: envelope.AggregateKey,
        shard: int,
        *,
        kind: str,
        failed_id: int | None,
        reason: str,
        retry_in_s: float | None,
        exists: bool,
    ) -> None:
        self._check("add_hold")
        assert (key in self.hold_rows) == exists, "the worker's view of holds is stale"
        old = self.hold_rows.get(key)
        attempts = old["attempts"] + 1 if old else 1
        self.hold_rows[key] = {
            "shard": shard,
            "kind": kind,
            "failed_id": failed_id,
            "reason": reason,
            "attempts": attempts,
            "retry_at": None if retry_in_s is None else self.now + retry_in_s,
        }
        self._change(conn, lambda: self._restore_hold(key, old))

    def _restore_hold(self, key: envelope.AggregateKey, old: dict[str, Any] | None) -> None:
        if old is None:
            self.hold_rows.pop(key, None)
        else:
            self.hold_rows[key] = old

    async def open_hold(self, conn: FakeConnection, hold: store.Hold) -> None:
        self._check("open_hold")
        self._unpark(conn, hold.key)
        old = dict(self.hold_rows[hold.key])
        self.hold_rows[hold.key]["retry_at"] = None
        self._change(conn, lambda: self._restore_hold(hold.key, old))

    async def delete_hold(
        self, conn: FakeConnection, key: envelope.AggregateKey, shard: int
    ) -> None:
        self._check("delete_hold")
        self._unpark(conn, key)
        old = self.hold_rows.pop(key, None)
        self._change(conn, lambda: self._restore_hold(key, old))

    def _unpark(self, conn: FakeConnection, key: envelope.AggregateKey) -> None:
        for row in self.rows.values():
            if row.status == "held" and row.row.aggregate == key:
                self._set_status(conn, row, "new")

    async def count_holds(self, conn: FakeConnection, shard: int) -> None:
        self._check("count_holds")

    async def mark_published(
        self, conn: FakeConnection, ids: Sequence[int], *, commit: bool = False
    ) -> int:
        self._check("mark_published")
        changed = 0
        for row_id in ids:
            row = self.rows.get(row_id)  # an id that matches no row changes nothing
            if row is not None and row.status == "new":
                self._set_status(conn, row, "published")
                row.attempts += 1
                changed += 1
        if commit:
            self.combined_commits += 1
            await self.commit(conn)
        return changed

    async def mark_failed(self, conn: FakeConnection, row_id: int, error: str) -> None:
        self._check("mark_failed")
        row = self.rows[row_id]
        self._set_status(conn, row, "failed")
        row.attempts += 1
        row.last_error = error

    async def note_attempt(self, conn: FakeConnection, ids: Sequence[int], error: str) -> None:
        self._check("note_attempt")
        for row_id in ids:
            row = self.rows[row_id]
            self._set_status(conn, row, row.status)
            row.attempts += 1
            row.last_error = error

    # -- store.Observing ---------------------------------------------------------------------

    async def backlog(self, conn: FakeConnection, cap: int) -> store.Backlog:
        self._check("backlog")
        count = {s: sum(1 for r in self.rows.values() if r.status == s) for s in ("new", "held")}
        kinds = [h["kind"] for h in self.hold_rows.values()]
        failed = sum(1 for r in self.rows.values() if r.status == "failed")
        holds = {k: kinds.count(k) for k in set(kinds)}
        return store.Backlog(min(count["new"], cap), 0.0, failed, count["held"], holds)

    # -- operator side (what relay.triage does, in memory) ------------------------------------

    def release(self, key: envelope.AggregateKey) -> None:
        conn = self.connect()
        self._unpark(conn, key)
        self.hold_rows.pop(key, None)
        self._undo.pop(conn, None)

    def replay(self, row_id: int) -> None:
        row = self.rows[row_id]
        assert row.status == "failed"
        row.status = "new"
        hold = self.hold_rows.get(row.row.aggregate)
        if hold is not None and hold["failed_id"] == row_id:
            self.release(row.row.aggregate)


class FakePublisher:
    """Delivers records to ``log`` in order, unless a result is scripted for their row."""

    def __init__(self) -> None:
        self.started = True
        self.log: list[envelope.Record] = []
        self.script: dict[int, publisher.Result] = {}  # row id -> result, once
        self.always: dict[int, publisher.Result] = {}  # row id -> result, every time
        self.raise_on_publish: BaseException | None = None
        self.gate: asyncio.Event | None = None  # publish waits for it when set
        self.calls: list[list[int]] = []
        self.dead_letters: list[int] = []
        self.dead_letter_problem: str | None = None

    async def publish(self, records: Sequence[envelope.Record]) -> list[publisher.Result]:
        self.calls.append([r.row_id for r in records])
        if self.gate is not None:
            await self.gate.wait()
        if self.raise_on_publish is not None:
            raise self.raise_on_publish
        results = []
        stopped: set[envelope.AggregateKey] = set()
        for record in records:
            if record.aggregate in stopped:
                results.append(publisher.NOT_SENT)
                continue
            result = self.script.pop(record.row_id, None) or self.always.get(record.row_id)
            result = result or publisher.ACKED
            if result.status is publisher.Status.ACKED:
                self.log.append(record)
            else:
                stopped.add(record.aggregate)
            results.append(result)
        return results

    async def dead_letter(self, rows: Sequence[tuple[envelope.Row, str, str]]) -> str | None:
        if self.dead_letter_problem is None:
            self.dead_letters += [row.id for row, _, _ in rows]
        return self.dead_letter_problem

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.started = False


class FakeClient:
    """The producer's client, cluster and metadata in one: which topics exist."""

    def __init__(self, topics: set[str]) -> None:
        self.known = topics
        self.cluster = self

    def topics(self) -> set[str]:
        return set(self.known)

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return {0} if topic in self.known else None

    async def fetch_all_metadata(self) -> FakeClient:
        return self

    def add_topic(self, topic: str) -> None:
        pass


class FakeBatch:
    """Stands in for aiokafka's BatchBuilder: takes ``capacity`` records, then is full."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.values: list[bytes] = []

    def append(
        self,
        *,
        timestamp: int | None,
        key: bytes,
        value: bytes,
        headers: list[tuple[str, bytes]],
    ) -> object | None:
        if len(self.values) >= self.capacity:
            return None
        self.values.append(value)
        return object()


class FakeProducer:
    """Stands in for AIOKafkaProducer (one partition per topic): ``verdicts`` maps a record
    value to the exception its future (or its ``send``, with ``send_errors``) ends with; a
    batch ends with the verdict of its first record that has one, as a produce batch does;
    everything else is acknowledged."""

    def __init__(self, topics: set[str], verdicts: dict[bytes, BaseException]) -> None:
        self.client = FakeClient(topics)
        self.verdicts = verdicts
        self.send_errors: dict[bytes, BaseException] = {}
        self.hang = False  # futures never complete: a broker that stopped answering
        self.batch_capacity = 1000  # records per batch
        self.blocked_topics: set[str] = set()  # their hand-over waits, as for a full buffer
        self.denied_topics: set[str] = set()  # their metadata is refused: not authorized
        self.sent: list[bytes] = []
        self.batches: list[tuple[str, list[bytes]]] = []  # (topic, values) handed over
        self.stopped = False

    async def partitions_for(self, topic: str) -> set[int]:
        if topic in self.denied_topics:
            raise aiokafka.errors.TopicAuthorizationFailedError(topic)
        partitions = self.client.partitions_for_topic(topic)
        if partitions is None:
            raise aiokafka.errors.KafkaTimeoutError(f"no metadata for {topic}")
        return partitions

    def create_batch(self) -> FakeBatch:
        return FakeBatch(self.batch_capacity)

    async def send_batch(
        self, batch: FakeBatch, topic: str, *, partition: int
    ) -> asyncio.Future[None]:
        if topic in self.blocked_topics:
            await asyncio.Event().wait()  # until cancelled
        assert partition in (self.client.partitions_for_topic(topic) or set())
        for value in batch.values:
            if value in self.send_errors:
                raise self.send_errors[value]
        self.sent += batch.values
        self.batches.append((topic, list(batch.values)))
        errors = [self.verdicts[v] for v in batch.values if v in self.verdicts]
        return self._future(errors[0] if errors else None)

    def _future(self, error: BaseException | None) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.hang:
            return future
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(None)
        return future

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        self.stopped = True

    async def send(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes,
        headers: list[tuple[str, bytes]],
        timestamp_ms: int | None = None,
    ) -> asyncio.Future[None]:
        if value in self.send_errors:
            raise self.send_errors[value]
        self.sent.append(value)
        return self._future(self.verdicts.get(value))

    async def send_and_wait(self, **message: Any) -> None:
        await (await self.send(**message))


def timeout_error() -> aiokafka.errors.KafkaError:
    return aiokafka.errors.KafkaTimeoutError()
