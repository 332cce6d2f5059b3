"""`relay bench --mode capacity`: the rate search and the verdict of one step (pure)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from relay.tools import capacity


def run(search: capacity.CapacitySearch, passes: Callable[[float], bool]) -> list[float]:
    """Drive the search with a verdict per rate; the rates tried, in order."""
    tried: list[float] = []
    while (rate := search.next_rate()) is not None:
        tried.append(rate)
        ok = passes(rate)
        search.record(rate, ok, () if ok else (capacity.P99_OVER_LIMIT,))
        assert len(tried) <= 50, tried
    return tried


def test_ramps_by_the_factor_then_bisects_to_the_precision() -> None:
    search = capacity.CapacitySearch(500, 20_000)
    tried = run(search, lambda rate: rate <= 3000)
    assert tried[:6] == [500, 750, 1125, 1687.5, 2531.2, 3796.8]
    assert tried[6] == pytest.approx((2531.2 + 3796.8) / 2, abs=0.1)  # first bisection
    outcome = search.outcome()
    assert outcome.stopped == "converged"
    assert outcome.limited_by == "relay"
    assert outcome.highest_passing is not None and outcome.lowest_failing is not None
    assert outcome.highest_passing <= 3000 < outcome.lowest_failing
    assert outcome.lowest_failing <= outcome.highest_passing * 1.1
    assert search.phase == "bisect"


def test_max_rate_passing_ends_the_search() -> None:
    search = capacity.CapacitySearch(500, 1000)
    assert run(search, lambda rate: True) == [500, 750, 1000]
    outcome = search.outcome()
    assert (outcome.highest_passing, outcome.lowest_failing) == (1000, None)
    assert (outcome.stopped, outcome.limited_by) == ("max_rate", "max_rate")


def test_a_start_above_max_rate_starts_at_max_rate() -> None:
    search = capacity.CapacitySearch(5000, 1000)
    assert run(search, lambda rate: True) == [1000]


def test_first_step_failing_steps_down_then_bisects() -> None:
    search = capacity.CapacitySearch(1000, 20_000)
    tried = run(search, lambda rate: rate <= 300)
    assert tried[:4] == [1000, 666.7, 444.5, 296.3]
    outcome = search.outcome()
    assert outcome.stopped == "converged"
    assert outcome.highest_passing is not None and 296.3 <= outcome.highest_passing <= 300


def test_nothing_passing_stops_below_the_minimum_rate() -> None:
    search = capacity.CapacitySearch(10, 100, min_rate=2)
    tried = run(search, lambda rate: False)
    assert tried == [10, 6.7, 4.5, 3.0, 2.0]
    outcome = search.outcome()
    assert (outcome.highest_passing, outcome.stopped) == (None, "nothing_passed")


def test_max_steps_bounds_the_search() -> None:
    search = capacity.CapacitySearch(1, 1e9, max_steps=4)
    assert len(run(search, lambda rate: True)) == 4
    assert search.outcome().stopped == "max_steps"
    assert search.outcome().limited_by == "unknown"


def test_reaching_max_rate_on_the_last_step_says_max_rate() -> None:
    search = capacity.CapacitySearch(100, 200, max_steps=3)
    assert run(search, lambda rate: True) == [100, 150, 200]
    assert (search.outcome().stopped, search.outcome().limited_by) == ("max_rate", "max_rate")


def test_abort_stops_at_once() -> None:
    search = capacity.CapacitySearch(500, 20_000)
    search.record(500, True)
    search.abort("step 1 did not drain")
    assert search.next_rate() is None
    assert search.outcome().stopped == "aborted: step 1 did not drain"


def test_a_higher_rate_passing_discards_an_earlier_failure_as_noise() -> None:
    search = capacity.CapacitySearch(500, 20_000)
    search.record(500, True)
    search.record(750, False, (capacity.P99_OVER_LIMIT,))
    search.record(800, True)
    assert (search.passed, search.failed, search.phase) == (800, None, "ramp")
    assert search.next_rate() == 1200


@pytest.mark.parametrize(
    ("reasons", "limited_by"),
    [
        ((capacity.WRITERS_BEHIND,), "load_generator"),
        ((capacity.P99_OVER_LIMIT, capacity.WRITERS_BEHIND), "machine"),
        ((capacity.BACKLOG_GROWING,), "relay"),
    ],
)
def test_what_limited_the_result(reasons: tuple[str, ...], limited_by: str) -> None:
    search = capacity.CapacitySearch(500, 20_000)
    search.record(500, True)
    search.record(750, False, reasons)
    assert search.outcome().limited_by == limited_by


@pytest.mark.parametrize(
    "kwargs",
    [
        {"start": 0, "max_rate": 10},
        {"start": 1, "max_rate": 10, "factor": 1.0},
        {"start": 1, "max_rate": 10, "max_steps": 0},
        {"start": 1, "max_rate": 0.5},
        {"start": 1, "max_rate": 10, "precision": 0},
    ],
)
def test_bad_parameters_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"."):
        capacity.CapacitySearch(**kwargs)  # type: ignore[arg-type]


# -- one step's verdict -----------------------------------------------------------------------


def test_percentile_counts_late_events_as_infinitely_late() -> None:
    received = [float(v) for v in range(1, 100)]  # 99 received
    assert capacity.percentile_with_late(received, 0, 99) == 99.0
    assert capacity.percentile_with_late(received, 1, 99) == 99.0  # rank 99 of 100
    assert capacity.percentile_with_late(received, 2, 99) == math.inf  # rank 100 of 101
    assert capacity.percentile_with_late([], 3, 50) == math.inf
    assert math.isnan(capacity.percentile_with_late([], 0, 99))


def test_slope_is_least_squares() -> None:
    assert capacity.slope([(0, 1.0), (1, 3.0), (2, 5.0)]) == pytest.approx(2.0)
    assert capacity.slope([(0, 5.0), (1, 0.0), (2, 5.0), (3, 0.0)]) == pytest.approx(-1.0)
    assert capacity.slope([(1, 5.0)]) == 0.0
    assert capacity.slope([(1, 5.0), (1, 9.0)]) == 0.0


def figures(**changes: object) -> capacity.StepFigures:
    base: dict[str, object] = {
        "target_txn_per_s": 1000.0,
        "txn_per_s": 990.0,
        "events_per_s": 1900.0,
        "latencies_ms": sorted(float(v % 50 + 5) for v in range(1000)),
        "late": 0,
        "backlog": [(float(t), 20.0 + (t % 2)) for t in range(20)],
    }
    base.update(changes)
    return capacity.StepFigures(**base)  # type: ignore[arg-type]


def test_a_step_that_keeps_up_passes() -> None:
    verdict = capacity.judge(figures())
    assert verdict.passed
    assert verdict.reasons == ()
    assert verdict.p99_ms == 54.0
    assert verdict.backlog_end == 21.0


def test_slow_tail_fails() -> None:
    slow = sorted([10.0] * 980 + [1500.0] * 20)
    verdict = capacity.judge(figures(latencies_ms=slow))
    assert verdict.reasons == (capacity.P99_OVER_LIMIT,)
    assert verdict.p99_ms == 1500.0


def test_too_many_late_events_fail() -> None:
    verdict = capacity.judge(figures(latencies_ms=[10.0] * 980, late=20))
    assert verdict.reasons == (capacity.P99_OVER_LIMIT,)
    assert verdict.p99_ms == math.inf


def test_growing_backlog_fails_only_once_it_is_big() -> None:
    growing = [(float(t), 500.0 * t) for t in range(20)]  # +500 rows/s, ends at 9,500
    assert capacity.judge(figures(backlog=growing)).reasons == (capacity.BACKLOG_GROWING,)
    small = [(float(t), 40.0 * t) for t in range(20)]  # growing, but ends under 0.5 s of events
    assert capacity.judge(figures(backlog=small)).passed
    assert capacity.judge(figures(backlog=[])).passed  # no samples: judged on latency alone


def test_writers_behind_the_target_fail_the_step() -> None:
    verdict = capacity.judge(figures(txn_per_s=850.0))
    assert verdict.reasons == (capacity.WRITERS_BEHIND,)


def test_a_step_without_events_fails() -> None:
    verdict = capacity.judge(figures(latencies_ms=[], late=0))
    assert capacity.NO_EVENTS in verdict.reasons
