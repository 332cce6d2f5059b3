"""Small pacing helpers shared by the loops: backoff, a periodic loop and a wake-up signal."""

from __future__ import annotations

import asyncio
import collections
import random
import time
from collections.abc import Awaitable, Callable

import structlog

from relay import errors, metrics

log = structlog.get_logger(__name__)


class Backoff:
    """Exponential backoff with full jitter, reset after a success."""

    def __init__(self, initial_s: float, maximum_s: float) -> None:
        self._initial_s = initial_s
        self._maximum_s = maximum_s
        self._attempt = 0

    def reset(self) -> None:
        self._attempt = 0

    def next_delay_s(self) -> float:
        ceiling = min(self._maximum_s, self._initial_s * (2**self._attempt))
        self._attempt = min(self._attempt + 1, 32)
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not cryptography


async def sleep_unless(stop: asyncio.Event, delay_s: float) -> bool:
    """Sleep for ``delay_s`` or until ``stop`` is set. Returns True if stopped."""
    try:
        await asyncio.wait_for(stop.wait(), delay_s)
    except TimeoutError:
        return False
    return True


async def periodic(
    name: str, stop: asyncio.Event, interval_s: float, step: Callable[[], Awaitable[object]]
) -> None:
    """Run ``step`` every ``interval_s`` (start to start) until ``stop`` is set.

    A transient or operational failure is counted (``loop_errors{loop=name}``), logged and
    retried at the next tick; a bug propagates, so that the supervisor stops the daemon.
    """
    while not stop.is_set():
        started = time.monotonic()
        try:
            await step()
        except Exception as exc:
            kind = errors.classify(exc)
            if kind is errors.Kind.BUG:
                raise
            metrics.loop_errors.labels(name).inc()
            log.warning("loop_step_failed", loop=name, kind=kind.value, error=errors.one_line(exc))
        await sleep_unless(stop, max(0.0, interval_s - (time.monotonic() - started)))


class IdleTicks:
    """The poll ticks of an idle worker: right after activity, short ticks (``min_s``) for
    about ``max_s`` (rows often come in bursts, or at a low steady rate), then doubling up to
    ``max_s`` over the empty looks that follow (an idle relay costs little)."""

    def __init__(self, min_s: float, max_s: float) -> None:
        self._min_s = min(min_s, max_s)
        self._max_s = max_s
        self._short = max(1, round(max_s / self._min_s))  # short ticks after activity
        self._looks = self._short
        self._tick_s = max_s

    def active(self) -> None:
        """Rows were claimed: the next ticks are short again."""
        self._looks = 0
        self._tick_s = self._min_s

    def next_s(self) -> float:
        """The next tick; each call counts one empty look."""
        tick_s = self._tick_s
        self._looks += 1
        if self._looks >= self._short:
            self._tick_s = min(self._tick_s * 2, self._max_s)
        return tick_s


class Waker:
    """Wakes one waiting worker at a time; a wake-up with nobody waiting is kept for the next.

    Only one waiter at a time (the poller) waits with a timeout; the others wait for a
    notification, so an idle process polls the database once per interval, not once per worker.
    Workers enlist while they run, so that one can tell whether another is busy (enlisted and
    not waiting) and stand down (:meth:`rest`) instead of claiming the same trickle.
    """

    def __init__(self) -> None:
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        # Wake-ups come with every commit (the binary log is followed): a worker that took all
        # the work waits for the next one instead of looking again, and idle ticks are long.
        self.pushing = False
        self._pending = False
        self._polling = False
        self._crew = 0

    def enlist(self) -> None:
        self._crew += 1

    def dismiss(self) -> None:
        self._crew -= 1

    def others_busy(self) -> bool:
        """Whether, besides the caller (enlisted, not waiting), another worker is busy."""
        return self._crew - len(self._waiters) > 1

    def notify(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._pending = True

    def notify_all(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
        self._pending = True

    async def wait(self, timeout_s: float) -> bool:
        """Wait for a notification, or ``timeout_s`` if no other waiter is the poller.

        Returns True if notified.
        """
        poller = not self._polling
        return await self._wait(timeout_s if poller else None, poller=poller)

    async def rest(self, timeout_s: float) -> bool:
        """Wait for a notification or ``timeout_s`` without taking the poller's role: a worker
        that stood down while another one is busy. Returns True if notified."""
        return await self._wait(timeout_s, poller=False)

    async def _wait(self, timeout_s: float | None, *, poller: bool) -> bool:
        if self._pending:
            self._pending = False
            return True
        self._polling = self._polling or poller
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout_s)
        except TimeoutError:
            return False
        finally:
            if poller:
                self._polling = False
            if waiter in self._waiters:
                self._waiters.remove(waiter)
        return True


class Nudges:
    """Wake one worker per nudge, at most once per ``min_interval_s``: a burst or a flood is
    coalesced into one wake-up at the end of the interval (writers' datagrams, binlog commits)."""

    def __init__(self, waker: Waker, min_interval_s: float) -> None:
        self._waker = waker
        self._min_interval_s = min_interval_s
        self._last = float("-inf")
        self._timer: asyncio.TimerHandle | None = None

    def nudge(self) -> None:
        if self._timer is not None:
            return  # a wake-up is already due at the end of the interval
        loop = asyncio.get_running_loop()
        wait_s = self._last + self._min_interval_s - loop.time()
        if wait_s <= 0:
            self._fire()
        else:
            self._timer = loop.call_later(wait_s, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._last = asyncio.get_running_loop().time()
        self._waker.notify()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
