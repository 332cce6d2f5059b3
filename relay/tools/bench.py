"""``relay demo`` and ``relay bench``: the relay with a simulated Service A and Service B.

``relay demo`` runs everything in one process (the relay is an :class:`relay.app.App`, Service A
the writer helper with wake-ups) and prints live figures every second. ``relay bench`` runs the
relay under test as a separate process (``python -m relay run``) so that its CPU time and
resident memory can be measured, in a fresh database and fresh topics, and reports latency,
throughput, loss, duplicates, order, relay CPU per 1,000 events, idle CPU, peak RSS and claim
cost (from the relay's ``/metrics``), with a progress line every second on stderr.

Modes: ``rate`` (a fixed rate of Service A transactions/s), ``capacity`` (the highest rate
sustained with p99 <= 1 s, :mod:`relay.tools.capacity`), ``drain`` (a preloaded backlog), ``raw``
(the Kafka ceiling without database) and ``all`` (raw and drain). Service A is ``--writer sql``
(plain SQL, no wake-up: the default) or ``--writer helper`` (``relay.writer`` with wake-ups).
The arguments of both commands are defined in ``relay.cli``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import platform
import signal
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import psutil
import pydantic
import structlog

from relay import __version__, app, config
from relay.tools import (
    capacity,
    consumer,
    database,
    loadgen,
    net,
    polling,
    processes,
    progress,
    stats,
    topics,
    writerpool,
)

log = structlog.get_logger(__name__)

DRAIN_WAIT_S = 30.0
CLAIM_METRIC = "outbox_relay_claim_duration_seconds"
PUBLISHED_METRIC = processes.PUBLISHED_METRIC


# -- relay demo -------------------------------------------------------------------------------


async def demo(settings: config.Settings, args: argparse.Namespace) -> int:
    """Relay + Service A + Service B in this process, one status line per second."""
    topic = f"outbox.demo-{uuid.uuid4().hex[:8]}"
    wakeup = settings.wakeup.model_copy(update={"enabled": True, "host": "127.0.0.1", "port": 0})
    settings = loadgen.with_topic(settings, topic).model_copy(update={"wakeup": wakeup})
    workload = loadgen.Workload(
        aggregates=args.aggregates,
        event_bytes=args.event_bytes,
        events_per_tx=tuple(args.events_per_txn),
    )
    tracker = stats.Tracker()
    kafka = topics.client_options(settings)
    await database.create(settings, settings.db.name, exist_ok=True)
    await database.prepare(settings, args.aggregates)
    relay_settings = await _demo_relay_settings(settings, args)
    await topics.create(kafka, topic, args.partitions)
    print(
        f"schema applied: {settings.db.name}.{settings.outbox.table}; topic {topic}; "
        f"relay as database user {relay_settings.db.user}, Service A as {settings.db.user}"
    )
    relay = app.App(relay_settings)
    relay_task = asyncio.create_task(relay.run(), name="relay")
    writers_stop = asyncio.Event()
    try:
        port = await _wakeup_port(relay, relay_task)
        _on_interrupt(writers_stop)  # after App.run installed its own handlers
        async with consumer.Consumer(settings, topic, args.partitions, workload, tracker):
            service_a = loadgen.Writers(
                settings, workload, tracker, rate=args.rate, notify_to=f"127.0.0.1:{port}"
            )
            await service_a.start(args.writers)
            try:
                print(_demo_header())
                started = time.monotonic()
                await _demo_report(tracker, started, args.duration, writers_stop, relay_task)
            finally:
                await service_a.stop()
            drained = await _wait_drained(tracker, DRAIN_WAIT_S, relay_task)
            elapsed = time.monotonic() - started
    finally:
        relay.request_stop()
        relay_code = await relay_task
        if not args.keep:
            with contextlib.suppress(Exception):
                await topics.delete(kafka, [topic])
    summary = tracker.summary()
    print(
        f"\nsummary: {elapsed:.0f} s, {service_a.stats.transactions} transactions "
        f"({service_a.stats.rollbacks} rolled back), {summary.committed} events committed, "
        f"{summary.received} received ({summary.committed / max(elapsed, 1e-9):.0f} msg/s), "
        f"{summary.duplicates} duplicates"
    )
    lat = summary.latency_from_commit_ms
    start = summary.latency_from_start_ms
    print(
        f"commit-to-consume ms: p50 {lat['p50']:.1f}  p95 {lat['p95']:.1f}  "
        f"p99 {lat['p99']:.1f}  p99.9 {lat['p99.9']:.1f}  max {lat['max']:.1f}"
    )
    print(
        f"tx-start-to-consume ms: p50 {start['p50']:.1f}  p95 {start['p95']:.1f}  "
        f"p99 {start['p99']:.1f}  p99.9 {start['p99.9']:.1f}  max {start['max']:.1f}"
    )
    print(
        f"lost {summary.lost}  rolled-back delivered {summary.leaked}  "
        f"order violations {summary.order_violations}  drained {'yes' if drained else 'NO'}"
    )
    ok = summary.ok and relay_code == 0
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


async def _demo_relay_settings(
    settings: config.Settings, args: argparse.Namespace
) -> config.Settings:
    """The demo relay's settings: ``settings`` (RELAY_DB__USER: the set-up, Service A), or with
    ``--relay-db-user``, that user, granted README's daemon grants here."""
    if not args.relay_db_user:
        return settings
    await database.grant_relay(settings, args.relay_db_user)
    password = pydantic.SecretStr(args.relay_db_password)
    relay_db = settings.db.model_copy(update={"user": args.relay_db_user, "password": password})
    return settings.model_copy(update={"db": relay_db})


async def _wakeup_port(relay: app.App, relay_task: asyncio.Task[int]) -> int:
    def listening() -> bool:
        if relay_task.done():
            raise RuntimeError(f"relay stopped at start-up (exit {relay_task.result()})")
        try:
            return relay.wakeup.port > 0
        except RuntimeError:  # not started yet
            return False

    await polling.wait_until(listening, "the relay's wake-up listener", 60, 0.02)
    return relay.wakeup.port


def _on_interrupt(stop: asyncio.Event) -> None:
    """First Ctrl-C: stop writing and drain; a second one raises KeyboardInterrupt."""
    loop = asyncio.get_running_loop()

    def handler() -> None:
        if stop.is_set():
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            raise KeyboardInterrupt
        print("\nstopping: no new transactions, waiting for the relay to drain", flush=True)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, handler)


def _demo_header() -> str:
    return (
        f"{'time':>5} {'rate/s':>7} {'in-flight':>9} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'cum p50':>8} {'cum p99':>8} {'lost':>5}"
    )


async def _demo_report(
    tracker: stats.Tracker,
    started: float,
    duration: float | None,
    stop: asyncio.Event,
    relay_task: asyncio.Task[int],
) -> None:
    """One line per second: commit-to-consume latency of the last second and cumulative."""
    tick = 0
    while not stop.is_set() and not relay_task.done():
        tick += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), started + tick - time.monotonic())
        window = tracker.take_window()
        now = time.monotonic()
        cum = tracker.cumulative
        print(
            f"{now - started:5.0f} {len(window):7d} {tracker.in_flight:9d} "
            f"{stats.percentile(window, 50):7.1f} {stats.percentile(window, 99):7.1f} "
            f"{cum.percentile(50):8.1f} {cum.percentile(99):8.1f} "
            f"{tracker.overdue(now, DRAIN_WAIT_S):5d}",
            flush=True,
        )
        if duration is not None and now - started >= duration:
            return


async def _wait_drained(
    tracker: stats.Tracker, timeout_s: float, relay_task: asyncio.Task[int] | None = None
) -> bool:
    """Whether every committed message arrived within ``timeout_s`` (False if the relay died)."""

    def settled() -> bool:
        return tracker.in_flight == 0 or (relay_task is not None and relay_task.done())

    with contextlib.suppress(TimeoutError):
        await polling.wait_until(settled, "the relay to drain", timeout_s)
    return tracker.in_flight == 0


# -- relay bench: the relay as a separate process ---------------------------------------------

RATE_DURATION_S = 60.0  # rate mode's load when --duration is not given
CAPACITY_STEP_S = 20.0  # capacity mode's step when --duration is not given
JUDGE_MARGIN_S = 0.5  # a capacity step is judged this long after its latency limit has passed


class Window:
    """Relay CPU time and metrics between two moments."""

    def __init__(self, relay: processes.RelayProcess) -> None:
        self._relay = relay
        self.t0 = 0.0
        self.cpu0 = 0.0
        self.uptime0 = 0.0
        self.metrics0 = ""

    async def open(self) -> None:
        self.metrics0 = await self._relay.metrics()
        self.t0 = time.monotonic()
        self.cpu0 = self._relay.cpu_s()
        self.uptime0 = self._relay.uptime_s()

    async def close(self) -> dict[str, Any]:
        metrics1 = await self._relay.metrics()
        seconds = time.monotonic() - self.t0
        cpu = self._relay.cpu_s() - self.cpu0
        published = stats.parse_counter(metrics1, PUBLISHED_METRIC) - stats.parse_counter(
            self.metrics0, PUBLISHED_METRIC
        )
        after, sum1 = stats.parse_histogram(metrics1, CLAIM_METRIC)
        before, sum0 = stats.parse_histogram(self.metrics0, CLAIM_METRIC)
        claims = stats.bucket_delta(after, before)
        count = claims[-1][1] if claims else 0.0
        return {
            "seconds": seconds,
            "published": published,
            "cpu_s": cpu,
            "cpu_ms_per_1000_events": cpu * 1000.0 / (published / 1000.0)
            if published
            else math.nan,
            "cpu_percent": 100.0 * cpu / seconds,
            "peak_rss_mb": self._relay.peak_rss_mb(self.uptime0),
            "claim": {
                "count": count,
                "p50_ms": 1000.0 * stats.histogram_quantile(claims, 0.5),
                "p99_ms": 1000.0 * stats.histogram_quantile(claims, 0.99),
                "mean_ms": 1000.0 * (sum1 - sum0) / count if count else math.nan,
            },
        }


def _relay_env(
    settings: config.Settings, database_name: str, topic: str, *, wakeup: bool
) -> dict[str, str]:
    """This process's environment (its RELAY_* settings included) plus the bench's own; the
    wake-up listener on (a free UDP port) only for the helper writer."""
    wake: dict[str, object] = {"wakeup__enabled": "false"}
    if wakeup:
        wake = {
            "wakeup__enabled": "true",
            "wakeup__host": "127.0.0.1",
            "wakeup__port": net.free_port(socket.SOCK_DGRAM),
        }
    return {
        **os.environ,
        **processes.settings_env(
            db__name=database_name,
            outbox__topic_template=topic,
            http__host="127.0.0.1",
            http__port=net.free_port(),
            log__format="json",
            log__level=settings.log.level,
            **wake,
        ),
    }


def _delivery(summary: stats.Summary) -> dict[str, Any]:
    return {
        "committed": summary.committed,
        "rolled_back": summary.rolled_back,
        "received": summary.received,
        "lost": summary.lost,
        "rolled_back_delivered": summary.leaked,
        "duplicates": summary.duplicates,
        "order_violations": summary.order_violations,
        "split_keys": summary.split_keys,
        "foreign": summary.foreign,
        "order_violation_examples": summary.order_violation_examples,
    }


def _writer_figures(service_a: loadgen.ServiceA) -> dict[str, Any]:
    return {
        "transactions": service_a.stats.transactions,
        "rolled_back_transactions": service_a.stats.rollbacks,
        "writer_errors": len(service_a.errors),
        "skipped_ticks": service_a.stats.skipped,
        "writer_processes_cpu_s": service_a.process_cpu_s,
    }


class Bench:
    """One ``relay bench`` run: fresh database and topics, the relay as a child process.

    Rates given (``--rate``, ``--max-rate``) are transactions per second of Service A; results
    name their unit in every key (``..._txn_per_s``, ``..._events_per_s``).
    """

    def __init__(self, settings: config.Settings, args: argparse.Namespace) -> None:
        self.args = args
        self.run_id = uuid.uuid4().hex[:8]
        self.database = f"outbox_bench_{self.run_id}"
        self.settings = loadgen.with_database(settings, self.database)
        self.kafka = topics.client_options(settings)
        self.topics: list[str] = []
        self.writer: str = args.writer
        self.wakeup = self.writer == "helper"
        default_s = CAPACITY_STEP_S if args.mode == "capacity" else RATE_DURATION_S
        self.duration: float = args.duration if args.duration is not None else default_s
        workload = self._workload()
        run_config: dict[str, Any] = {
            "writer": self.writer,
            "wakeup": self.wakeup,
            "rate_unit": "txn/s",
            "rate_txn_per_s": args.rate,
            "events_per_txn": list(workload.events_per_tx),
            "rollback_ratio": workload.rollback_ratio,
            "duration_s": self.duration,
        }
        if args.mode == "capacity":
            run_config |= {
                "duration_is": "per step",
                "max_rate_txn_per_s": args.max_rate,
                "max_steps": args.max_steps,
                "step_factor": args.step_factor,
                "p99_limit_ms": capacity.P99_LIMIT_MS,
            }
        self.report: dict[str, Any] = {
            "version": __version__,
            "mode": args.mode,
            "run_id": self.run_id,
            "config": {
                **run_config,
                "rows": args.rows,
                "retained_published": args.retained_published,
                "aggregates": args.aggregates,
                "writers": args.writers,
                "writer_processes": args.writer_processes,
                "event_bytes": args.event_bytes,
                "partitions": args.partitions,
                "relay_workers": settings.worker.count,
                "batch_size": settings.worker.batch_size,
                "linger_s": settings.kafka.linger_s,
                "max_batch_bytes": settings.kafka.max_batch_bytes,
                "compression": settings.kafka.compression,
            },
            "machine": machine(),
        }

    def _workload(self) -> loadgen.Workload:
        return loadgen.Workload(
            aggregates=self.args.aggregates,
            event_bytes=self.args.event_bytes,
            events_per_tx=tuple(self.args.events_per_txn),
        )

    def _consumer(
        self, topic: str, workload: loadgen.Workload, tracker: stats.Tracker
    ) -> consumer.Consumer:
        return consumer.Consumer(self.settings, topic, self.args.partitions, workload, tracker)

    def _writers(
        self,
        workload: loadgen.Workload,
        tracker: stats.Tracker,
        tx_rate: float,
        notify_to: str | None,
    ) -> loadgen.ServiceA:
        processes: int = self.args.writer_processes
        if processes > 1:
            return writerpool.WriterPool(
                self.settings,
                workload,
                tracker,
                processes=processes,
                kind=self.writer,
                tx_rate=tx_rate,
                notify_to=notify_to,
            )
        return loadgen.Writers(
            self.settings, workload, tracker, kind=self.writer, tx_rate=tx_rate, notify_to=notify_to
        )

    def _ticker(self, meter: progress.Meter, legend: str | None = None) -> progress.Ticker:
        return progress.Ticker(self.args.progress_interval, meter, legend=legend)

    async def _topic(self, kind: str) -> str:
        topic = f"bench.{self.run_id}.{kind}"
        await topics.create(self.kafka, topic, self.args.partitions)
        self.topics.append(topic)
        return topic

    async def run(self) -> bool:
        mode = self.args.mode
        ok = True
        await database.create(self.settings, self.database, exist_ok=False)
        try:
            await database.prepare(self.settings, self.args.aggregates)
            if self.args.retained_published:
                rate = await loadgen.preload_published(
                    self.settings, self._workload(), self.args.retained_published
                )
                self.report["retained_preload_rows_per_s"] = rate
            if mode in ("raw", "all"):
                self.report["raw"] = await self.raw()
            if mode in ("drain", "all"):
                ok = await self.drain() and ok
            if mode == "rate":
                ok = await self.rate()
            if mode == "capacity":
                ok = await self.capacity()
            if mode == "all":
                self.report["drain_to_raw_ratio"] = (
                    self.report["drain"]["events_per_s"] / self.report["raw"]["events_per_s"]
                )
        finally:
            if not self.args.keep:
                with contextlib.suppress(Exception):
                    await database.drop(self.settings, self.database)
                with contextlib.suppress(Exception):
                    await topics.delete(self.kafka, self.topics)
        self.report["ok"] = ok
        return ok

    async def raw(self) -> dict[str, Any]:
        topic = await self._topic("raw")
        events = self.args.rows
        log.info("bench_raw", events=events, topic=topic)
        raw = loadgen.RawProgress()
        async with self._ticker(progress.RawMeter(raw)):
            return await loadgen.produce_raw(self.settings, topic, self._workload(), events, raw)

    async def _start(self, topic: str) -> tuple[processes.RelayProcess, str | None]:
        """The relay under test, ready; and the wake-up address (None: plain-SQL writer, the
        relay listens for no wake-up)."""
        env = _relay_env(self.settings, self.database, topic, wakeup=self.wakeup)
        relay = processes.RelayProcess(
            "relay", env, int(env["RELAY_HTTP__PORT"]), self.args.relay_log
        )
        relay.start()
        relay.start_sampling()
        try:
            await relay.wait_ready()
        except BaseException:
            await relay.stop()
            raise
        log.info("bench_relay_started", pid=relay.pid, http_port=relay.http_port)
        notify_to = f"127.0.0.1:{env['RELAY_WAKEUP__PORT']}" if self.wakeup else None
        return relay, notify_to

    async def _idle(self, relay: processes.RelayProcess) -> float:
        """Relay CPU in % of one core over a quiet period (wall time is what is measured)."""
        if self.args.idle_seconds <= 0:
            return math.nan
        await asyncio.sleep(1.0)
        cpu0, t0 = relay.cpu_s(), time.monotonic()
        await asyncio.sleep(self.args.idle_seconds)
        return 100.0 * (relay.cpu_s() - cpu0) / (time.monotonic() - t0)

    async def rate(self) -> bool:
        topic = await self._topic("rate")
        workload, tracker = self._workload(), stats.Tracker()
        async with self._consumer(topic, workload, tracker):
            relay, notify_to = await self._start(topic)
            try:
                idle = await self._idle(relay)
                window = Window(relay)
                await window.open()
                bench_cpu0 = progress.bench_cpu_s()
                meter = progress.LoadMeter(tracker, relay)
                service_a = self._writers(workload, tracker, self.args.rate, notify_to)
                log.info(
                    "bench_rate",
                    writer=self.writer,
                    rate_txn_per_s=self.args.rate,
                    duration_s=self.duration,
                )
                async with self._ticker(meter, progress.LOAD_LEGEND):
                    await service_a.start(self.args.writers)
                    meter.begin("rate", self.args.rate, service_a)
                    load_started = time.monotonic()
                    try:
                        await asyncio.sleep(self.duration)  # the load period: wall time
                    finally:
                        await service_a.stop()
                    load_s = time.monotonic() - load_started
                    meter.begin("drain", math.nan, None)
                    drained = await _wait_drained(tracker, DRAIN_WAIT_S)
                measured = await window.close()
                bench_cpu = progress.bench_cpu_s() - bench_cpu0
            finally:
                relay_code = await relay.stop()
        summary = tracker.summary()
        self.report["rate"] = {
            "writer": self.writer,
            "wakeup": self.wakeup,
            "target_txn_per_s": self.args.rate,
            "txn_per_s": service_a.stats.transactions / load_s,
            "committed_txn_per_s": (service_a.stats.transactions - service_a.stats.rollbacks)
            / load_s,
            "committed_events_per_s": summary.committed / load_s,
            "received_events_per_s": summary.received / measured["seconds"],
            "load_seconds": load_s,
            **_writer_figures(service_a),
            "drained": drained,
            "latency_from_tx_start_ms": summary.latency_from_start_ms,
            "latency_from_commit_ms": summary.latency_from_commit_ms,
            **_delivery(summary),
            "bench_cpu_percent": 100.0 * bench_cpu / measured["seconds"],
            "relay": {
                "exit_code": relay_code,
                "idle_cpu_percent": idle,
                "rss_mb_series": _downsample(relay.rss_samples, 5.0),
                **measured,
            },
        }
        return summary.ok and drained and relay_code == 0

    async def capacity(self) -> bool:
        """Steps of ``self.duration`` seconds at rising rates (see :mod:`relay.tools.capacity`)
        against one relay process; each step starts with nothing in flight."""
        args = self.args
        topic = await self._topic("capacity")
        workload, tracker = self._workload(), stats.Tracker()
        search = capacity.CapacitySearch(
            args.rate, args.max_rate, factor=args.step_factor, max_steps=args.max_steps
        )
        steps: list[dict[str, Any]] = []
        async with self._consumer(topic, workload, tracker):
            relay, notify_to = await self._start(topic)
            try:
                idle = await self._idle(relay)
                meter = progress.LoadMeter(tracker, relay)
                log.info(
                    "bench_capacity",
                    writer=self.writer,
                    start_txn_per_s=search.start,
                    max_rate_txn_per_s=args.max_rate,
                    step_s=self.duration,
                    max_steps=args.max_steps,
                )
                async with self._ticker(meter, progress.LOAD_LEGEND) as ticker:
                    while (rate := search.next_rate()) is not None:
                        step = await self._capacity_step(
                            relay,
                            tracker=tracker,
                            workload=workload,
                            meter=meter,
                            notify_to=notify_to,
                            rate=rate,
                            phase=search.phase,
                        )
                        step["step"] = len(steps) + 1
                        steps.append(step)
                        search.record(rate, step["passed"], step["reasons"])
                        ticker.print(_step_line(step))
                        if not step["drained"]:
                            search.abort(f"step {step['step']} did not drain in {DRAIN_WAIT_S:g} s")
                    meter.begin("drain", math.nan, None)
                    drained = await _wait_drained(tracker, DRAIN_WAIT_S)
            finally:
                relay_code = await relay.stop()
        summary = tracker.summary()
        outcome = search.outcome()
        best = next((s for s in steps if s["target_txn_per_s"] == outcome.highest_passing), None)
        self.report["capacity"] = {
            "writer": self.writer,
            "wakeup": self.wakeup,
            "p99_limit_ms": capacity.P99_LIMIT_MS,
            "step_seconds": self.duration,
            "step_factor": search.factor,
            "start_txn_per_s": search.start,
            "max_rate_txn_per_s": search.max_rate,
            "max_steps": search.max_steps,
            "result": {
                **outcome.as_dict(),
                # measured in the highest passing step
                "committed_events_per_s": best["committed_events_per_s"] if best else None,
                "p99_from_tx_start_ms": best["latency_from_tx_start_ms"]["p99"] if best else None,
                "relay_cpu_ms_per_1000_events": best["relay"]["cpu_ms_per_1000_events"]
                if best
                else None,
                "relay_cpu_percent": best["relay"]["cpu_percent"] if best else None,
            },
            "steps": steps,
            "drained": drained,
            **_delivery(summary),
            "relay": {
                "exit_code": relay_code,
                "idle_cpu_percent": idle,
                "peak_rss_mb": relay.peak_rss_mb(),
                "rss_mb_series": _downsample(relay.rss_samples, 5.0),
            },
        }
        return summary.ok and drained and relay_code == 0

    async def _capacity_step(
        self,
        relay: processes.RelayProcess,
        *,
        tracker: stats.Tracker,
        workload: loadgen.Workload,
        meter: progress.LoadMeter,
        notify_to: str | None,
        rate: float,
        phase: str,
    ) -> dict[str, Any]:
        """One step at ``rate`` txn/s: load for ``self.duration``, stop, judge once every event
        is received or older than the limit, then let the rest drain."""
        window = Window(relay)
        await window.open()
        bench_cpu0 = progress.bench_cpu_s()
        committed0 = tracker.committed_count
        position = tracker.latency_count
        service_a = self._writers(workload, tracker, rate, notify_to)
        mark = time.monotonic()  # every commit of this step comes after this
        await service_a.start(self.args.writers)
        meter.begin(phase, rate, service_a)
        t0 = time.monotonic()
        try:
            await asyncio.sleep(self.duration)
        finally:
            await service_a.stop()
        t1 = time.monotonic()
        load_s = t1 - t0
        meter.begin("judge", math.nan, None)
        with contextlib.suppress(TimeoutError):  # the rest is late: older than the limit
            await polling.wait_until(
                lambda: tracker.in_flight == 0,
                "the step's events",
                capacity.P99_LIMIT_MS / 1000.0 + JUDGE_MARGIN_S,
                0.02,
            )
        late = tracker.in_flight
        from_start, from_commit = tracker.latencies_committed_since(mark, position)
        measured = await window.close()
        bench_cpu = progress.bench_cpu_s() - bench_cpu0
        figures = capacity.StepFigures(
            target_txn_per_s=rate,
            txn_per_s=service_a.stats.transactions / load_s,
            events_per_s=(tracker.committed_count - committed0) / load_s,
            latencies_ms=from_start,
            late=late,
            backlog=meter.backlog_since(t0, t1),
        )
        verdict = capacity.judge(figures)
        drained = late == 0
        if not drained:
            meter.begin("drain", math.nan, None)
            drained = await _wait_drained(tracker, DRAIN_WAIT_S)
        return {
            "phase": phase,
            "target_txn_per_s": rate,
            "load_seconds": load_s,
            "txn_per_s": figures.txn_per_s,
            "committed_events_per_s": figures.events_per_s,
            "latency_from_tx_start_ms": stats.summarize(from_start),
            "latency_from_commit_ms": stats.summarize(from_commit),
            "late_events": late,
            "judged_p99_ms": verdict.p99_ms,
            "backlog_growth_rows_per_s": verdict.backlog_growth_per_s,
            "backlog_end_rows": verdict.backlog_end,
            "passed": verdict.passed,
            "reasons": list(verdict.reasons),
            "drained": drained,
            **_writer_figures(service_a),
            "bench_cpu_percent": 100.0 * bench_cpu / measured["seconds"],
            "relay": measured,
        }

    async def drain(self) -> bool:
        topic = await self._topic("drain")
        workload, tracker = self._workload(), stats.Tracker()
        rows: int = self.args.rows
        log.info("bench_preload", rows=rows)
        preload_rate = await loadgen.preload_new(self.settings, workload, tracker, rows)
        async with self._consumer(topic, workload, tracker) as service_b:
            relay, _ = await self._start(topic)
            try:
                window = Window(relay)
                await window.open()
                start_published = stats.parse_counter(window.metrics0, PUBLISHED_METRIC)
                log.info("bench_drain", rows=rows, already_published=start_published)

                async def published_all() -> bool:
                    return stats.parse_counter(await relay.metrics(), PUBLISHED_METRIC) >= rows

                meter = progress.DrainMeter(tracker, relay, rows, start_published)
                async with self._ticker(meter):
                    with contextlib.suppress(TimeoutError):  # judged by `drained` below
                        await polling.wait_until(
                            published_all,
                            "the backlog to be published",
                            self.args.drain_timeout,
                            0.1,
                        )
                    published_s = time.monotonic() - window.t0
                    measured = await window.close()
                    drained = await _wait_drained(tracker, DRAIN_WAIT_S)
                received_s = service_b.last_receipt - window.t0
                idle = await self._idle(relay)
            finally:
                relay_code = await relay.stop()
        summary = tracker.summary()
        counted = rows - start_published
        self.report["drain"] = {
            "rows": rows,
            "preload_rows_per_s": preload_rate,
            "published_before_window": start_published,
            "seconds": published_s,
            "events_per_s": min(counted, measured["published"]) / published_s,
            "all_received_seconds": received_s,
            "drained": drained,
            **_delivery(summary),
            "relay": {"exit_code": relay_code, "idle_cpu_percent": idle, **measured},
        }
        return summary.ok and drained and relay_code == 0


def _step_line(step: dict[str, Any]) -> str:
    """A capacity step's verdict, printed between the progress lines."""
    verdict = "PASS" if step["passed"] else f"FAIL ({', '.join(step['reasons'])})"
    return (
        f"step {step['step']} ({step['phase']}): target {step['target_txn_per_s']:,.1f} txn/s, "
        f"achieved {step['txn_per_s']:,.1f} txn/s = {step['committed_events_per_s']:,.0f} "
        f"committed events/s; p99 tx start -> receipt {_fmt(step['judged_p99_ms'])} ms "
        f"({step['late_events']} late); backlog growth "
        f"{step['backlog_growth_rows_per_s']:,.1f} rows/s; relay "
        f"{_fmt(step['relay']['cpu_ms_per_1000_events'])} ms CPU per 1,000 events: {verdict}"
    )


def _downsample(samples: list[tuple[float, int]], every_s: float) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for t, rss in samples:
        if not out or t - out[-1][0] >= every_s:
            out.append((round(t, 1), round(rss / 2**20, 1)))
    return out


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "python_loop_ms": python_loop_ms(),
    }


def python_loop_ms() -> float:
    """The machine's speed for Python, to compare runs of other days: the best of three times of
    a fixed pure-Python loop (a million additions), in ms. Shared virtual machines vary by 2x."""
    best = math.inf
    for _ in range(3):
        started = time.perf_counter()
        total = 0
        for i in range(1_000_000):
            total += i
        best = min(best, time.perf_counter() - started)
    return round(best * 1000, 1)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:,.2f}"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _capacity_rows(report: dict[str, Any]) -> list[str]:
    steps = report.get("capacity", {}).get("steps", [])
    if not steps:
        return []
    lines = [
        "capacity steps (rates: target/achieved txn/s, committed events/s; "
        "p99: tx start -> receipt, judged)",
        f"{'step':>4} {'phase':>7} {'target':>9} {'txn/s':>9} {'events/s':>9} {'p99 ms':>9} "
        f"{'late':>6} {'cpu ms/1k':>9}  verdict",
    ]
    for s in steps:
        verdict = "pass" if s["passed"] else "FAIL " + ",".join(s["reasons"])
        lines.append(
            f"{s['step']:>4} {s['phase']:>7} {s['target_txn_per_s']:>9,.1f} "
            f"{s['txn_per_s']:>9,.1f} {s['committed_events_per_s']:>9,.0f} "
            f"{_fmt(s['judged_p99_ms']):>9} {s['late_events']:>6} "
            f"{_fmt(s['relay']['cpu_ms_per_1000_events']):>9}  {verdict}"
        )
    return lines


def render(report: dict[str, Any]) -> str:
    """The human table: one ``section / figure / value`` row per figure."""
    rows: list[tuple[str, str, str]] = []

    def walk(section: str, prefix: str, doc: dict[str, Any]) -> None:
        for key, value in doc.items():
            if key in ("rss_mb_series", "order_violation_examples", "steps"):
                continue
            if isinstance(value, dict):
                walk(section, f"{prefix}{key}.", value)
            else:
                rows.append((section, f"{prefix}{key}", _fmt(value)))

    for section in ("raw", "drain", "rate", "capacity"):
        if section in report:
            walk(section, "", report[section])
    rows.extend(
        ("run", key, _fmt(report[key]))
        for key in ("drain_to_raw_ratio", "retained_preload_rows_per_s", "ok")
        if key in report
    )
    width = max(len(r[1]) for r in rows) if rows else 10
    config_ = report["config"]
    lines = [
        f"relay bench {report['mode']} (run {report['run_id']}; writer {config_['writer']}, "
        f"wake-up {'on' if config_['wakeup'] else 'off'}; rates in txn/s unless named events)"
    ]
    lines += [f"{s:<8} {k:<{width}} {v:>16}" for s, k, v in rows]
    lines += _capacity_rows(report)
    return "\n".join(lines)


async def main(settings: config.Settings, args: argparse.Namespace) -> int:
    if args.json:  # stdout carries the JSON object alone: logs go to stderr
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setStream(sys.stderr)
    bench = Bench(settings, args)
    ok = await bench.run()
    text = orjson.dumps(bench.report, option=orjson.OPT_INDENT_2).decode()
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    print(text if args.json else render(bench.report), flush=True)
    return 0 if ok else 1
