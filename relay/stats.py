"""Bookkeeping of the load tool (``relay demo`` / ``relay bench``). Pure: no I/O, no clock.

Service A reports what it committed or rolled back, Service B what it received; the
:class:`Tracker` turns that into latencies, losses, duplicates and per-aggregate order checks.
Messages are identified by a small integer index (encoded in their ``message_id``, see
:func:`message_id`), so a million-message run costs a few compact arrays.
"""

from __future__ import annotations

import array
import bisect
import collections
import dataclasses
import math
import re
from collections.abc import Iterable, Sequence

PERCENTILES = (50.0, 95.0, 99.0, 99.9)
_MESSAGE_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def message_id(prefix: str, index: int) -> str:
    """A UUID-shaped id: 23 characters of run prefix (``8-4-4-4`` hex), then the index in hex."""
    return f"{prefix}-{index:012x}"


def parse_message_id(prefix: str, value: str) -> int | None:
    """The index of a message id of this run, or None for anything else."""
    if len(value) != 36 or not value.startswith(prefix) or not _MESSAGE_ID.match(value):
        return None
    return int(value[24:], 16)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of ascending values; NaN when empty."""
    if not sorted_values:
        return math.nan
    if q <= 0:
        return sorted_values[0]
    rank = math.ceil(q / 100.0 * len(sorted_values))
    return sorted_values[min(len(sorted_values), max(1, rank)) - 1]


def summarize(values: Iterable[float]) -> dict[str, float]:
    """p50/p95/p99/p99.9/max and count of the values (milliseconds in, milliseconds out)."""
    ordered = sorted(values)
    out = {f"p{q:g}": percentile(ordered, q) for q in PERCENTILES}
    out["max"] = ordered[-1] if ordered else math.nan
    out["count"] = float(len(ordered))
    return out


class LogHistogram:
    """Log-bucketed histogram (relative error ~``precision``) for running percentiles."""

    def __init__(self, low: float = 1e-3, high: float = 1e6, precision: float = 0.01) -> None:
        self._low = low
        self._ratio = math.log1p(precision)
        self._buckets = array.array("Q", [0]) * (int(math.log(high / low) / self._ratio) + 2)
        self.count = 0
        self.max = math.nan

    def record(self, value: float) -> None:
        if value <= self._low:
            index = 0
        else:
            index = min(len(self._buckets) - 1, 1 + int(math.log(value / self._low) / self._ratio))
        self._buckets[index] += 1
        self.count += 1
        if not value <= self.max:  # also replaces NaN
            self.max = value

    def percentile(self, q: float) -> float:
        """Upper bound of the bucket holding the nearest-rank percentile (never above max)."""
        if not self.count:
            return math.nan
        rank = max(1, math.ceil(q / 100.0 * self.count))
        seen = 0
        for index, n in enumerate(self._buckets):
            seen += n
            if seen >= rank:
                bound = self._low * math.exp(self._ratio * index)
                return min(bound, self.max)
        return self.max


@dataclasses.dataclass
class Summary:
    """What a run proved. ``lost`` must be 0, ``leaked`` (rolled back yet delivered) too."""

    committed: int
    rolled_back: int
    received: int
    lost: int
    leaked: int
    duplicates: int
    order_violations: int
    foreign: int
    latency_from_start_ms: dict[str, float]
    latency_from_commit_ms: dict[str, float]

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.leaked == 0 and self.order_violations == 0


class Tracker:
    """Sent and received messages of one run. Times are seconds on one monotonic clock.

    ``sequence`` is the aggregate's version carried by the event: for first deliveries it must
    increase within an aggregate (a duplicate is counted as such and not order-checked).
    """

    def __init__(self) -> None:
        self._sent: dict[int, tuple[int, int, float, float]] = {}
        self._rolled_back: set[int] = set()
        self._received: dict[int, float] = {}
        self._last_sequence: dict[int, int] = {}
        self._in_flight: collections.OrderedDict[int, float] = collections.OrderedDict()
        self._from_start = array.array("d")
        self._from_commit = array.array("d")
        self.cumulative = LogHistogram()
        self.window: list[float] = []
        self.duplicates = 0
        self.order_violations = 0
        self.violation_examples: list[tuple[int, int, int, int]] = []  # aggregate, last, got, id
        self.leaked = 0
        self.foreign = 0

    # -- Service A ---------------------------------------------------------------------------

    def committed(
        self, index: int, aggregate: int, sequence: int, t_start: float, t_commit: float
    ) -> None:
        self._sent[index] = (aggregate, sequence, t_start, t_commit)
        if index not in self._received:
            self._in_flight[index] = t_commit

    def rolled_back(self, index: int) -> None:
        self._rolled_back.add(index)
        if index in self._received:
            self.leaked += 1

    # -- Service B ---------------------------------------------------------------------------

    def received(self, index: int | None, t_receive: float) -> None:
        if index is None:
            self.foreign += 1
            return
        if index in self._received:
            self.duplicates += 1
            return
        self._received[index] = t_receive
        if index in self._rolled_back:
            self.leaked += 1
            return
        sent = self._sent.get(index)
        if sent is None:  # arrived before its commit was recorded: should not happen
            self.foreign += 1
            return
        aggregate, sequence, t_start, t_commit = sent
        last = self._last_sequence.get(aggregate)
        if last is not None and sequence <= last:
            self.order_violations += 1
            if len(self.violation_examples) < 20:
                self.violation_examples.append((aggregate, last, sequence, index))
        else:
            self._last_sequence[aggregate] = sequence
        self._in_flight.pop(index, None)
        if not math.isnan(t_start):  # NaN for preloaded rows: no latency to speak of
            self._from_start.append((t_receive - t_start) * 1000.0)
            from_commit = (t_receive - t_commit) * 1000.0
            self._from_commit.append(from_commit)
            self.cumulative.record(from_commit)
            self.window.append(from_commit)

    # -- figures -----------------------------------------------------------------------------

    @property
    def committed_count(self) -> int:
        return len(self._sent)

    @property
    def received_count(self) -> int:
        """Distinct messages of this run received (committed or leaked)."""
        return len(self._received)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def overdue(self, now: float, after_s: float) -> int:
        """Committed over ``after_s`` ago and still not received (the oldest commits first)."""
        cutoff = now - after_s
        count = 0
        for t_commit in self._in_flight.values():
            if t_commit >= cutoff:
                break
            count += 1
        return count

    def take_window(self) -> list[float]:
        """Commit-to-receipt latencies (ms) since the previous call, sorted."""
        window, self.window = self.window, []
        window.sort()
        return window

    def summary(self) -> Summary:
        return Summary(
            committed=len(self._sent),
            rolled_back=len(self._rolled_back),
            received=sum(1 for i in self._received if i in self._sent),
            lost=len(self._in_flight),
            leaked=self.leaked,
            duplicates=self.duplicates,
            order_violations=self.order_violations,
            foreign=self.foreign,
            latency_from_start_ms=summarize(self._from_start),
            latency_from_commit_ms=summarize(self._from_commit),
        )


def histogram_quantile(buckets: Sequence[tuple[float, float]], q: float) -> float:
    """Prometheus-style quantile (``q`` in 0..1) from cumulative ``(le, count)`` buckets.

    Linear interpolation inside the bucket, like PromQL's ``histogram_quantile``.
    """
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return math.nan
    total = ordered[-1][1]
    rank = q * total
    index = bisect.bisect_left([count for _, count in ordered], rank)
    index = min(index, len(ordered) - 1)
    upper, count_upper = ordered[index]
    if math.isinf(upper):
        return ordered[index - 1][0] if index > 0 else math.nan
    lower, count_lower = (0.0, 0.0) if index == 0 else ordered[index - 1]
    if count_upper == count_lower:
        return upper
    return lower + (upper - lower) * (rank - count_lower) / (count_upper - count_lower)


def parse_histogram(metrics_text: str, name: str) -> tuple[list[tuple[float, float]], float]:
    """Cumulative buckets and sum of one (unlabelled) histogram in Prometheus text format."""
    buckets: list[tuple[float, float]] = []
    total = math.nan
    pattern = re.compile(rf'^{re.escape(name)}_bucket\{{le="([^"]+)"\}} (\S+)$')
    for line in metrics_text.splitlines():
        match = pattern.match(line)
        if match:
            buckets.append((float(match.group(1)), float(match.group(2))))
        elif line.startswith(f"{name}_sum "):
            total = float(line.split()[1])
    return buckets, total


def parse_counter(metrics_text: str, name: str) -> float:
    """Value of one unlabelled counter or gauge (``name`` or ``name_total``); NaN if absent."""
    for line in metrics_text.splitlines():
        key, _, value = line.partition(" ")
        if key in (name, f"{name}_total"):
            return float(value)
    return math.nan


def bucket_delta(
    after: Sequence[tuple[float, float]], before: Sequence[tuple[float, float]]
) -> list[tuple[float, float]]:
    """Cumulative buckets of the observations made between two scrapes."""
    earlier = dict(before)
    return [(le, count - earlier.get(le, 0.0)) for le, count in after]
