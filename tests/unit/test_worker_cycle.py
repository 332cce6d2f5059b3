"""The worker cycle through in-memory fakes of the store and the publisher (no servers):
ordering, holds, byte budget, failures sorted, cancellation during mark-and-commit."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiokafka.errors
import pymysql.err
import pytest
from unit import fakes

from relay import config, pacing, publisher, worker

S = publisher.Status


def _settings(**worker_settings: Any) -> config.Settings:
    base = {"backoff_initial_s": 0.001, "backoff_max_s": 0.002, "poll_interval_s": 0.01}
    return config.Settings(
        worker=config.WorkerSettings(**{**base, **worker_settings}),
        outbox=config.OutboxSettings(topic_template="events.{aggregate_type}"),
    )


def _worker(
    store: fakes.FakeStore, pub: fakes.FakePublisher, settings: config.Settings | None = None
) -> worker.Worker:
    return worker.Worker(
        "w",
        settings or _settings(),
        pub,
        asyncio.Event(),
        pacing.Waker(),
        store_=store,
        connect=store.aconnect,
    )


def _delivered(pub: fakes.FakePublisher) -> list[int]:
    return [r.row_id for r in pub.log]


async def test_cycle_publishes_in_id_order_and_commits() -> None:
    store, pub = fakes.FakeStore(), fakes.FakePublisher()
    rows = [store.insert(agg) for agg in ("a", "b", "a", "c", "b")]
    claimed = await _worker(store, pub).cycle()
    assert claimed == 5
    assert _delivered(pub) == [r.id for r in rows]
    assert set(store.statuses().values()) == {"published"}
    assert store.locks == {}  # the commit released the shards


async def test_mark_and_commit_share_a_round_trip_only_when_nothing_else_is_recorded() -> None:
    store, pub = fakes.FakeStore(), fakes.FakePublisher()
    w = _worker(store, pub)
    store.insert("a")
    await w.cycle()
    assert (store.commits, store.combined_commits) == (1, 1)  # all published: one round trip
    poison = store.insert("b", after_state="{not json")
    store.insert("c")
    await w.cycle()
    # a failed row and a new hold are recorded too: the COMMIT is a statement of its own
    assert (store.commits, store.combined_commits) == (2, 1)
    assert store.status(poison.id) == "failed"


async def test_full_claims_rotate_so_no_shard_waits_behind_busy_ones() -> None:
    store, pub = fakes.FakeStore(), fakes.FakePublisher()
    aggregates = {fakes.shard_of(f"k{i}"): f"k{i}" for i in range(400)}
    shards = sorted(aggregates)[:6]
    w = _worker(store, pub, _settings(shards_per_claim=2))
    taken: list[list[int]] = []
    for _ in range(4):
        for shard in shards:  # every shard always has new rows: a sustained overload
            store.insert(aggregates[shard])
        sent = len(pub.log)
        await w.cycle()
        taken.append(sorted({store.rows[r.row_id].row.shard for r in pub.log[sent:]}))
    # shards in turn, wrapping around; without the rotation the first two would always win
    assert taken == [shards[0:2], shards[2:4], shards[4:6], shards[0:2]]


async def test_timeout_of_one_record_leaves_its_later_records_new() -> None:
    store, pub = fakes.FakeStore(), fakes.FakePublisher()
    a1, b1, a2, a3 = (store.insert(agg) for agg in ("a", "b", "a", "a"))
    pub.script[a2.id] = publisher.Result(S.RETRY, "kafka", "KafkaTimeoutError")
    w = _worker(store, pub)
    with pytest.raises(worker.CycleFailedError, match="left new"):
        await w.cycle()
    assert store.statuses() == {
        a1.id: "published",
        b1.id: "published",
        a2.id: "new",
        a3.id: "new",
    }
    assert store.rows[a2.id].attempts == 1  # the attempt is noted
    assert store.rows[a3.id].attempts == 0  # not sent: nothing counted
    # the next cycle sends the aggregate's rows again, in order
    await w.cycle()
    assert _delivered(pub) == [a1.id, b1.id, a2.id, a3.id]
    assert set(store.statuses().values()) == {"published"}


async def test_poison_row_holds_its_aggregate_not_its_shard_neighbours() -> None:
    store, pub = fakes.FakeStore(), fakes.FakePublisher()
    # an aggregate in the same shard as "a"
    neighbour = next(f"n{i}" for i in range(1000) if fakes.shard_of(f"n{i}") == fakes.shard_of("a"))
    a1 = store.insert("a")
    bad = store.insert("a", after_state='{"a":"\\q","b":1.}')  # JSON_VALID says yes; not JSON
    a3 = store.insert("a")
    n1 = store.insert(neighbour)
    w = _worker(store, pub)
    await w.cycle()
    assert store.status(bad.id) == "failed"
    assert str(store.rows[bad.id].last_error).startswith("bad_json: ")
    assert store.status(a3.id) == "held"
    assert _delivered(pub) == [a1.id, n1.id]
    assert store.hold_rows[("order", "a")]["kind"] == "poison"
    # rows written later for the held aggregate are set aside too; the neighbour flows
    a4 = store.insert("a")
    n2 = store.insert(neighbour)
    await w.cycle()
    assert store.status(a4.id) == "held"
    assert _delivered(pub) == [a1.id, n1.id, n2.id]
    # the operator fixes the row and replays it: the aggregate is delivered in order
    fixed = store.rows[bad.id].row._replace(after_state='{"fixed": true}')
    store.rows[bad.id].row = fixed
    store.replay(bad.id)
    await w.cycle()
    assert _delivered(pub) == [a1.id, n1.id, n2.id, bad.id, a3.id, a4.id]
    assert store.hold_rows == {}


async def test_skip_policy_leaves_a_gap_and_no_hold() -> None:
    store, pub = fakes.FakeStore(), fakes.FakePublisher()
    bad = store.insert("a", headers='{"message_id": "mine"}')  # a reserved header name
    a2 = store.insert("a")
    settings = _settings().model_copy(
        update={"outbox": config.OutboxSettings(topic_template="t", on_poison="skip")}
    )
    await _worker(store, pub, settings).cycle()
    assert store.statuses() == {bad.id: "failed", a2.id: "published"}
    assert store.hold_rows == {}


async def test_missing_topic_is_a_timed_hold_retried_until_it_works() -> None:
    store, pub = fakes.FakeStore(), fakes.FakePublisher()
    x1, y1, x2 = (store.insert(agg) for agg in ("x", "y", "x"))
    pub.always[x1.id] = publisher.Result(S.HOLD, "unknown_topic", "topic missing")
    w = _worker(store, pub, _settings(hold_retry_initial_s=10.0, hold_retry_max_s=40.0))
    await w.cycle()
    assert store.statuses() == {x1.id: "held", y1.id: "published", x2.id: "held"}
    hold = store.hold_rows[("order", "x")]
    assert (hold["kind"], hold["retry_at"], hold["failed_id"]) == ("timed", 10.0, None)
    # not due yet: nothing to claim for x
    assert await w.cycle() == 0
    # due: the rows go back to new, fail again, the hold is renewed with a longer delay
    store.now = 10.0
    await w.cycle()
    assert store.hold_rows[("order", "x")]["retry_at"] == 10.0 + 20.0
    assert store.statuses()[x1.id] == "held"
    # the operator creates the topic; at the next retry the rows flow and the hold is gone
    del pub.always[x1.id]
    store.now = 30.0
    await w.cycle()
    assert _delivered(pub) == [y1.id, x1.id, x2.id]
    assert store.hold_rows == {}
    assert not any(r.status == "failed" for r in store.rows.values())


async def test_byte_budget_bounds_the_claim_but_the_oldest_row_always_fits() -> None:
    store, pub = fakes.FakeStore(), fakes.FakePublisher()
    big = '{"blob": "%s"}' % ("x" * 5000)
    rows = [store.insert(f"a{i}", after_state=big) for i in range(5)]
    w = _worker(store, pub, _settings(batch_max_bytes=12000))
    assert await w.cycle() == 2
    w = _worker(store, pub, _settings(batch_max_bytes=1024))
    assert await w.cycle() == 1  # larger than the budget, alone
    assert _delivered(pub) == [r.id for r in rows[:3]]


async def test_dead_letter_failure_never_rolls_back_acknowledged_rows() -> None:
    store, pub = fakes.FakeStore(), fakes.FakePublisher()
    good = store.insert("g")
    bad = store.insert("b")
    pub.script[bad.id] = publisher.Result(S.POISON, "too_large", "MessageSizeTooLargeError")
    pub.dead_letter_problem = "dead-letter topic 'dlq' does not exist"
    await _worker(store, pub).cycle()
    assert store.statuses() == {good.id: "published", bad.id: "failed"}
    assert "dead-letter topic 'dlq' does not exist" in str(store.rows[bad.id].last_error)
    assert len(pub.calls) == 1  # nothing published twice


async def test_kafka_unreachable_rolls_back_everything() -> None:
    store, pub = fakes.FakeStore(), fakes.FakePublisher()
    row = store.insert("a")
    pub.raise_on_publish = aiokafka.errors.KafkaConnectionError("down")
    with pytest.raises(worker.CycleFailedError) as raised:
        await _worker(store, pub).cycle()
    assert raised.value.reason == "kafka"
    assert store.status(row.id) == "new"
    assert store.locks == {}


@contextlib.asynccontextmanager
async def _running(w: worker.Worker, stop: asyncio.Event) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(w.run())
    try:
        yield task
    finally:
        stop.set()
        async with asyncio.timeout(5):
            await asyncio.gather(task, return_exceptions=True)


async def _until(condition: Any, what: str) -> None:
    """Poll ``condition`` (a yield to the worker between looks), failing after 5 s."""
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110 - polling the worker's state, bounded
            await asyncio.sleep(0.001)
    assert condition(), what


async def test_mark_step_denied_backs_off_and_turns_not_ready() -> None:
    store, pub = fakes.FakeStore(), fakes.FakePublisher()
    store.insert("a")
    denied = pymysql.err.OperationalError(1142, "UPDATE command denied to user 'relay'")
    store.fail["mark_published"] = denied
    stop = asyncio.Event()
    settings = _settings(unready_after_failed_cycles=3)
    w = worker.Worker(
        "w", settings, pub, stop, pacing.Waker(), store_=store, connect=store.aconnect
    )
    async with _running(w, stop) as task:
        await _until(lambda: not w.ready, "not ready after 3 failed cycles")
        assert not task.done()  # an operational failure never stops the worker
    assert w.last_failure.startswith(("mark: ", "operational: "))
    assert store.status(1) == "new"
    assert len(pub.calls) == 1  # published once: later cycles probed the mark step first
    del store.fail["mark_published"]
    await w.cycle()
    assert store.status(1) == "published"


async def test_a_bug_propagates_out_of_the_worker() -> None:
    store, pub = fakes.FakeStore(), fakes.FakePublisher()
    store.insert("a")
    store.fail["claim_rows"] = KeyError("a bug of ours")
    stop = asyncio.Event()
    w = worker.Worker(
        "w", _settings(), pub, stop, pacing.Waker(), store_=store, connect=store.aconnect
    )
    with pytest.raises(KeyError):
        async with asyncio.timeout(5):
            await w.run()
    assert store.locks == {}  # rolled back


async def test_cancellation_during_mark_and_commit_lets_the_commit_land() -> None:
    store, pub = fakes.FakeStore(), fakes.FakePublisher()
    rows = [store.insert(agg) for agg in ("a", "b")]
    store.commit_gate = asyncio.Event()
    w = _worker(store, pub)
    cycle = asyncio.create_task(w.cycle())
    async with asyncio.timeout(5):
        await store.commit_waiting.wait()  # published, and now committing
    assert len(pub.log) == 2
    cycle.cancel()
    done, _ = await asyncio.wait([cycle], timeout=0.05)
    assert not done  # the shielded commit is awaited, not abandoned
    store.commit_gate.set()
    with pytest.raises(asyncio.CancelledError):
        await cycle
    assert store.statuses() == {r.id: "published" for r in rows}
    assert store.commits == 1


async def test_cancellation_during_publish_rolls_back() -> None:
    store, pub = fakes.FakeStore(), fakes.FakePublisher()
    row = store.insert("a")
    pub.gate = asyncio.Event()
    cycle = asyncio.create_task(_worker(store, pub).cycle())
    await _until(lambda: pub.calls, "publish called")
    cycle.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cycle
    assert store.status(row.id) == "new"
    assert store.locks == {}


class RecordingWaker(pacing.Waker):
    """Records each idle wait's timeout and returns at once (as if the tick had passed)."""

    def __init__(self, stop: asyncio.Event, looks: int) -> None:
        super().__init__()
        self.timeouts: list[float] = []
        self._stop = stop
        self._looks = looks

    async def wait(self, timeout_s: float) -> bool:
        self.timeouts.append(timeout_s)
        if len(self.timeouts) >= self._looks:
            self._stop.set()
        await asyncio.sleep(0)
        return False


async def test_idle_ticks_stay_short_after_activity_then_double_to_the_poll_interval() -> None:
    store, pub = fakes.FakeStore(), fakes.FakePublisher()
    store.insert("a")
    stop = asyncio.Event()
    waker = RecordingWaker(stop, looks=8)
    settings = _settings(poll_min_interval_s=0.025, poll_interval_s=0.1, claim_linger_s=0.0)
    w = worker.Worker("w", settings, pub, stop, waker, store_=store, connect=store.aconnect)
    async with asyncio.timeout(5):
        await w.run()
    assert waker.timeouts == [0.025] * 4 + [0.05, 0.1, 0.1, 0.1]
    assert store.status(1) == "published"
    # each tick but the last (stopped) was one cheap look, and none found work: the cycle after
    # the claim was the only full look
    assert (store.looks, store.claims) == (7, 2)


async def test_an_idle_look_that_finds_a_new_row_runs_a_cycle() -> None:
    store, pub = fakes.FakeStore(), fakes.FakePublisher()
    stop = asyncio.Event()
    settings = _settings(poll_min_interval_s=0.001, poll_interval_s=0.002, claim_linger_s=0.0)
    w = worker.Worker(
        "w", settings, pub, stop, pacing.Waker(), store_=store, connect=store.aconnect
    )
    running = asyncio.create_task(w.run())
    await _until(lambda: store.looks >= 3, "idle looks")
    assert store.claims == 1  # looks that found nothing ran no cycle
    row = store.insert("a")
    await _until(lambda: store.status(row.id) == "published", "the row published")
    stop.set()
    await running
    assert store.claims >= 2


async def test_a_worker_stands_down_while_another_is_busy_and_comes_back_when_called() -> None:
    store, pub = fakes.FakeStore(), fakes.FakePublisher()
    stop, waker = asyncio.Event(), pacing.Waker()
    settings = _settings(poll_interval_s=60.0, claim_linger_s=0.0)
    waker.enlist()  # another worker of the process, busy cycling (never waiting)
    w = worker.Worker("w", settings, pub, stop, waker, store_=store, connect=store.aconnect)
    first = store.insert("a")
    running = asyncio.create_task(w.run())
    try:
        await _until(lambda: store.status(first.id) == "published", "the first row published")
        await _until(lambda: len(waker._waiters) == 1, "the worker resting")
        # its claim took every shard with work and the other worker is busy: it stands down
        # (for up to a minute here) instead of claiming again after the linger, and leaves the
        # poller's role free
        assert (store.claims, waker._polling) == (1, False)
        claims = store.claims
        second = store.insert("b")
        for _ in range(100):
            await asyncio.sleep(0)
        assert (store.claims, store.status(second.id)) == (claims, "new")
        waker.notify()  # the busy worker's full claim calls it back
        await _until(lambda: store.status(second.id) == "published", "the second row published")
    finally:
        stop.set()
        waker.notify_all()
        await running
    waker.dismiss()
    assert not waker.others_busy()  # the worker left the crew when it stopped


class CountingRests(pacing.Waker):
    def __init__(self) -> None:
        super().__init__()
        self.rests = 0

    async def rest(self, timeout_s: float) -> bool:
        self.rests += 1
        return await super().rest(timeout_s)


async def test_a_lone_worker_never_stands_down() -> None:
    store, pub = fakes.FakeStore(), fakes.FakePublisher()
    stop, waker = asyncio.Event(), CountingRests()
    settings = _settings(poll_interval_s=60.0, poll_min_interval_s=60.0, claim_linger_s=0.0)
    w = worker.Worker("w", settings, pub, stop, waker, store_=store, connect=store.aconnect)
    rows = [store.insert(agg) for agg in ("a", "b")]
    running = asyncio.create_task(w.run())
    try:
        await _until(lambda: len(waker._waiters) == 1, "the worker idle")
        # after its partial claim it looked again (and found nothing): no rest
        assert [store.status(r.id) for r in rows] == ["published"] * 2
        assert (waker.rests, store.claims) == (0, 2)
    finally:
        stop.set()
        waker.notify_all()
        await running


async def test_while_the_binary_log_is_followed_a_worker_waits_for_the_next_commit() -> None:
    store, pub = fakes.FakeStore(), fakes.FakePublisher()
    stop, waker = asyncio.Event(), CountingRests()
    waker.pushing = True  # as relay.binlog.Follower sets it while it streams
    settings = _settings(poll_interval_s=60.0, poll_min_interval_s=0.001, claim_linger_s=0.0)
    w = worker.Worker("w", settings, pub, stop, waker, store_=store, connect=store.aconnect)
    first = store.insert("a")
    running = asyncio.create_task(w.run())
    try:
        await _until(lambda: len(waker._waiters) == 1, "the worker idle")
        # its claim took all the work: no second look, no idle look at the 1 ms ticks
        assert store.status(first.id) == "published"
        assert (store.claims, store.looks) == (1, 0)
        later = store.insert("b")
        waker.notify()  # the commit, seen in the binary log
        await _until(lambda: store.status(later.id) == "published", "the next row published")
        assert store.claims == 2
    finally:
        stop.set()
        waker.notify_all()
        await running
