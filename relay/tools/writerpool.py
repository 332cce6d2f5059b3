"""Service A over several processes: ``relay bench --writer-processes N``.

One Python process cannot write faster than ~1,300 transactions/s on the 2-core development
machine: the capacity runs of issue 11 stopped there with ``limited_by: load_generator``. A
:class:`WriterPool` spreads the rate and the connections over child processes, each running a
:class:`loadgen.Writers` of its share. A child reports its commits and rollbacks to the parent's
:class:`stats.Tracker` every ``REPORT_INTERVAL_S`` (the tracker takes a receipt that comes before
the report of its commit), with its writer statistics.

Child ``k`` of a pool hands out message indexes from ``base + k * INDEX_STRIDE``, ``base`` being
the workload's next index, which the pool moves past every index handed out when it stops. All
processes share one monotonic clock (``CLOCK_MONOTONIC``), so latencies stay comparable.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing
import multiprocessing.connection
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from relay import config, logs
from relay.tools import loadgen, stats

REPORT_INTERVAL_S = 0.02
INDEX_STRIDE = 1 << 36  # indexes per child and run; message ids hold 48 bits
START_TIMEOUT_S = 60.0  # for a child to connect its writers
STOP_TIMEOUT_S = 60.0  # for a child to finish its transactions in flight and report

Committed = tuple[int, int, int, float, float]  # index, aggregate, sequence, t_start, t_commit


class _Reporter:
    """In a child, in place of the tracker: what to report next."""

    def __init__(self) -> None:
        self.committed_events: list[Committed] = []
        self.rolled_back_events: list[int] = []
        self.count = 0

    @property
    def committed_count(self) -> int:
        return self.count

    def committed(
        self, index: int, aggregate: int, sequence: int, t_start: float, t_commit: float
    ) -> None:
        self.committed_events.append((index, aggregate, sequence, t_start, t_commit))
        self.count += 1

    def rolled_back(self, index: int) -> None:
        self.rolled_back_events.append(index)

    def take(self) -> tuple[list[Committed], list[int]]:
        taken = self.committed_events, self.rolled_back_events
        self.committed_events, self.rolled_back_events = [], []
        return taken


@dataclasses.dataclass(frozen=True)
class _Job:
    """What a child writes."""

    settings: config.Settings
    workload: loadgen.Workload
    kind: str
    tx_rate: float
    writers: int
    notify_to: str | None


def _child(
    job: _Job,
    commands: multiprocessing.connection.Connection,
    reports: multiprocessing.connection.Connection,
) -> None:
    """A child process's body: write until told to stop, reporting as it goes."""
    logs.configure(job.settings.log, stream=sys.stderr, quiet=True)  # stdout is the bench's
    asyncio.run(_write(job, commands, reports))


async def _write(
    job: _Job,
    commands: multiprocessing.connection.Connection,
    reports: multiprocessing.connection.Connection,
) -> None:
    reporter = _Reporter()
    service_a = loadgen.Writers(
        job.settings,
        job.workload,
        reporter,
        kind=job.kind,
        tx_rate=job.tx_rate,
        notify_to=job.notify_to,
    )

    def report(kind: str, error: str | None = None) -> None:
        committed, rolled_back = reporter.take()
        figures = dataclasses.asdict(service_a.stats)
        figures["cpu_s"] = time.process_time()
        figures["next_index"] = job.workload.next_index
        reports.send((kind, committed, rolled_back, figures, list(service_a.errors), error))

    try:
        await service_a.start(job.writers)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        report("end", f"{type(exc).__name__}: {exc}")
        return
    report("started")
    stop = asyncio.create_task(asyncio.to_thread(commands.recv), name="writer-pool-stop")
    while not stop.done():
        await asyncio.wait([stop], timeout=REPORT_INTERVAL_S)
        report("report")
    with contextlib.suppress(EOFError, OSError):  # the parent went away: stop all the same
        stop.result()
    error = None
    try:
        await service_a.stop()
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        error = f"{type(exc).__name__}: {exc}"
    report("end", error)


class _Child:
    """The parent's side of one child: its process, pipes and latest figures."""

    def __init__(self, process: Any, commands: Any, reports: Any) -> None:
        self.process = process
        self.commands = commands
        self.reports = reports
        self.figures = loadgen.WriterStats()
        self.errors: list[str] = []
        self.next_index = 0
        self.cpu_s = 0.0
        self.started: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self.ended: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()


class WriterPool:
    """:class:`loadgen.Writers`' interface for ``relay bench``, over ``processes`` children."""

    def __init__(
        self,
        settings: config.Settings,
        workload: loadgen.Workload,
        tracker: stats.Tracker,
        *,
        processes: int,
        kind: str = "sql",
        tx_rate: float,
        notify_to: str | None = None,
    ) -> None:
        if processes < 1:
            raise ValueError(f"writer processes must be at least 1, not {processes}")
        self._settings = settings
        self._workload = workload
        self._tracker = tracker
        self._processes = processes
        self._tx_rate = tx_rate
        self._notify_to = notify_to
        self._children: list[_Child] = []
        self._threads: list[threading.Thread] = []
        self.kind = kind
        self.stats = loadgen.WriterStats()
        self.errors: list[str] = []

    @property
    def process_cpu_s(self) -> float:
        """CPU seconds the children used, as of their latest reports."""
        return sum(c.cpu_s for c in self._children)

    async def start(self, writers: int) -> None:
        """Start the children, ``writers`` connections in all; return once each writes."""
        loop = asyncio.get_running_loop()
        context = multiprocessing.get_context("spawn")  # no fork of a running event loop
        base = self._workload.next_index
        for k in range(self._processes):
            share = writers // self._processes + (1 if k < writers % self._processes else 0)
            job = _Job(
                settings=self._settings,
                workload=dataclasses.replace(self._workload, next_index=base + k * INDEX_STRIDE),
                kind=self.kind,
                tx_rate=self._tx_rate / self._processes,
                writers=max(1, share),
                notify_to=self._notify_to,
            )
            commands_out, commands_in = context.Pipe(duplex=False)
            reports_out, reports_in = context.Pipe(duplex=False)
            process = context.Process(
                target=_child,
                args=(job, commands_out, reports_in),
                name=f"service-a-{k}",
                daemon=True,
            )
            process.start()
            reports_in.close()
            commands_out.close()
            child = _Child(process, commands_in, reports_out)
            self._children.append(child)
            thread = threading.Thread(
                target=self._read,
                args=(child, loop.call_soon_threadsafe),
                name=f"service-a-{k}-reports",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        async with asyncio.timeout(START_TIMEOUT_S):
            problems = await asyncio.gather(*(c.started for c in self._children))
        failed = [p for p in problems if p is not None]
        if failed:
            await self.stop()
            raise RuntimeError(f"a writer process could not start: {failed[0]}")

    def _read(self, child: _Child, call_soon: Callable[..., object]) -> None:
        """In a thread: hand every report of ``child`` to the event loop, until its end."""
        while True:
            try:
                message = child.reports.recv()
            except EOFError:
                call_soon(self._apply, child, ("end", [], [], None, [], "the process died"))
                return
            call_soon(self._apply, child, message)
            if message[0] == "end":
                return

    def _apply(self, child: _Child, message: tuple[Any, ...]) -> None:
        kind, committed, rolled_back, figures, writer_errors, error = message
        for event in committed:
            self._tracker.committed(*event)
        for index in rolled_back:
            self._tracker.rolled_back(index)
        if figures is not None:
            child.cpu_s = figures.pop("cpu_s")
            child.next_index = figures.pop("next_index")
            child.figures = loadgen.WriterStats(**figures)
            child.errors = writer_errors
            self._sum()
        if kind == "started" and not child.started.done():
            child.started.set_result(None)
        if kind == "end":
            for future in (child.started, child.ended):
                if not future.done():
                    future.set_result(error)

    def _sum(self) -> None:
        total = loadgen.WriterStats()
        for field in dataclasses.fields(total):
            setattr(total, field.name, sum(getattr(c.figures, field.name) for c in self._children))
        self.stats = total
        self.errors = [e for c in self._children for e in c.errors]

    async def stop(self) -> None:
        """Stop; transactions in flight finish. Raises what a writer process died of."""
        for child in self._children:
            if not child.ended.done():
                with contextlib.suppress(OSError):
                    child.commands.send("stop")
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                problems = await asyncio.gather(*(c.ended for c in self._children))
        finally:
            for child in self._children:
                await asyncio.to_thread(child.process.join, STOP_TIMEOUT_S)
                if child.process.is_alive():
                    child.process.kill()
                child.commands.close()
            for thread in self._threads:
                await asyncio.to_thread(thread.join, STOP_TIMEOUT_S)
            for child in self._children:
                child.reports.close()
            self._workload.next_index = max(
                [self._workload.next_index, *(c.next_index for c in self._children)]
            )
        failed = [p for p in problems if p is not None]
        if failed:
            raise RuntimeError(f"a writer process failed: {failed[0]}")
