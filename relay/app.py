"""The daemon: wires the loops together, supervises them and shuts them down in order.

Lifecycle: probe endpoint up; producer connected (retried until it works); then the workers, the
cleaner, the backlog sampler and the heartbeat run as named tasks. A stop request (SIGTERM,
SIGINT or :meth:`App.request_stop`) sets an event: workers stop claiming and finish the batch in
flight; after ``shutdown_timeout_s`` whatever still runs is cancelled (a cancelled batch rolls
back, and mark-and-commit is shielded). The producer is flushed and closed last. A loop that
dies unexpectedly stops the whole daemon with exit code 1 so that its supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import structlog

from relay import (
    backlog,
    binlog,
    cleaner,
    config,
    db,
    errors,
    http,
    metrics,
    pacing,
    preflight,
    publisher,
    store,
    wakeup,
    worker,
)

log = structlog.get_logger(__name__)

# The health loop asks Kafka for metadata every this many seconds (ticks).
KAFKA_PROBE_EVERY = 5


@dataclasses.dataclass(frozen=True)
class Dependencies:
    """What the daemon talks to, when not the real servers (unit tests pass fakes)."""

    producer_factory: Callable[[], Any] | None = None
    store: Any = None  # store.Claiming and store.Observing
    connect: worker.Connect | None = None  # a connection with autocommit off
    verify: Callable[[], Awaitable[None]] | None = None  # the start-up check


class App:
    def __init__(self, settings: config.Settings, deps: Dependencies | None = None) -> None:
        deps = deps or Dependencies()
        self.settings = settings
        self.stop = asyncio.Event()
        self.waker = pacing.Waker()
        self.publisher = publisher.Publisher(settings, deps.producer_factory)
        self.heartbeat = http.Heartbeat()
        self.http_server = http.ProbeServer(settings.http, self.heartbeat, self.readiness)
        self.wakeup = wakeup.Listener(settings.wakeup, self.waker)
        # one idle look per process, on its own autocommit connection
        self.probe = worker.Probe(
            deps.store or store.Store(settings.outbox.table, settings.db.call_timeout_s),
            deps.connect or (lambda: db.connect(settings)),
        )
        self.workers = [
            worker.Worker(
                f"worker-{i}",
                settings,
                self.publisher,
                self.stop,
                self.waker,
                store_=deps.store,
                connect=deps.connect,
                probe=self.probe,
            )
            for i in range(settings.worker.count)
        ]
        self._deps = deps
        self._tasks: list[asyncio.Task[None]] = []
        self._startup_problem = "starting"
        self._kafka_problem = ""
        self._health_ticks = 0

    def request_stop(self) -> None:
        if not self.stop.is_set():
            log.info("stop_requested")
        self.stop.set()
        self.waker.notify_all()

    async def run(self) -> int:
        """Run until stopped. Returns the process exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            return await self._run()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    async def _run(self) -> int:
        if self.settings.http.enabled:
            await self.http_server.start()
        if self.settings.wakeup.enabled:
            await self.wakeup.start()
        self._spawn("heartbeat", self.heartbeat.run(self.stop))
        log.info(
            "relay_starting",
            table=self.settings.outbox.table,
            workers=self.settings.worker.count,
            kafka=self.settings.kafka.bootstrap_servers,
            db=f"{self.settings.db.host}:{self.settings.db.port}/{self.settings.db.name}",
        )
        exit_code = 0
        try:
            exit_code = await self._verify_database()
            if exit_code == 0 and await self._connect_kafka():
                await self._check_dead_letter_topic()
                for w in self.workers:
                    self._spawn(w.name, w.run())
                if self.settings.cleaner.enabled:
                    self._spawn("cleaner", cleaner.Cleaner(self.settings, self.stop).run())
                sampler = backlog.BacklogSampler(
                    self.settings, self.stop, store_=self._deps.store, connect=self._deps.connect
                )
                self._spawn("backlog", sampler.run())
                self._spawn("health", pacing.periodic("health", self.stop, 1.0, self._health))
                if self.settings.wakeup.binlog:
                    follower = binlog.Follower(self.settings, self.waker, self.stop)
                    self._spawn("binlog", follower.run())
                log.info("relay_started")
                exit_code = await self._supervise()
        finally:
            await self._shutdown()
        return exit_code

    def _spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))

    def _backoff(self) -> pacing.Backoff:
        w = self.settings.worker
        return pacing.Backoff(w.backoff_initial_s, w.backoff_max_s)

    async def _verify_database(self) -> int:
        """Schema version and grants, before any work: exit code 4 naming what is missing.

        An unreachable database is retried (it may be starting) until a stop is requested.
        """
        verify = self._deps.verify or functools.partial(preflight.verify, self.settings)
        try:
            if await self._keep_trying(verify, "database_check_failed", "database_unreachable"):
                self._startup_problem = ""
        except errors.MissingError as exc:
            log.error("database_not_ready_for_relay", problem=str(exc))  # noqa: TRY400 - expected
            return errors.ExitCode.MISSING
        return 0

    async def _connect_kafka(self) -> bool:
        """Start the producer, retrying until it works or a stop is requested."""
        return await self._keep_trying(self.publisher.start, "kafka_connect_failed")

    async def _keep_trying(
        self, step: Callable[[], Awaitable[None]], failed_event: str, problem: str = ""
    ) -> bool:
        """Run ``step`` until it works (True) or a stop is requested (False). A passing or
        operational failure is logged and retried with backoff (and ``problem`` reported by
        /readyz meanwhile); anything else, a bug or an expected RelayError, propagates."""
        backoff = self._backoff()
        while not self.stop.is_set():
            try:
                await step()
            except Exception as exc:
                if errors.classify(exc) is errors.Kind.BUG:
                    raise
                self._startup_problem = problem or self._startup_problem
                log.warning(failed_event, error=errors.one_line(exc))
                await pacing.sleep_unless(self.stop, backoff.next_delay_s())
            else:
                return True
        return False

    async def _check_dead_letter_topic(self) -> None:
        """A missing dead-letter topic is the operator's to fix: said loudly, not fatal (failed
        rows are still marked, with the copy's error in ``last_error``)."""
        topic = self.settings.outbox.dead_letter_topic
        if not topic:
            return
        try:
            missing = await self.publisher.missing_topics({topic})
        except Exception as exc:
            if errors.classify(exc) is errors.Kind.BUG:
                raise
            log.warning("dead_letter_topic_unchecked", topic=topic, error=errors.one_line(exc))
            return
        if missing:
            log.error("dead_letter_topic_missing", topic=topic)

    async def _health(self) -> None:
        """Every second: the ready gauge; every ``KAFKA_PROBE_EVERY`` seconds: ask Kafka for
        metadata (an idle relay's workers do not talk to Kafka)."""
        self._health_ticks += 1
        if self.publisher.started and self._health_ticks % KAFKA_PROBE_EVERY == 1:
            try:
                async with asyncio.timeout(self.settings.kafka.request_timeout_s):
                    await self.publisher.producer.client.fetch_all_metadata()
            except Exception as exc:
                if errors.classify(exc) is errors.Kind.BUG:
                    raise
                if not self._kafka_problem:
                    log.warning("kafka_unreachable", error=errors.one_line(exc))
                self._kafka_problem = "unreachable"
            else:
                if self._kafka_problem:
                    log.info("kafka_reachable")
                self._kafka_problem = ""
        metrics.ready.set(int(not await self.readiness()))

    async def _supervise(self) -> int:
        stopped = asyncio.create_task(self.stop.wait(), name="stop-wait")
        try:
            done, _ = await asyncio.wait(
                [stopped, *self._tasks], return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stopped.cancel()
        if self.stop.is_set():
            return 0
        for task in done:
            error = task.exception() if not task.cancelled() else None
            log.error("task_died", task=task.get_name(), error=repr(error), exc_info=error)
            metrics.loop_errors.labels(task.get_name().split("-")[0]).inc()
        self.request_stop()
        return 1

    async def _shutdown(self) -> None:
        self.request_stop()
        deadline = self.settings.worker.shutdown_timeout_s
        tasks = [t for t in self._tasks if not t.done()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=deadline)
            for task in pending:
                log.warning("task_cancelled_at_deadline", task=task.get_name())
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self.probe.close()
        try:
            async with asyncio.timeout(deadline):
                await self.publisher.stop()
        except Exception as exc:  # noqa: BLE001 - reported; the process is ending anyway
            log.error("producer_flush_failed", error=errors.one_line(exc))  # noqa: TRY400
        self.wakeup.stop()
        await self.http_server.stop()
        log.info(
            "relay_stopped",
            published=sum(w.published for w in self.workers),
            failed=sum(w.failed for w in self.workers),
        )

    async def readiness(self) -> dict[str, str]:
        """Problems that make this relay unable to work right now, as short reason codes (empty
        when ready). Answered from the state the loops keep; the details are in their logs."""
        problems: dict[str, str] = {}
        if self._startup_problem:
            problems["startup"] = self._startup_problem
        if not all(w.ready for w in self.workers):
            problems["workers"] = "cycles_failing"
        if not self.publisher.started:
            problems["kafka"] = "not_connected"
        elif self._kafka_problem:
            problems["kafka"] = self._kafka_problem
        return problems
