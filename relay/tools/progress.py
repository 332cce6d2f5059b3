"""Live progress of ``relay bench``: one line every ``--progress-interval`` seconds on stderr
(stdout keeps the report), for every mode.

A :class:`Ticker` prints what a meter's ``line()`` returns. The meters:

* :class:`LoadMeter` (``rate`` and ``capacity``): rates of the last window in transactions/s
  and events/s, p50/p99 from transaction start of the events received in the window, the
  relay's backlog (committed rows it has not published, from its ``/metrics``), the events in
  flight (committed, not received), relay CPU and RSS, the bench's own CPU. It also keeps the
  backlog samples a capacity step is judged on.
* :class:`DrainMeter` (``drain``) and :class:`RawMeter` (``raw``).
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections.abc import Callable
from typing import Protocol, TextIO

import psutil
import structlog

from relay.tools import loadgen, polling, processes, stats

log = structlog.get_logger(__name__)

LOAD_LEGEND = (
    "live, per window: txn/s = transactions ended (committed or rolled back on purpose); "
    "events/s = events committed, recv/s = received; p50/p99 ms = transaction start -> "
    "receipt of the events received in the window; backlog = committed rows the relay has not "
    "published; in-flight = committed events not received yet; cpu% of one core"
)


class Meter(Protocol):
    header: str

    async def line(self) -> str: ...


def _num(value: float, width: int, decimals: int = 0) -> str:
    if math.isnan(value):
        return f"{'-':>{width}}"
    if math.isinf(value):
        return f"{'inf':>{width}}"
    return f"{value:>{width},.{decimals}f}"


class _Cpu:
    """CPU % of one core of a process between two calls (NaN once it is gone)."""

    def __init__(self, seconds: Callable[[], float]) -> None:
        self._seconds = seconds
        self._last = (time.monotonic(), self._read())

    def _read(self) -> float:
        try:
            return self._seconds()
        except (psutil.Error, RuntimeError):
            return math.nan

    def percent(self) -> float:
        now, cpu = time.monotonic(), self._read()
        t0, cpu0 = self._last
        self._last = (now, cpu)
        return 100.0 * (cpu - cpu0) / (now - t0) if now > t0 else math.nan


def bench_cpu_s() -> float:
    """CPU seconds of this process (Service A, Service B and the bench together)."""
    times = psutil.Process().cpu_times()
    return float(times.user + times.system)


def _rss_mb(relay: processes.RelayProcess) -> float:
    return relay.rss_samples[-1][1] / 2**20 if relay.rss_samples else math.nan


class LoadMeter:
    """Rate and capacity modes; :meth:`begin` names the phase, its target and its writers."""

    header = (
        f"{'time s':>7} {'phase':>10} {'target':>8} {'txn/s':>7} {'events/s':>8} "
        f"{'recv/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'backlog':>8} {'in-flight':>9} "
        f"{'relay cpu%':>10} {'relay MB':>8} {'bench cpu%':>10}"
    )

    def __init__(self, tracker: stats.Tracker, relay: processes.RelayProcess) -> None:
        self._tracker = tracker
        self._relay = relay
        self.started = time.monotonic()
        self.phase = "-"
        self.target = math.nan
        self._writers: loadgen.ServiceA | None = None
        self._last_t = self.started
        self._last_committed = tracker.committed_count
        self._last_received = tracker.received_count
        self._last_tx = 0
        self._relay_cpu = _Cpu(relay.cpu_s)
        self._bench_cpu = _Cpu(bench_cpu_s)
        self.samples: list[tuple[float, float]] = []  # (monotonic time, backlog rows)

    def begin(self, phase: str, target: float, writers: loadgen.ServiceA | None) -> None:
        """From now on the lines show ``phase`` with ``target`` txn/s written by ``writers``."""
        self.phase, self.target, self._writers = phase, target, writers
        self._last_tx = 0

    def backlog_since(self, t0: float, t1: float = math.inf) -> list[tuple[float, float]]:
        """Backlog samples taken between ``t0`` and ``t1``, as (seconds after ``t0``, rows)."""
        return [(t - t0, rows) for t, rows in self.samples if t0 <= t <= t1]

    async def line(self) -> str:
        tracker = self._tracker
        published = await self._relay.published()
        now = time.monotonic()
        seconds = max(1e-9, now - self._last_t)
        committed, received = tracker.committed_count, tracker.received_count
        backlog = math.nan
        if published is not None:
            backlog = max(0.0, committed - published)
            self.samples.append((now, backlog))
        tx = self._writers.stats.transactions if self._writers is not None else 0
        tx_rate = (tx - self._last_tx) / seconds if self._writers is not None else math.nan
        events_rate = (committed - self._last_committed) / seconds
        received_rate = (received - self._last_received) / seconds
        self._last_t, self._last_committed, self._last_received, self._last_tx = (
            now,
            committed,
            received,
            tx,
        )
        from_start, _ = tracker.take_windows()
        return (
            f"{now - self.started:7.1f} {self.phase:>10} {_num(self.target, 8)} "
            f"{_num(tx_rate, 7)} {_num(events_rate, 8)} {_num(received_rate, 8)} "
            f"{_num(stats.percentile(from_start, 50), 7, 1)} "
            f"{_num(stats.percentile(from_start, 99), 7, 1)} "
            f"{_num(backlog, 8)} {tracker.in_flight:9,d} "
            f"{_num(self._relay_cpu.percent(), 10, 1)} {_num(_rss_mb(self._relay), 8, 1)} "
            f"{_num(self._bench_cpu.percent(), 10, 1)}"
        )


class DrainMeter:
    """Drain mode: the relay publishes a preloaded backlog of ``rows``."""

    header = (
        f"{'time s':>7} {'published/s':>11} {'published':>10} {'backlog':>10} "
        f"{'in-flight':>10} {'relay cpu%':>10} {'relay MB':>8}"
    )

    def __init__(
        self,
        tracker: stats.Tracker,
        relay: processes.RelayProcess,
        rows: int,
        published_before: float,
    ) -> None:
        self._tracker = tracker
        self._relay = relay
        self._rows = rows
        self._before = published_before
        self.started = self._last_t = time.monotonic()
        self._last_published = 0.0
        self._relay_cpu = _Cpu(relay.cpu_s)

    async def line(self) -> str:
        value = await self._relay.published()
        now = time.monotonic()
        published = math.nan if value is None else value - self._before
        rate = (published - self._last_published) / max(1e-9, now - self._last_t)
        if not math.isnan(published):
            self._last_published = published
        self._last_t = now
        return (
            f"{now - self.started:7.1f} {_num(rate, 11)} {_num(published, 10)} "
            f"{_num(self._rows - self._before - published, 10)} "
            f"{self._tracker.in_flight:10,d} {_num(self._relay_cpu.percent(), 10, 1)} "
            f"{_num(_rss_mb(self._relay), 8, 1)}"
        )


class RawMeter:
    """Raw mode: records produced straight to Kafka (no database, no relay)."""

    header = f"{'time s':>7} {'sent/s':>9} {'sent':>10} {'acknowledged':>12} {'bench cpu%':>10}"

    def __init__(self, raw: loadgen.RawProgress) -> None:
        self._raw = raw
        self.started = self._last_t = time.monotonic()
        self._last_sent = 0
        self._bench_cpu = _Cpu(bench_cpu_s)

    async def line(self) -> str:
        now = time.monotonic()
        sent = self._raw.sent
        rate = (sent - self._last_sent) / max(1e-9, now - self._last_t)
        self._last_t, self._last_sent = now, sent
        return (
            f"{now - self.started:7.1f} {_num(rate, 9)} {sent:10,d} "
            f"{self._raw.acknowledged:12,d} {_num(self._bench_cpu.percent(), 10, 1)}"
        )


class Ticker:
    """``async with Ticker(interval_s, meter):`` prints the meter's header, then one line every
    ``interval_s`` until the block ends. A failing line is logged, never fatal."""

    def __init__(
        self,
        interval_s: float,
        meter: Meter,
        stream: TextIO | None = None,
        legend: str | None = None,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"progress interval must be positive, not {interval_s}")
        self._interval_s = interval_s
        self._meter = meter
        self._stream = stream
        self._legend = legend
        self._task: asyncio.Task[None] | None = None

    def print(self, text: str) -> None:
        """A line of its own between the progress lines (e.g. a step's verdict)."""
        print(text, file=self._stream or sys.stderr, flush=True)

    async def __aenter__(self) -> Ticker:
        if self._legend:
            self.print(self._legend)
        self.print(self._meter.header)
        self._task = asyncio.create_task(self._run(), name="bench-progress")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await polling.cancel(self._task)

    async def _run(self) -> None:
        started = time.monotonic()
        tick = 0
        failures = 0
        while True:  # on the tick grid; ticks missed while a line took long are skipped
            tick = max(tick + 1, math.ceil((time.monotonic() - started) / self._interval_s))
            await asyncio.sleep(max(0.0, started + tick * self._interval_s - time.monotonic()))
            try:
                self.print(await self._meter.line())
            except Exception as exc:  # noqa: BLE001 - progress must never end a run
                failures += 1
                if failures <= 3:
                    log.warning("bench_progress_failed", error=f"{type(exc).__name__}: {exc}")
