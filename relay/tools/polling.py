"""Waiting, shared by the tools and the tests: for a condition, for a cancelled task."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Callable
from typing import Any


async def wait_until(
    predicate: Callable[[], object],
    what: str,
    timeout_s: float = 30.0,
    interval_s: float = 0.05,
) -> None:
    """Poll ``predicate`` (plain or async) until it returns something truthy.

    Raises TimeoutError naming ``what`` after ``timeout_s``; an exception of the predicate
    propagates at once (use that to give up early, e.g. when a process died).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(interval_s)


async def cancel(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` (if any) and wait until it has ended; its cancellation is not raised."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
