"""The claim-publish-mark worker.

One cycle is one READ COMMITTED transaction:

1. find the shards that have new rows (64 index dives, whatever the table holds);
2. lock up to ``shards_per_claim`` of them with ``FOR UPDATE SKIP LOCKED`` on the shard rows:
   while a worker holds a shard, no other worker in any process can publish its rows, so the
   events of one aggregate (always in the same shard) are published in outbox order;
3. read the oldest new rows of each owned shard (``batch_size`` shared out between them);
4. publish them with the idempotent producer, bounded by ``publish_timeout_s``;
5. mark the published rows in one statement, the poison rows failed, and commit.

If publishing times out or Kafka fails, the transaction rolls back: the rows stay new and the
worker backs off. Pacing: after a claim the worker looks again after ``claim_linger_s``; when
idle it waits for a wake-up or the poll interval. Shutdown is an event: the cycle in flight ends
normally; the mark-and-commit step is never interrupted by a cancellation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence

import aiokafka.errors
import structlog

from relay import config, db, envelope, metrics, pacing, publisher, store

log = structlog.get_logger(__name__)


class PublishFailedError(Exception):
    """The batch could not be published for a passing reason; it was rolled back."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(slots=True)
class Verdicts:
    """What to record for a claimed batch."""

    acked: list[envelope.Record] = dataclasses.field(default_factory=list)
    failed: list[tuple[envelope.Row, str, str]] = dataclasses.field(default_factory=list)
    transient: list[tuple[int, str]] = dataclasses.field(default_factory=list)


class Worker:
    def __init__(
        self,
        name: str,
        settings: config.Settings,
        publisher_: publisher.Publisher,
        stop: asyncio.Event,
        waker: pacing.Waker,
    ) -> None:
        self.name = name
        self._settings = settings
        self._worker = settings.worker
        self._store = store.Store(settings.outbox.table)
        self._publisher = publisher_
        self._formatter = envelope.Formatter.from_settings(settings)
        self._stop = stop
        self._waker = waker
        self._conn: db.Connection | None = None
        self._log = log.bind(worker=name)
        self.published = 0
        self.failed = 0

    async def run(self) -> None:
        """Cycle until the stop event is set. Errors are logged and retried, never fatal."""
        backoff = pacing.Backoff(self._worker.backoff_initial_s, self._worker.backoff_max_s)
        try:
            while not self._stop.is_set():
                try:
                    claimed = await self.cycle()
                except PublishFailedError as exc:
                    metrics.batch_retries.labels(exc.reason).inc()
                    self._log.warning("publish_failed", reason=exc.reason, error=str(exc))
                except Exception as exc:  # noqa: BLE001 - the loop must survive anything
                    metrics.batch_retries.labels("database").inc()
                    self._log.warning("cycle_failed", error=f"{type(exc).__name__}: {exc}")
                    self._disconnect()
                else:
                    backoff.reset()
                    if not claimed:
                        # Idle: wait for a poll tick or a wake-up.
                        await self._waker.wait(self._worker.poll_interval_s)
                    elif claimed < self._worker.batch_size:
                        # Look again soon, whether nudged or not: rows may have been committed
                        # meanwhile in shards another worker owned when this one looked. The
                        # linger lets a few more rows gather, like the producer's linger.
                        await pacing.sleep_unless(self._stop, self._worker.claim_linger_s)
                    continue
                await pacing.sleep_unless(self._stop, backoff.next_delay_s())
        finally:
            self._disconnect()

    async def cycle(self) -> int:
        """One claim-publish-mark transaction. Returns the number of rows claimed."""
        if not self._publisher.started:
            raise PublishFailedError("kafka", "producer not connected yet")
        if self._conn is None:
            # autocommit off: the first statement opens the transaction (no BEGIN round trip)
            self._conn = await db.connect(self._settings, autocommit=False)
        conn = self._conn
        started = time.perf_counter()
        try:
            ready = await self._store.ready_shards(conn)
            if not ready:
                await conn.rollback()  # end the (read-only) transaction: hold no table locks
                return 0
            shards = await self._store.lock_shards(conn, ready, self._worker.shards_per_claim)
            if len(shards) == self._worker.shards_per_claim and len(ready) > len(shards):
                self._waker.notify()  # more shards have work than this worker took
            rows = (
                await self._store.claim_rows(conn, shards, self._worker.batch_size)
                if shards
                else []
            )
            metrics.claim_duration.observe(time.perf_counter() - started)
            if not rows:
                await conn.rollback()
                return 0
            metrics.batch_size.observe(len(rows))
            verdicts = await self._publish(rows)
        except BaseException:
            await self._rollback()
            raise
        finish = asyncio.ensure_future(self._finish(conn, verdicts))
        try:
            await asyncio.shield(finish)
        except asyncio.CancelledError:
            await finish  # published rows must be marked: let the commit land, then stop
            raise
        if verdicts.transient:  # those rows stay new; back off before trying them again
            raise PublishFailedError(
                "kafka",
                f"{len(verdicts.transient)} of {len(rows)} records not acknowledged: "
                f"{verdicts.transient[0][1]}",
            )
        return len(rows)

    async def _publish(self, rows: Sequence[envelope.Row]) -> Verdicts:
        verdicts = Verdicts()
        records: list[envelope.Record] = []
        capture_us = time.time_ns() // 1000
        for row in rows:
            try:
                records.append(self._formatter.record(row, capture_us))
            except envelope.PoisonRowError as exc:
                verdicts.failed.append((row, exc.reason, str(exc)))
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._worker.publish_timeout_s):
                outcome = await self._publisher.publish(records)
                if outcome.poison:
                    by_id = {row.id: row for row in rows}
                    verdicts.failed += [
                        (by_id[r.row_id], why, err) for r, why, err in outcome.poison
                    ]
                if verdicts.failed:
                    metrics.dead_lettered.inc(await self._publisher.dead_letter(verdicts.failed))
        except TimeoutError:
            raise PublishFailedError(
                "timeout",
                f"publishing {len(records)} records took over {self._worker.publish_timeout_s} s",
            ) from None
        except aiokafka.errors.KafkaError as exc:
            raise PublishFailedError("kafka", f"{type(exc).__name__}: {exc}") from None
        metrics.publish_duration.observe(time.perf_counter() - started)
        verdicts.acked = outcome.acked
        verdicts.transient = [(r.row_id, err) for r, err in outcome.transient]
        return verdicts

    async def _finish(self, conn: db.Connection, verdicts: Verdicts) -> None:
        """Mark and commit; then count and log. Runs shielded from cancellation."""
        started = time.perf_counter()
        try:
            if verdicts.acked:
                await self._store.mark_published(conn, [r.row_id for r in verdicts.acked])
            for row, reason, error in verdicts.failed:
                await self._store.mark_failed(conn, row.id, f"{reason}: {error}")
            if verdicts.transient:
                ids = [row_id for row_id, _ in verdicts.transient]
                await self._store.note_attempt(conn, ids, verdicts.transient[0][1])
            await conn.commit()
        except BaseException:
            await self._rollback()
            raise
        metrics.mark_duration.observe(time.perf_counter() - started)
        now = time.time()
        for record in verdicts.acked:
            metrics.publish_lag.observe(now - record.event_us / 1e6)
        metrics.published.inc(len(verdicts.acked))
        self.published += len(verdicts.acked)
        self.failed += len(verdicts.failed)
        for row, reason, error in verdicts.failed:
            metrics.failed.labels(reason).inc()
            self._log.error(
                "row_failed",
                row_id=row.id,
                message_id=row.message_id,
                aggregate_type=row.aggregate_type,
                reason=reason,
                error=error,
            )

    async def _rollback(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            await conn.rollback()
        except Exception:  # noqa: BLE001 - the connection is dropped and rebuilt instead
            self._disconnect()

    def _disconnect(self) -> None:
        db.close(self._conn)
        self._conn = None
