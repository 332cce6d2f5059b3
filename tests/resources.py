"""Resources of relay processes over a long run, sampled, and the check that they stay flat.

A :class:`Sampler` reads, every ``every_s`` seconds: per live relay process its open file
descriptors (``/proc/<pid>/fd``) and resident memory (``VmRSS``), and the number of server
sessions of the relays' database user (``information_schema.PROCESSLIST``). Each sample says
whether the run was *quiet* then (no fault, nor its recovery, under way): leaks are judged on
quiet samples, so that a fault's passing peak (a reconnection, a backlog) is not taken for one.

:func:`growth` compares the last third of a series with its first third (by time): a resource
that leaks keeps rising, so the last third's maximum ends up above the first third's by more
than any margin; one that is flat stays within a margin of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pymysql

from relay import config, db
from relay.tools import polling, processes

SAMPLE_EVERY_S = 3.0
SESSIONS = "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = %s"
QUERY_TIMEOUT_S = 2.0


@dataclasses.dataclass(frozen=True)
class ProcessSample:
    at_s: float  # since the sampler started
    relay: str
    pid: int
    fds: int
    rss_mb: float
    quiet: bool


@dataclasses.dataclass(frozen=True)
class SessionSample:
    at_s: float
    sessions: int
    quiet: bool


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_mb(pid: int) -> float:
    """``VmRSS`` of a live process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise LookupError(f"no VmRSS in /proc/{pid}/status")


class Sampler:
    """``async with Sampler(relays, settings, user, quiet):`` samples until the block ends.
    ``relays()`` gives the processes of the moment (a killed one may have been replaced);
    ``settings`` reach the server as someone other than ``user``, the relays' user."""

    def __init__(
        self,
        relays: Callable[[], Sequence[processes.RelayProcess]],
        settings: config.Settings,
        user: str,
        quiet: Callable[[], bool],
        every_s: float = SAMPLE_EVERY_S,
    ) -> None:
        self._relays = relays
        self._settings = settings
        self._user = user
        self._quiet = quiet
        self._every_s = every_s
        self._task: asyncio.Task[None] | None = None
        self._started = time.monotonic()
        self.processes: list[ProcessSample] = []
        self.sessions: list[SessionSample] = []
        self.missed_sessions = 0  # the server did not answer (down on purpose)

    async def __aenter__(self) -> Sampler:
        self._started = time.monotonic()
        self._task = asyncio.create_task(self._run(), name="resource-sampler")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await polling.cancel(self._task)

    async def _run(self) -> None:
        while True:
            await self.sample()
            await asyncio.sleep(self._every_s)  # the sampling period

    async def sample(self) -> None:
        quiet = self._quiet()
        at = time.monotonic() - self._started
        for relay in self._relays():
            with contextlib.suppress(OSError, LookupError):  # it died between the look and now
                if relay.alive:
                    self.processes.append(
                        ProcessSample(
                            at, relay.name, relay.pid, open_fds(relay.pid), rss_mb(relay.pid), quiet
                        )
                    )
        try:
            async with asyncio.timeout(QUERY_TIMEOUT_S):
                count = await self._count_sessions()
        except (pymysql.MySQLError, OSError, TimeoutError):
            self.missed_sessions += 1
            return
        self.sessions.append(SessionSample(at, count, quiet and self._quiet()))

    async def _count_sessions(self) -> int:
        conn = await db.connect(self._settings)
        try:
            async with conn.cursor() as cur:
                await cur.execute(SESSIONS, (self._user,))
                (count,) = await cur.fetchone()
                return int(count)
        finally:
            db.close(conn)

    def by_relay(self) -> dict[str, list[ProcessSample]]:
        out: dict[str, list[ProcessSample]] = {}
        for sample in self.processes:
            out.setdefault(sample.relay, []).append(sample)
        return out


@dataclasses.dataclass(frozen=True)
class Growth:
    """A series' first third and last third (by time) maxima, and the peak of it all."""

    what: str
    first_max: float
    last_max: float
    peak: float
    samples: int

    def within(self, absolute: float, relative: float = 0.0) -> bool:
        """Flat: the last third's maximum is at most the first third's plus the margin."""
        return self.last_max <= self.first_max * (1 + relative) + absolute

    def describe(self) -> str:
        return (
            f"{self.what}: first third max {self.first_max:g}, last third max {self.last_max:g},"
            f" peak {self.peak:g} ({self.samples} samples)"
        )

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def growth(what: str, series: Sequence[tuple[float, float]]) -> Growth:
    """``series``: (seconds, value) in time order, at least one sample in each third."""
    if not series:
        raise ValueError(f"{what}: no samples")
    start, end = series[0][0], series[-1][0]
    third = (end - start) / 3
    first = [v for t, v in series if t <= start + third]
    last = [v for t, v in series if t >= end - third]
    return Growth(what, max(first), max(last), max(v for _, v in series), len(series))
