"""Backoff bounds, sleep_unless and the Waker's one-at-a-time, never-lost wake-ups."""

from __future__ import annotations

import asyncio

import pytest

from relay import pacing

LONG_S = 30.0  # a wait that must end by notification, not by its timeout
SHORT_S = 0.01  # a wait that is expected to time out


def test_backoff_doubles_within_jitter_bounds_and_caps() -> None:
    backoff = pacing.Backoff(0.1, 2.0)
    ceilings = [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0]
    for ceiling in ceilings:
        delay = backoff.next_delay_s()
        assert ceiling / 2 <= delay <= ceiling


def test_backoff_never_exceeds_maximum_after_many_attempts() -> None:
    backoff = pacing.Backoff(0.5, 5.0)
    delays = [backoff.next_delay_s() for _ in range(200)]
    assert all(2.5 <= d <= 5.0 for d in delays[10:])
    assert max(delays) <= 5.0


def test_backoff_reset_starts_over() -> None:
    backoff = pacing.Backoff(1.0, 60.0)
    for _ in range(6):
        backoff.next_delay_s()
    backoff.reset()
    assert 0.5 <= backoff.next_delay_s() <= 1.0


async def test_sleep_unless_returns_true_when_stopped() -> None:
    stop = asyncio.Event()
    sleeper = asyncio.create_task(pacing.sleep_unless(stop, LONG_S))
    await asyncio.sleep(0)
    stop.set()
    async with asyncio.timeout(5):
        assert await sleeper is True


async def test_sleep_unless_returns_false_after_delay() -> None:
    assert await pacing.sleep_unless(asyncio.Event(), SHORT_S) is False


async def test_sleep_unless_already_stopped() -> None:
    stop = asyncio.Event()
    stop.set()
    assert await pacing.sleep_unless(stop, LONG_S) is True


async def test_wait_times_out_without_notification() -> None:
    waker = pacing.Waker()
    assert await waker.wait(SHORT_S) is False
    assert not waker._waiters  # the timed-out waiter is not left behind


async def test_notify_without_waiter_is_kept_for_the_next_wait() -> None:
    waker = pacing.Waker()
    waker.notify()
    async with asyncio.timeout(5):
        assert await waker.wait(LONG_S) is True
    # consumed: the next wait has nothing pending
    assert await waker.wait(SHORT_S) is False


async def test_many_notifies_without_waiter_keep_one_wakeup() -> None:
    waker = pacing.Waker()
    waker.notify()
    waker.notify()
    assert await waker.wait(LONG_S) is True
    assert await waker.wait(SHORT_S) is False


async def _waiting(waker: pacing.Waker, count: int) -> list[asyncio.Task[bool]]:
    tasks = [asyncio.create_task(waker.wait(LONG_S)) for _ in range(count)]
    for _ in range(1000):  # let every task park itself in wait()
        if len(waker._waiters) == count:
            break
        await asyncio.sleep(0)
    assert len(waker._waiters) == count
    return tasks


async def test_notify_wakes_exactly_one_waiter() -> None:
    waker = pacing.Waker()
    tasks = await _waiting(waker, 3)
    try:
        waker.notify()
        async with asyncio.timeout(5):
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for _ in range(5):
            await asyncio.sleep(0)
        assert [t.done() for t in tasks].count(True) == 1
        assert done.pop().result() is True
        assert not waker._pending  # the wake-up went to a waiter, none kept
        waker.notify()
        async with asyncio.timeout(5):
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for _ in range(5):
            await asyncio.sleep(0)
        assert [t.done() for t in tasks].count(True) == 2
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_notify_all_wakes_everyone_and_the_next_wait() -> None:
    waker = pacing.Waker()
    tasks = await _waiting(waker, 4)
    waker.notify_all()
    async with asyncio.timeout(5):
        assert await asyncio.gather(*tasks) == [True] * 4
    # a stop broadcast also reaches a worker that was not waiting at that moment
    assert await waker.wait(LONG_S) is True


async def test_notify_skips_a_cancelled_waiter() -> None:
    waker = pacing.Waker()
    first, second = await _waiting(waker, 2)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    waker.notify()
    async with asyncio.timeout(5):
        assert await second is True


async def test_only_one_waiter_polls_the_others_wait_for_a_wake_up() -> None:
    waker = pacing.Waker()
    first = asyncio.create_task(waker.wait(0.01))
    second = asyncio.create_task(waker.wait(0.01))
    async with asyncio.timeout(5):
        assert await first is False  # the poller timed out
    assert not second.done()  # the other one waits for a notification only
    waker.notify()
    async with asyncio.timeout(5):
        assert await second is True


async def test_a_resting_worker_leaves_the_poller_role_to_the_next_waiter() -> None:
    waker = pacing.Waker()
    resting = asyncio.create_task(waker.rest(LONG_S))
    for _ in range(1000):
        if waker._waiters:
            break
        await asyncio.sleep(0)
    # the next idle worker still polls: it times out instead of waiting for a notification
    async with asyncio.timeout(5):
        assert await waker.wait(0.01) is False
    assert not resting.done()
    waker.notify()  # a busy worker's full claim calls the resting one back
    async with asyncio.timeout(5):
        assert await resting is True
    async with asyncio.timeout(5):
        assert await waker.rest(0.01) is False  # else it looks again after its timeout


async def test_others_busy_counts_enlisted_workers_that_are_not_waiting() -> None:
    waker = pacing.Waker()
    waker.enlist()
    assert not waker.others_busy()  # alone
    waker.enlist()
    assert waker.others_busy()  # the other one is cycling
    (other,) = await _waiting(waker, 1)
    assert not waker.others_busy()  # the other one waits: nobody else takes new rows
    waker.notify()
    async with asyncio.timeout(5):
        await other
    waker.dismiss()
    assert not waker.others_busy()


def test_idle_ticks_stay_short_for_about_a_poll_interval_after_activity_then_double() -> None:
    ticks = pacing.IdleTicks(0.01, 0.04)
    assert [ticks.next_s() for _ in range(3)] == [0.04] * 3  # never active: the long tick
    ticks.active()
    assert [ticks.next_s() for _ in range(7)] == [0.01] * 4 + [0.02, 0.04, 0.04]
    ticks.active()  # activity in the middle of the short ticks starts them over
    assert [ticks.next_s() for _ in range(2)] == [0.01, 0.01]
    ticks.active()
    assert [ticks.next_s() for _ in range(5)] == [0.01] * 4 + [0.02]


def test_idle_ticks_with_a_minimum_above_the_maximum_use_the_maximum() -> None:
    ticks = pacing.IdleTicks(0.5, 0.1)
    ticks.active()
    assert [ticks.next_s() for _ in range(3)] == [0.1] * 3
