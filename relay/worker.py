"""The claim-publish-mark worker.

One cycle is one READ COMMITTED transaction:

1. find and lock, in one statement, up to ``shards_per_claim`` shards that have new rows (an
   index dive per shard, whatever the table holds) with ``FOR UPDATE SKIP LOCKED`` on the
   shard rows: while a worker holds a shard, no other worker in any process can publish its
   rows, so the events of one aggregate (always in the same shard) are published in outbox
   order. After a full claim the next one starts past the last shard taken, so under load
   every shard gets its turn;
2. if an owned shard has held aggregates (the shard row counts them): open the timed holds
   whose retry time has come, and set the rows of the others aside (status ``held``);
3. read the oldest new rows of each owned shard: ``batch_size`` rows shared out between them
   and at most ``batch_max_bytes`` of JSON and payload (the oldest row always fits);
4. publish them with the idempotent producer, bounded by ``publish_timeout_s``;
5. record the outcome by the ordering rule (:mod:`relay.ordering`) and commit (in the common
   case, all published and no hold involved, the mark and the COMMIT are one round trip, so a
   busy cycle is three round trips to the database): once a record of
   an aggregate fails to be enqueued or acknowledged, no later record of that aggregate is
   marked published, and nothing is enqueued after an enqueue failure; what was not sent stays
   new with no attempt counted.

Errors are sorted by :func:`relay.errors.classify`: a passing or operational failure rolls the
cycle back (rows stay new) and backs the worker off, up to ``backoff_max_s``; after
``unready_after_failed_cycles`` failed cycles in a row the worker reports not ready. After a
mark step failed, each cycle first proves that marking works (an UPDATE matching no row) before
it publishes again, so a revoked grant does not republish the batch at every retry. A bug
propagates: the daemon stops with exit code 1. Pacing: after a full batch the worker claims
again at once and calls another worker in; after a partial claim it looks again after
``claim_linger_s``, unless its claim took every shard with work while another worker of the
process is busy: then it stands down until called or for ``poll_interval_s`` (one worker
carries a steady load in cycles half as many as two would run), or while the binary log is
followed (:mod:`relay.binlog`: every commit wakes a worker): then it waits as an idle worker
does; when idle it waits for a wake-up or a poll tick
(:class:`relay.pacing.IdleTicks`: ``poll_min_interval_s`` for about ``poll_interval_s`` after
activity, then doubling up to ``poll_interval_s``; ``poll_interval_s`` while the binary log is
followed); at a tick one
cheap statement (:class:`Probe`) decides whether a cycle is worth running. Shutdown is an
event: the cycle in flight ends normally; the mark-and-commit step is never interrupted by a
cancellation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

import aiokafka.errors
import structlog

from relay import config, db, envelope, errors, metrics, ordering, pacing, publisher, store

log = structlog.get_logger(__name__)

# A failing worker logs once per streak and then at most every this many seconds.
LOG_EVERY_S = 10.0

Connect = Callable[[], Awaitable[db.Connection]]


class Probe:
    """The idle look of a process: whether there is any work at all, in one cheap statement on
    an autocommit connection (no transaction: an idle relay keeps no lock between looks).

    Shared by the workers of a process; only the poller of :class:`relay.pacing.Waker` (one
    worker at a time) looks, and a lock guards the connection all the same. A look that fails
    answers "maybe": the full cycle that follows meets the failure and backs off as usual.
    """

    def __init__(self, store_: store.Claiming, connect: Connect) -> None:
        self._store = store_
        self._connect = connect
        self._conn: db.Connection | None = None
        self._lock = asyncio.Lock()

    async def has_work(self) -> bool:
        async with self._lock:
            try:
                if self._conn is None:
                    self._conn = await self._connect()
                return await self._store.has_work(self._conn)
            except Exception as exc:
                if errors.classify(exc) is errors.Kind.BUG:
                    raise
                self.close()
                return True

    def close(self) -> None:
        db.close(self._conn)
        self._conn = None


class CycleFailedError(Exception):
    """The cycle was rolled back for a passing or operational reason; rows stay new."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Worker:
    def __init__(
        self,
        name: str,
        settings: config.Settings,
        publisher_: publisher.Publishing,
        stop: asyncio.Event,
        waker: pacing.Waker,
        *,
        store_: store.Claiming | None = None,
        connect: Connect | None = None,
        probe: Probe | None = None,
    ) -> None:
        self.name = name
        self._settings = settings
        self._worker = settings.worker
        self._on_poison = settings.outbox.on_poison
        self._store: store.Claiming = store_ or store.Store(
            settings.outbox.table, settings.db.call_timeout_s
        )
        self._call_timeout_s = settings.db.call_timeout_s
        self._connect = connect or (lambda: db.connect(settings, autocommit=False))
        self._own_probe = probe is None
        self._probe = probe or Probe(self._store, connect or (lambda: db.connect(settings)))
        self._publisher = publisher_
        self._formatter = envelope.Formatter.from_settings(settings)
        self._stop = stop
        self._waker = waker
        self._conn: db.Connection | None = None
        self._holds: list[store.Hold] = []  # of the shards owned in the current cycle
        self._start = 0  # the shard the next claim looks at first
        self._took_all = False  # the last claim took every unowned shard with work
        self._mark_failed = False  # the last mark step failed: probe it before publishing
        self._log = log.bind(worker=name)
        self.published = 0
        self.failed = 0
        self.failures = 0  # consecutive failed cycles
        self.last_failure = ""
        self._last_logged = -LOG_EVERY_S
        self._silenced = 0

    @property
    def ready(self) -> bool:
        return self.failures < self._worker.unready_after_failed_cycles

    async def run(self) -> None:
        """Cycle until the stop event is set. Expected failures back off; a bug propagates."""
        backoff = pacing.Backoff(self._worker.backoff_initial_s, self._worker.backoff_max_s)
        ticks = pacing.IdleTicks(self._worker.poll_min_interval_s, self._worker.poll_interval_s)
        self._waker.enlist()
        try:
            while not self._stop.is_set():
                try:
                    claimed = await self.cycle()
                except CycleFailedError as exc:
                    self._failed(exc.reason, str(exc))
                except Exception as exc:
                    kind = errors.classify(exc)
                    if kind is errors.Kind.BUG:
                        self._log.exception("cycle_bug")
                        raise
                    self._disconnect()
                    self._failed(
                        "operational" if kind is errors.Kind.OPERATIONAL else "database",
                        errors.one_line(exc),
                    )
                else:
                    self._succeeded()
                    backoff.reset()
                    if not claimed:
                        await self._wait_for_work(ticks)
                        continue
                    ticks.active()
                    if claimed >= self._worker.batch_size:
                        continue  # claim again at once (the claim called another worker in)
                    if self._took_all and self._waker.pushing:
                        # every shard with work was taken, and each commit from now on wakes
                        # a worker (one during this cycle already has): no need to look again
                        await self._wait_for_work(ticks)
                        continue
                    if self._took_all and self._waker.others_busy():
                        # This claim took every shard with work, and another worker is busy: it
                        # takes what comes next. Standing down halves the cycles (and the CPU)
                        # of a steady load; a busy worker's full claim calls this one back, and
                        # it looks again after a poll interval at most (a stalled one is no
                        # bottleneck).
                        await self._waker.rest(self._worker.poll_interval_s)
                    else:
                        # Look again soon, whether nudged or not: rows may have been committed
                        # meanwhile in shards another worker owned when this one looked. The
                        # linger lets a few more rows gather, like the producer's linger.
                        await pacing.sleep_unless(self._stop, self._worker.claim_linger_s)
                    continue
                await pacing.sleep_unless(self._stop, backoff.next_delay_s())
        finally:
            self._waker.dismiss()
            self._disconnect()
            if self._own_probe:
                self._probe.close()

    async def _wait_for_work(self, ticks: pacing.IdleTicks) -> None:
        """Idle: until a wake-up, a stop, or a poll tick at which the probe finds work."""
        while not self._stop.is_set():
            tick_s = self._worker.poll_interval_s if self._waker.pushing else ticks.next_s()
            if await self._waker.wait(tick_s) or self._stop.is_set():
                return
            if await self._probe.has_work():
                return

    def _failed(self, reason: str, message: str) -> None:
        self.failures += 1
        self.last_failure = f"{reason}: {message}"
        metrics.batch_retries.labels(reason).inc()
        now = time.monotonic()
        if self.failures == 1 or now - self._last_logged >= LOG_EVERY_S:
            self._log.warning(
                "cycle_failed",
                reason=reason,
                error=message,
                failures_in_a_row=self.failures,
                not_logged=self._silenced,
            )
            self._last_logged = now
            self._silenced = 0
        else:
            self._silenced += 1

    def _succeeded(self) -> None:
        if self.failures >= self._worker.unready_after_failed_cycles:
            self._log.info("cycle_recovered", after_failures=self.failures)
        self.failures = 0

    async def cycle(self) -> int:
        """One claim-publish-mark transaction. Returns the number of rows claimed."""
        if not self._publisher.started:
            raise CycleFailedError("kafka", "producer not connected yet")
        if self._conn is None:
            # autocommit off: the first statement opens the transaction (no BEGIN round trip)
            self._conn = await self._connect()
        conn = self._conn
        started = time.perf_counter()
        try:
            rows, parked = await self._claim(conn)
            metrics.claim_duration.observe(time.perf_counter() - started)
            if not rows:
                async with asyncio.timeout(self._call_timeout_s):
                    await (conn.commit() if parked else conn.rollback())
                return parked
            metrics.batch_size.observe(len(rows))
            if self._mark_failed:
                # The last mark step failed (a revoked grant, say): prove it works again before
                # publishing anything, or every retry would publish the batch once more.
                await self._store.mark_published(conn, [0])
            result = await self._publish(rows)
        except BaseException:
            await self._rollback()
            raise
        finish = asyncio.ensure_future(self._finish(conn, result))
        try:
            await asyncio.shield(finish)
        except asyncio.CancelledError:
            await finish  # published rows must be marked: let the commit land, then stop
            raise
        if result.broken:  # some rows stay new: back off before trying them again
            first = result.retried[0][1] if result.retried else "not sent"
            raise CycleFailedError(
                "kafka",
                f"{len(result.retried) + len(result.untouched)} of {len(rows) + parked} records"
                f" left new: {first}",
            )
        return len(rows) + parked

    async def _claim(self, conn: db.Connection) -> tuple[list[envelope.Row], int]:
        """Lock shards and read their rows; rows of held aggregates are set aside (parked).

        Returns the rows to publish and the number of rows parked.
        """
        self._holds = []
        limit = self._worker.shards_per_claim
        owned = await self._store.claim_shards(conn, self._start, limit)
        self._took_all = len(owned) < limit
        if not self._took_all:
            # Maybe more shards have work than this worker took: start the next claim past the
            # last shard taken (none waits behind busy ones).
            self._start = (next(reversed(owned)) + 1) % store.SHARDS
        else:
            self._start = 0  # every shard with work that nobody owned was taken
        if not owned:
            return [], 0
        held = [shard for shard, holds in owned.items() if holds]
        holds: dict[envelope.AggregateKey, store.Hold] = {}
        if held:  # the common case skips this: no shard with held aggregates
            for hold in await self._store.due_holds(conn, held):
                await self._store.open_hold(conn, hold)  # its rows are new again, in id order
                holds[hold.key] = hold
        rows = await self._store.claim_rows(
            conn, list(owned), self._worker.batch_size, self._worker.batch_max_bytes
        )
        if not self._took_all or len(rows) >= self._worker.batch_size:
            self._waker.notify()  # more work than this cycle takes: call another worker in
        if held:
            keys = {r.aggregate for r in rows if r.shard in held} - holds.keys()
            if keys:
                holds.update((h.key, h) for h in await self._store.holds_of(conn, keys))
        self._holds = list(holds.values())
        holding = {h.key for h in self._holds if h.holding}
        if not holding:
            return rows, 0
        parked = [r.id for r in rows if r.aggregate in holding]
        if parked:
            await self._store.park(conn, parked)
        return [r for r in rows if r.aggregate not in holding], len(parked)

    async def _publish(self, rows: Sequence[envelope.Row]) -> ordering.Plan:
        results: dict[int, publisher.Result] = {}
        records: list[envelope.Record] = []
        blocked: set[envelope.AggregateKey] = set()
        capture_us = time.time_ns() // 1000
        for row in rows:
            if row.aggregate in blocked:
                continue
            try:
                records.append(self._formatter.record(row, capture_us))
            except envelope.PoisonRowError as exc:
                results[row.id] = publisher.Result(publisher.Status.POISON, exc.reason, str(exc))
                if self._on_poison == "hold":
                    blocked.add(row.aggregate)  # its later rows wait behind the hold: not sent
        started = time.perf_counter()
        deadline = asyncio.get_running_loop().time() + self._worker.publish_timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                outcome = await self._publisher.publish(records) if records else []
        except TimeoutError:
            raise CycleFailedError(
                "timeout",
                f"publishing {len(records)} records took over {self._worker.publish_timeout_s} s",
            ) from None
        except aiokafka.errors.KafkaError as exc:
            raise CycleFailedError("kafka", errors.one_line(exc)) from None
        metrics.publish_duration.observe(time.perf_counter() - started)
        results.update((r.row_id, o) for r, o in zip(records, outcome, strict=True))
        plan = ordering.plan(rows, results, self._on_poison)
        if plan.failed:
            await self._dead_letter(plan, deadline)
        return plan

    async def _dead_letter(self, plan: ordering.Plan, deadline: float) -> None:
        """Copy failed rows to the dead-letter topic within what is left of the publish time
        (at least a second); a failed copy is noted in the rows, never rolled back."""
        deadline = max(deadline, asyncio.get_running_loop().time() + 1.0)
        try:
            async with asyncio.timeout_at(deadline):
                problem = await self._publisher.dead_letter(plan.failed)
        except TimeoutError:
            problem = "dead-letter copy timed out"
        if problem is None:
            if self._settings.outbox.dead_letter_topic:
                metrics.dead_lettered.inc(len(plan.failed))
            return
        self._log.error("dead_letter_failed", rows=len(plan.failed), error=problem)
        plan.failed = [(row, why, f"{err}; {problem}") for row, why, err in plan.failed]

    async def _finish(self, conn: db.Connection, plan: ordering.Plan) -> None:
        """Record the plan and commit; then count and log. Runs shielded from cancellation."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._call_timeout_s):
                if plan.only_published and not self._holds:
                    ids = [r.id for r in plan.published]
                    await self._store.mark_published(conn, ids, commit=True)
                else:
                    await self._record(conn, plan)
                    await conn.commit()
        except BaseException as exc:
            await self._rollback()
            if isinstance(exc, Exception) and errors.classify(exc) is not errors.Kind.BUG:
                self._mark_failed = True
                raise CycleFailedError("mark", errors.one_line(exc)) from exc
            raise
        self._mark_failed = False
        metrics.mark_duration.observe(time.perf_counter() - started)
        now = time.time()
        for row in plan.published:
            metrics.publish_lag.observe(now - row.event_us / 1e6)
        metrics.published.inc(len(plan.published))
        self.published += len(plan.published)
        self.failed += len(plan.failed)
        for row, reason, error in plan.failed:
            metrics.failed.labels(reason).inc()
            self._log.error(
                "row_failed",
                row_id=row.id,
                message_id=row.message_id,
                aggregate_type=row.aggregate_type,
                reason=reason,
                error=error,
                policy=self._on_poison,
            )
        for hold in plan.holds:
            self._log.warning(
                "aggregate_held",
                kind=hold.kind,
                aggregate_type=hold.key[0],
                shard=hold.shard,
                row_id=hold.failed_id,
                reason=hold.reason,
            )

    async def _record(self, conn: db.Connection, plan: ordering.Plan) -> None:
        s = self._store
        if plan.published:
            await s.mark_published(conn, [r.id for r in plan.published])
        for row, reason, error in plan.failed:
            await s.mark_failed(conn, row.id, f"{reason}: {error}")
        if plan.parked:
            await s.park(conn, plan.parked)
        if plan.retried:
            await s.note_attempt(conn, [row_id for row_id, _ in plan.retried], plan.retried[0][1])
        if plan.holds or self._holds:  # the common case: no hold involved
            await self._record_holds(conn, plan)

    async def _record_holds(self, conn: db.Connection, plan: ordering.Plan) -> None:
        """New or renewed holds; timed holds on trial whose rows went through end; the shard
        rows recount their holds."""
        s = self._store
        holds = {h.key: h for h in self._holds}
        changed: set[int] = set()
        for new in plan.holds:
            old = holds.get(new.key)
            retry_in_s = None if new.kind == "poison" else self._hold_delay_s(old)
            await s.add_hold(
                conn,
                new.key,
                new.shard,
                kind=new.kind,
                failed_id=new.failed_id,
                reason=new.reason,
                retry_in_s=retry_in_s,
                exists=old is not None,
            )
            changed.add(new.shard)
        over = {r.aggregate for r in plan.published} - {h.key for h in plan.holds}
        for hold in self._holds:
            if hold.kind == "timed" and (hold.open or hold.due) and hold.key in over:
                await s.delete_hold(conn, hold.key, hold.shard)
                changed.add(hold.shard)
        for shard in sorted(changed):
            await s.count_holds(conn, shard)

    def _hold_delay_s(self, old: store.Hold | None) -> float:
        attempts = old.attempts if old is not None else 0
        delay_s: float = self._worker.hold_retry_initial_s * 2 ** min(attempts, 32)
        return min(self._worker.hold_retry_max_s, delay_s)

    async def _rollback(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            async with asyncio.timeout(self._call_timeout_s):
                await conn.rollback()
        except Exception:  # noqa: BLE001 - the connection is dropped and rebuilt instead
            self._disconnect()

    def _disconnect(self) -> None:
        db.close(self._conn)
        self._conn = None
