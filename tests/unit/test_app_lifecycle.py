"""The daemon's lifecycle through fakes (no servers): supervision exit codes, the shutdown
deadline, the start-up check, readiness after failed cycles."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from unit import fakes

from relay import app, config, errors


def _settings(**worker: Any) -> config.Settings:
    base = {"backoff_initial_s": 0.001, "backoff_max_s": 0.002, "poll_interval_s": 0.01}
    return config.Settings(
        worker=config.WorkerSettings(**{**base, **worker}),
        outbox=config.OutboxSettings(topic_template="t"),
        cleaner=config.CleanerSettings(enabled=False),
        http=config.HttpSettings(enabled=False),
        backlog=config.BacklogSettings(sample_interval_s=0.01),
    )


async def _ok() -> None:
    return None


def _app(
    store: fakes.FakeStore,
    settings: config.Settings | None = None,
    verify: Callable[[], Awaitable[None]] = _ok,
    *,
    hang: bool = False,
) -> tuple[app.App, list[fakes.FakeProducer]]:
    made: list[fakes.FakeProducer] = []

    def factory() -> fakes.FakeProducer:
        made.append(fakes.FakeProducer({"t"}, {}))
        made[-1].hang = hang
        return made[-1]

    deps = app.Dependencies(
        producer_factory=factory, store=store, connect=store.aconnect, verify=verify
    )
    return app.App(settings or _settings(), deps), made


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110 - polling the daemon's state, bounded
            await asyncio.sleep(0.001)


async def test_runs_publishes_and_stops_with_exit_0() -> None:
    store = fakes.FakeStore()
    rows = [store.insert(agg) for agg in ("a", "b", "a")]
    relay, made = _app(store)
    task = asyncio.create_task(relay.run())
    await _until(lambda: set(store.statuses().values()) == {"published"})
    relay.request_stop()
    async with asyncio.timeout(5):
        assert await task == 0
    assert [orjson.loads(v)["message_id"] for v in made[0].sent] == [r.message_id for r in rows]
    assert made[0].stopped  # flushed and closed at shutdown


async def test_a_bug_in_a_worker_exits_1() -> None:
    store = fakes.FakeStore()
    store.insert("a")
    store.fail["claim_rows"] = ZeroDivisionError("a bug of ours")
    relay, made = _app(store)
    async with asyncio.timeout(5):
        assert await relay.run() == errors.ExitCode.BUG
    assert made[0].stopped


async def test_missing_schema_at_start_up_exits_4_before_any_work() -> None:
    store = fakes.FakeStore()
    store.insert("a")

    async def missing() -> None:
        raise errors.MissingError("table 'outbox' missing: run `relay migrate`")

    relay, made = _app(store, verify=missing)
    async with asyncio.timeout(5):
        assert await relay.run() == errors.ExitCode.MISSING
    assert made == []  # never connected to Kafka
    assert store.status(1) == "new"


async def test_shutdown_deadline_cancels_a_stuck_publish_and_rolls_back() -> None:
    store = fakes.FakeStore()
    row = store.insert("a")
    settings = _settings(shutdown_timeout_s=0.2, publish_timeout_s=60.0)
    relay, made = _app(store, settings, hang=True)  # a broker that stopped answering
    task = asyncio.create_task(relay.run())
    await _until(lambda: bool(made) and bool(made[0].sent))
    relay.request_stop()
    async with asyncio.timeout(5):
        assert await task == 0
    assert store.status(row.id) == "new"  # cancelled before the mark: rolled back
    assert store.locks == {}


async def test_not_ready_after_consecutive_failed_cycles() -> None:
    store = fakes.FakeStore()
    store.insert("a")
    store.fail["claim_shards"] = ConnectionResetError("database went away")
    relay, _ = _app(store, _settings(unready_after_failed_cycles=3))
    task = asyncio.create_task(relay.run())
    try:
        await _until(lambda: all(not w.ready for w in relay.workers))
        problems = await relay.readiness()
        assert problems == {"workers": "cycles_failing"}  # a reason code; details in the logs
        assert "database went away" in relay.workers[0].last_failure
        assert not task.done()  # a passing failure never stops the daemon
    finally:
        relay.request_stop()
        async with asyncio.timeout(5):
            await task
