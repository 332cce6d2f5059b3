"""``relay run`` as a child process (``python -m relay run``), for ``relay bench`` and the tests.

Settings go in through its environment (:func:`settings_env`); it is watched through its probe
port (readiness, ``/metrics``), its CPU time and resident memory (psutil) and its JSON log.
It stops gracefully (SIGTERM, the exit code returned) or by ``kill -9``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import psutil

from relay.tools import net, polling, stats

PUBLISHED_METRIC = "outbox_relay_published"
RSS_SAMPLE_S = 0.5
EXIT_POLL_S = 0.05


def settings_env(**settings: object) -> dict[str, str]:
    """``worker__count=2`` -> ``{"RELAY_WORKER__COUNT": "2"}``."""
    return {f"RELAY_{key.upper()}": str(value) for key, value in settings.items()}


class _HasPopen(Protocol):
    @property
    def popen(self) -> subprocess.Popen[bytes]: ...


class ChildProcess:
    """The pid and liveness of a child process, for a class with a ``popen`` attribute or
    property (a :class:`RelayProcess`, the tests' private Kafka broker)."""

    @property
    def pid(self: _HasPopen) -> int:
        return self.popen.pid

    @property
    def alive(self: _HasPopen) -> bool:
        return self.popen.poll() is None


class RelayProcess(ChildProcess):
    """One ``relay run`` with environment ``env`` serving its probes on ``http_port``; its
    output goes to ``log_path`` (appended) or nowhere."""

    def __init__(
        self,
        name: str,
        env: Mapping[str, str],
        http_port: int,
        log_path: Path | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.http_port = http_port
        self.log_path = log_path
        self._env = dict(env)
        self._cwd = cwd
        self._popen: subprocess.Popen[bytes] | None = None
        self._ps: psutil.Process | None = None
        self._sampler: asyncio.Task[None] | None = None
        self.started_at = math.nan
        self.rss_samples: list[tuple[float, int]] = []

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the process (returns at once; see :meth:`wait_ready`)."""
        with contextlib.ExitStack() as stack:
            out: Any = subprocess.DEVNULL
            if self.log_path is not None:
                out = stack.enter_context(self.log_path.open("ab"))
            self._popen = subprocess.Popen(
                [sys.executable, "-m", "relay", "run"],
                env=self._env,
                cwd=self._cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.started_at = time.monotonic()
        self._ps = psutil.Process(self._popen.pid)

    @property
    def popen(self) -> subprocess.Popen[bytes]:
        if self._popen is None:
            raise RuntimeError(f"{self.name} not started")
        return self._popen

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until ``/readyz`` answers 200; RuntimeError if the process exits meanwhile."""

        async def ready() -> bool:
            if not self.alive:
                raise RuntimeError(f"{self.name} exited at start-up ({self.popen.returncode})")
            with contextlib.suppress(OSError, TimeoutError, ValueError, IndexError):
                status, _ = await net.http_get(self.http_port, "/readyz", 2.0)
                return status == 200
            return False

        await polling.wait_until(ready, f"{self.name} to be ready", timeout_s, 0.1)

    async def wait_exit(self, timeout_s: float) -> int:
        """The exit code (``-9`` after SIGKILL); TimeoutError if it still runs."""
        try:
            await polling.wait_until(
                lambda: not self.alive, f"{self.name} to exit", timeout_s, EXIT_POLL_S
            )
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.tail()}") from None
        return int(self.popen.returncode)

    async def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait: the exit code (0 from a graceful shutdown)."""
        if self.alive:
            self.popen.send_signal(signal.SIGTERM)
        return await self.wait_exit(timeout_s)

    async def kill(self) -> int:
        """SIGKILL (``kill -9``) and reap."""
        if self.alive:
            self.popen.kill()
        return await self.wait_exit(10.0)

    async def stop(self, timeout_s: float = 30.0) -> int:
        """Stop sampling; SIGTERM, and SIGKILL if it has not exited after ``timeout_s``."""
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)
        if self._popen is None:
            return 0
        try:
            return await self.terminate(timeout_s)
        except TimeoutError:
            return await self.kill()

    # -- resources -----------------------------------------------------------------------------

    def start_sampling(self) -> None:
        """Sample the resident memory every half second (:attr:`rss_samples`)."""
        self._sampler = asyncio.create_task(self._sample(), name=f"{self.name}-rss")

    async def _sample(self) -> None:
        ps = self._process()
        started = time.monotonic()
        with contextlib.suppress(psutil.Error):
            while True:
                self.rss_samples.append((time.monotonic() - started, ps.memory_info().rss))
                await asyncio.sleep(RSS_SAMPLE_S)

    def _process(self) -> psutil.Process:
        if self._ps is None:
            raise RuntimeError(f"{self.name} not started")
        return self._ps

    def cpu_s(self) -> float:
        times = self._process().cpu_times()
        return float(times.user + times.system)

    def peak_rss_mb(self, since_s: float = 0.0) -> float:
        values = [rss for t, rss in self.rss_samples if t >= since_s]
        return max(values, default=0) / 2**20

    def uptime_s(self) -> float:
        return self.rss_samples[-1][0] if self.rss_samples else 0.0

    # -- metrics -------------------------------------------------------------------------------

    async def metrics(self) -> str:
        """``/metrics`` in Prometheus text format; RuntimeError unless it answers 200."""
        status, body = await net.http_get(self.http_port, "/metrics")
        if status != 200:
            raise RuntimeError(f"{self.name}: /metrics answered {status}")
        return body

    async def published(self) -> float | None:
        """Its published counter, or None while the endpoint does not answer."""
        try:
            value = stats.parse_counter(await self.metrics(), PUBLISHED_METRIC)
        except (OSError, TimeoutError, RuntimeError, IndexError, ValueError):
            return None
        return None if math.isnan(value) else value

    # -- log -----------------------------------------------------------------------------------

    def logs(self) -> list[dict[str, Any]]:
        """The JSON log lines (other lines, e.g. a traceback, come back as ``{"raw": ...}``)."""
        if self.log_path is None or not self.log_path.exists():
            return []
        entries: list[dict[str, Any]] = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                entry = {"raw": line}
            entries.append(entry if isinstance(entry, dict) else {"raw": line})
        return entries

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.logs() if e.get("event") == name]

    def summary(self, top: int = 8) -> str:
        """The most frequent log events with their last error (for failure messages)."""
        counts: Counter[str] = Counter()
        errors: dict[str, str] = {}
        for entry in self.logs():
            name = str(entry.get("event", entry.get("raw", "")))[:100]
            counts[name] += 1
            if "error" in entry:
                errors[name] = str(entry["error"])[:200]
        return f"{self.name} log: " + "; ".join(
            f"{n}x {name}" + (f" ({errors[name]})" if name in errors else "")
            for name, n in counts.most_common(top)
        )

    def tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return f"({self.name}: no log)"
        text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return f"---- last lines of {self.log_path} ----\n" + "\n".join(text)
