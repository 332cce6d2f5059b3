"""One way to wait for a condition, shared by the tools and the tests."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable


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
