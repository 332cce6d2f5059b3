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
import contextlib
import signal
from collections.abc import Coroutine
from typing import Any

import structlog

from relay import (
    backlog,
    cleaner,
    config,
    db,
    http,
    metrics,
    pacing,
    publisher,
    store,
    wakeup,
    worker,
)

log = structlog.get_logger(__name__)


class App:
    def __init__(self, settings: config.Settings) -> None:
        self.settings = settings
        self.stop = asyncio.Event()
        self.waker = pacing.Waker()
        self.publisher = publisher.Publisher(settings)
        self.heartbeat = http.Heartbeat()
        self.http_server = http.ProbeServer(settings.http, self.heartbeat, self.readiness)
        self.wakeup = wakeup.Listener(settings.wakeup, self.waker)
        self.workers = [
            worker.Worker(f"worker-{i}", settings, self.publisher, self.stop, self.waker)
            for i in range(settings.worker.count)
        ]
        self._store = store.Store(settings.outbox.table)
        self._tasks: list[asyncio.Task[None]] = []

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
            if await self._connect_kafka():
                for w in self.workers:
                    self._spawn(w.name, w.run())
                if self.settings.cleaner.enabled:
                    self._spawn("cleaner", cleaner.Cleaner(self.settings, self.stop).run())
                self._spawn("backlog", backlog.BacklogSampler(self.settings, self.stop).run())
                log.info("relay_started")
                exit_code = await self._supervise()
        finally:
            await self._shutdown()
        return exit_code

    def _spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))

    async def _connect_kafka(self) -> bool:
        """Start the producer, retrying until it works or a stop is requested."""
        backoff = pacing.Backoff(self.settings.worker.backoff_initial_s, 5.0)
        while not self.stop.is_set():
            try:
                await self.publisher.start()
            except Exception as exc:  # noqa: BLE001 - keep trying; the broker may come back
                log.warning("kafka_connect_failed", error=f"{type(exc).__name__}: {exc}")
                await pacing.sleep_unless(self.stop, backoff.next_delay_s())
            else:
                return True
        return False

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
            log.error("task_died", task=task.get_name(), error=repr(error))
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
        with contextlib.suppress(Exception):
            async with asyncio.timeout(deadline):
                await self.publisher.stop()
        self.wakeup.stop()
        await self.http_server.stop()
        log.info(
            "relay_stopped",
            published=sum(w.published for w in self.workers),
            failed=sum(w.failed for w in self.workers),
        )

    async def readiness(self) -> dict[str, str]:
        """Problems that make this relay unable to work right now (empty when ready)."""
        problems: dict[str, str] = {}
        try:
            async with asyncio.timeout(3):
                conn = await db.connect(self.settings)
                try:
                    await self._store.ping(conn)
                finally:
                    db.close(conn)
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            problems["mysql"] = f"{type(exc).__name__}: {exc}"
        if not self.publisher.started:
            problems["kafka"] = "producer not connected"
        else:
            try:
                async with asyncio.timeout(3):
                    await self.publisher.producer.client.fetch_all_metadata()
            except Exception as exc:  # noqa: BLE001 - any failure means not ready
                problems["kafka"] = f"{type(exc).__name__}: {exc}"
        return problems
