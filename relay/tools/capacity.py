"""``relay bench --mode capacity``: the highest transaction rate one relay process sustains with
p99 (transaction start -> Service B's receipt) <= 1 s. Pure: no I/O, no clock.

The search (:class:`CapacitySearch`) steps the rate up by a factor (x1.5) while steps pass, then
bisects between the highest passing and the lowest failing rate until they are within
``precision`` (10%) of each other; if the first step fails it steps down instead. It stops after
``max_steps`` steps, or when ``max_rate`` passes. Each step is a fresh load of its own at one rate
and is judged on its own window (:func:`judge`):

* ``p99_over_limit``: p99 from transaction start over every event committed in the step; an
  event not received when the step is judged (``limit`` after the load stopped) counts as over
  the limit;
* ``backlog_growing``: the relay's backlog (committed rows not yet published, sampled during the
  load) grew by more than ``BACKLOG_GROWTH_TOLERANCE`` of the committed event rate per second
  (least squares), and ended above ``BACKLOG_FLOOR_S`` seconds' worth of events: the relay does
  not keep up;
* ``writers_behind``: Service A ended fewer than ``WRITERS_SHORTFALL`` of the target
  transactions per second: the step did not test the rate it was meant to (the load generator or
  the database is saturated). A step failing for this reason alone bounds the result by the load
  generator, not by the relay (:meth:`CapacitySearch.outcome`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

P99_LIMIT_MS = 1000.0
STEP_FACTOR = 1.5
PRECISION = 0.1  # stop bisecting when lowest failing <= highest passing * (1 + PRECISION)
MAX_STEPS = 12
MIN_RATE = 1.0  # txn/s: stepping down stops below this
BACKLOG_GROWTH_TOLERANCE = 0.05  # of the committed event rate, per second
BACKLOG_FLOOR_S = 0.5  # a backlog under this many seconds of events is never "growing"
WRITERS_SHORTFALL = 0.9  # Service A must reach this share of the target transaction rate

P99_OVER_LIMIT = "p99_over_limit"
BACKLOG_GROWING = "backlog_growing"
WRITERS_BEHIND = "writers_behind"
NO_EVENTS = "no_events"


def percentile_with_late(sorted_ms: Sequence[float], late: int, q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of the received latencies (ascending) plus
    ``late`` events not received yet, which count as infinitely late; NaN when there is none."""
    total = len(sorted_ms) + late
    if total == 0:
        return math.nan
    rank = min(total, max(1, math.ceil(q / 100.0 * total)))
    return sorted_ms[rank - 1] if rank <= len(sorted_ms) else math.inf


def slope(samples: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of ``(t, value)`` samples (value per unit of t); 0 for fewer than
    two distinct times."""
    n = len(samples)
    if n < 2:
        return 0.0
    mean_t = sum(t for t, _ in samples) / n
    mean_v = sum(v for _, v in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    if var == 0:
        return 0.0
    return sum((t - mean_t) * (v - mean_v) for t, v in samples) / var


@dataclasses.dataclass(frozen=True)
class StepFigures:
    """What one step measured."""

    target_txn_per_s: float
    txn_per_s: float  # transactions Service A ended (committed or rolled back on purpose) per s
    events_per_s: float  # committed events per second
    latencies_ms: Sequence[float]  # from transaction start, of the events received, ascending
    late: int  # committed in the step, not received when judged
    backlog: Sequence[tuple[float, float]]  # (seconds into the load, rows not yet published)


@dataclasses.dataclass(frozen=True)
class Verdict:
    passed: bool
    reasons: tuple[str, ...]
    p99_ms: float  # the judged p99: inf when more than 1% of the events were late
    backlog_growth_per_s: float  # rows per second
    backlog_end: float  # rows, last sample (NaN without samples)


def judge(figures: StepFigures, p99_limit_ms: float = P99_LIMIT_MS) -> Verdict:
    """Whether the step sustained its rate; the reasons (codes above) when it did not."""
    reasons: list[str] = []
    p99 = percentile_with_late(figures.latencies_ms, figures.late, 99.0)
    if math.isnan(p99):
        reasons.append(NO_EVENTS)
    elif p99 > p99_limit_ms:
        reasons.append(P99_OVER_LIMIT)
    growth = slope(figures.backlog)
    end = figures.backlog[-1][1] if figures.backlog else math.nan
    if (
        growth > BACKLOG_GROWTH_TOLERANCE * figures.events_per_s
        and end > BACKLOG_FLOOR_S * figures.events_per_s
    ):
        reasons.append(BACKLOG_GROWING)
    if figures.txn_per_s < WRITERS_SHORTFALL * figures.target_txn_per_s:
        reasons.append(WRITERS_BEHIND)
    return Verdict(not reasons, tuple(reasons), p99, growth, end)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """Where the search ended."""

    highest_passing: float | None  # txn/s
    lowest_failing: float | None  # txn/s
    stopped: str  # converged | max_rate | max_steps | nothing_passed | aborted: ... | running
    limited_by: str  # relay | load_generator | machine | max_rate | unknown

    def as_dict(self) -> dict[str, Any]:
        return {
            "highest_passing_txn_per_s": self.highest_passing,
            "lowest_failing_txn_per_s": self.lowest_failing,
            "stopped": self.stopped,
            "limited_by": self.limited_by,
        }


class CapacitySearch:
    """Which rate (txn/s) to try next, from the verdicts so far.

    ``next_rate()`` then ``record(rate, passed, reasons)``, until ``next_rate()`` is None.
    """

    def __init__(
        self,
        start: float,
        max_rate: float,
        *,
        factor: float = STEP_FACTOR,
        precision: float = PRECISION,
        max_steps: int = MAX_STEPS,
        min_rate: float = MIN_RATE,
    ) -> None:
        if not start > 0:
            raise ValueError(f"start rate must be positive, not {start}")
        if not 0 < min_rate <= max_rate:
            raise ValueError(f"need 0 < min rate ({min_rate}) <= max rate ({max_rate})")
        if not factor > 1:
            raise ValueError(f"step factor must be above 1, not {factor}")
        if not precision > 0:
            raise ValueError(f"precision must be positive, not {precision}")
        if max_steps < 1:
            raise ValueError(f"max steps must be at least 1, not {max_steps}")
        self.start = min(max(start, min_rate), max_rate)
        self.max_rate = max_rate
        self.factor = factor
        self.precision = precision
        self.max_steps = max_steps
        self.min_rate = min_rate
        self.steps: list[tuple[float, bool, tuple[str, ...]]] = []
        self.passed: float | None = None  # highest passing rate
        self.failed: float | None = None  # lowest failing rate
        self._failed_reasons: tuple[str, ...] = ()
        self._aborted: str | None = None

    @property
    def phase(self) -> str:
        """``ramp`` (nothing failed yet), ``down`` (nothing passed yet) or ``bisect``."""
        if self.failed is None:
            return "ramp"
        return "down" if self.passed is None else "bisect"

    def _stop_reason(self) -> str | None:
        """Why the search is over, or None while it goes on."""
        passed, failed = self.passed, self.failed
        if self._aborted is not None:
            return f"aborted: {self._aborted}"
        if failed is None:  # ramping up (or nothing tried yet)
            done = passed is not None and passed >= self.max_rate
            reason = "max_rate" if done else None
        elif passed is None:  # stepping down
            reason = "nothing_passed" if failed / self.factor < self.min_rate else None
        else:
            reason = "converged" if failed <= passed * (1.0 + self.precision) else None
        if reason is None and len(self.steps) >= self.max_steps:
            return "max_steps"
        return reason

    def next_rate(self) -> float | None:
        """The next rate to try, or None when the search is over."""
        if self._stop_reason() is not None:
            return None
        passed, failed = self.passed, self.failed
        if passed is None and failed is None:
            return self.start
        if failed is None:
            return _round(min(self.passed_or_start * self.factor, self.max_rate))
        if passed is None:
            return _round(failed / self.factor)
        return _round((passed + failed) / 2.0)

    @property
    def passed_or_start(self) -> float:
        return self.start if self.passed is None else self.passed

    def record(self, rate: float, passed: bool, reasons: Sequence[str] = ()) -> None:
        self.steps.append((rate, passed, tuple(reasons)))
        if passed:
            self.passed = rate if self.passed is None else max(self.passed, rate)
            if self.failed is not None and self.failed <= rate:
                self.failed = None  # a higher rate passed: that failure was noise
                self._failed_reasons = ()
        elif self.failed is None or rate < self.failed:
            self.failed = rate
            self._failed_reasons = tuple(reasons)

    def abort(self, why: str) -> None:
        """Stop here (e.g. the backlog of a step did not drain)."""
        self._aborted = why

    def outcome(self) -> Outcome:
        stopped = self._stop_reason() or "running"
        if self.passed is not None and stopped == "max_rate":
            limited_by = "max_rate"
        elif self.failed is None:
            limited_by = "unknown"
        elif set(self._failed_reasons) == {WRITERS_BEHIND}:
            limited_by = "load_generator"
        elif WRITERS_BEHIND in self._failed_reasons:
            limited_by = "machine"
        else:
            limited_by = "relay"
        return Outcome(self.passed, self.failed, stopped, limited_by)


def _round(rate: float) -> float:
    """Rates to one decimal: readable, and steps stay distinct above the minimum rate."""
    return round(rate, 1)
