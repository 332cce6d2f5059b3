"""Delivery bookkeeping of ``relay demo``, ``relay bench`` and the end-to-end tests. Pure: no
I/O, no clock.

Service A reports what it committed or rolled back, Service B what it received; the
:class:`Tracker` turns that into latencies, losses, duplicates, per-aggregate order and key
placement. Messages are identified by a small integer index (encoded in their ``message_id``, see
:func:`message_id`), so a million-message run costs a few compact arrays. Order and placement
are judged when the summary is taken, over every arrival in arrival order, so a commit that is
recorded after its message arrived (a commit whose outcome was resolved later) is judged too.
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
EXAMPLES = 20
NO_INDEX = -1  # arrivals whose message id is not of this run
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
    """What a run proved. ``lost``, ``leaked`` (rolled back yet delivered), ``order_violations``
    and ``split_keys`` (aggregates delivered to more than one partition) must be 0."""

    committed: int
    rolled_back: int
    received: int  # distinct committed messages received
    lost: int
    leaked: int
    duplicates: int  # copies beyond the first
    max_copies: int
    order_violations: int
    split_keys: int
    foreign: int  # arrivals not of this run, or never committed nor rolled back
    latency_from_start_ms: dict[str, float]
    latency_from_commit_ms: dict[str, float]
    # (aggregate, last sequence, sequence received after it, index)
    order_violation_examples: list[tuple[int, int, int, int]]
    lost_examples: list[int]  # indexes
    split_key_examples: list[int]  # aggregates

    @property
    def ok(self) -> bool:
        return not (self.lost or self.leaked or self.order_violations or self.split_keys)

    def problems(self) -> list[str]:
        """Everything wrong, foreign arrivals included; empty for a clean run."""
        found: dict[str, tuple[int, Sequence[object]]] = {
            "lost": (self.lost, self.lost_examples),
            "rolled back yet delivered": (self.leaked, []),
            "per-aggregate order violations": (
                self.order_violations,
                self.order_violation_examples,
            ),
            "aggregates on several partitions": (self.split_keys, self.split_key_examples),
            "unknown messages": (self.foreign, []),
        }
        return [f"{what}: {n} {examples[:5]}" for what, (n, examples) in found.items() if n]

    def describe(self) -> str:
        return (
            f"committed={self.committed} rolled_back={self.rolled_back} "
            f"received={self.received} duplicates={self.duplicates} "
            f"max_copies={self.max_copies} lost={self.lost} leaked={self.leaked} "
            f"order_violations={self.order_violations} split_keys={self.split_keys} "
            f"foreign={self.foreign}"
        )


class Tracker:
    """Sent and received messages of one run. Times are seconds on one monotonic clock.

    ``sequence`` is the aggregate's version carried by the event: first deliveries must
    increase within an aggregate (a later copy counts as a duplicate and is not order-checked).
    """

    def __init__(self) -> None:
        self._sent: dict[int, tuple[int, int, float, float]] = {}
        self._rolled_back: set[int] = set()
        self._received: set[int] = set()
        self._copies: collections.Counter[int] = collections.Counter()  # beyond the first
        self._arrivals = array.array("q")  # index (NO_INDEX if foreign), in arrival order
        self._partitions = array.array("i")  # partition of each arrival
        self._in_flight: collections.OrderedDict[int, float] = collections.OrderedDict()
        self._early: dict[int, float] = {}  # received before its commit was reported: t_receive
        self._from_start = array.array("d")
        self._from_commit = array.array("d")
        self._commit_times = array.array("d")  # t_commit of each latency, in receipt order
        self.cumulative = LogHistogram()
        self.window: list[float] = []  # from commit, since the last take_window(s)
        self.window_from_start: list[float] = []  # from the transaction's start, likewise
        self.duplicates = 0

    # -- Service A ---------------------------------------------------------------------------

    def committed(
        self, index: int, aggregate: int, sequence: int, t_start: float, t_commit: float
    ) -> None:
        """``t_start`` NaN: no latency (preloaded rows, commits resolved afterwards)."""
        self._sent[index] = (aggregate, sequence, t_start, t_commit)
        if index not in self._received:
            self._in_flight[index] = t_commit
            return
        t_receive = self._early.pop(index, None)  # a writer process reports in batches
        if t_receive is not None and not math.isnan(t_start):
            self._latency(t_start, t_commit, t_receive)

    def rolled_back(self, index: int) -> None:
        self._rolled_back.add(index)

    # -- Service B ---------------------------------------------------------------------------

    def received(self, index: int | None, t_receive: float, partition: int = 0) -> None:
        self._arrivals.append(NO_INDEX if index is None else index)
        self._partitions.append(partition)
        if index is None:
            return
        if index in self._received:
            self.duplicates += 1
            self._copies[index] += 1
            return
        self._received.add(index)
        self._in_flight.pop(index, None)
        sent = self._sent.get(index)
        if sent is None:
            if index not in self._rolled_back:
                self._early[index] = t_receive  # its commit may still be reported
            return
        if not math.isnan(sent[2]):
            self._latency(sent[2], sent[3], t_receive)

    def _latency(self, t_start: float, t_commit: float, t_receive: float) -> None:
        from_start = (t_receive - t_start) * 1000.0
        self._from_start.append(from_start)
        from_commit = (t_receive - t_commit) * 1000.0
        self._from_commit.append(from_commit)
        self._commit_times.append(t_commit)
        self.cumulative.record(from_commit)
        self.window.append(from_commit)
        self.window_from_start.append(from_start)

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

    def committed_indexes(self) -> list[int]:
        return list(self._sent)

    def pending(self, committed_before: float = math.inf) -> int:
        """Committed before ``committed_before`` (in recording order) and not received yet;
        rows with no commit time count whatever the time."""
        count = 0
        for t_commit in self._in_flight.values():
            if t_commit >= committed_before:
                break
            count += 1
        return count

    def overdue(self, now: float, after_s: float) -> int:
        """Committed over ``after_s`` ago and still not received."""
        return self.pending(now - after_s)

    def take_window(self) -> list[float]:
        """Commit-to-receipt latencies (ms) since the previous call, sorted (both windows are
        reset)."""
        return self.take_windows()[1]

    def take_windows(self) -> tuple[list[float], list[float]]:
        """Latencies (ms) since the previous call, sorted: (from the transaction's start, from
        its commit)."""
        from_start, self.window_from_start = self.window_from_start, []
        from_commit, self.window = self.window, []
        from_start.sort()
        from_commit.sort()
        return from_start, from_commit

    @property
    def latency_count(self) -> int:
        """Latencies recorded so far: a position for :meth:`latencies_committed_since`."""
        return len(self._from_start)

    def latencies_committed_since(
        self, t_commit: float, position: int = 0
    ) -> tuple[list[float], list[float]]:
        """Latencies (ms; from the start, from the commit) of the messages committed at or
        after ``t_commit`` and received so far, sorted. ``position`` (a :attr:`latency_count`
        taken before ``t_commit``) skips the earlier receipts."""
        from_start: list[float] = []
        from_commit: list[float] = []
        for i in range(position, len(self._commit_times)):
            if self._commit_times[i] >= t_commit:
                from_start.append(self._from_start[i])
                from_commit.append(self._from_commit[i])
        from_start.sort()
        from_commit.sort()
        return from_start, from_commit

    def sequence_gaps(self) -> list[int]:
        """Aggregates whose committed sequences are not exactly 1..n (a writer bug)."""
        by_aggregate: dict[int, list[int]] = collections.defaultdict(list)
        for aggregate, sequence, _, _ in self._sent.values():
            by_aggregate[aggregate].append(sequence)
        return sorted(
            aggregate
            for aggregate, sequences in by_aggregate.items()
            if sorted(sequences) != list(range(1, len(sequences) + 1))
        )

    def _order_and_placement(self) -> tuple[int, list[tuple[int, int, int, int]], list[int]]:
        """First deliveries in arrival order: order violations (with examples) and the
        aggregates whose messages reached more than one partition."""
        last: dict[int, int] = {}
        partition_of: dict[int, int] = {}
        split: set[int] = set()
        seen: set[int] = set()
        violations = 0
        examples: list[tuple[int, int, int, int]] = []
        for index, partition in zip(self._arrivals, self._partitions, strict=True):
            sent = self._sent.get(index)
            if sent is None:
                continue
            aggregate, sequence = sent[0], sent[1]
            if partition_of.setdefault(aggregate, partition) != partition:
                split.add(aggregate)
            if index in seen:
                continue
            seen.add(index)
            previous = last.get(aggregate)
            if previous is not None and sequence <= previous:
                violations += 1
                if len(examples) < EXAMPLES:
                    examples.append((aggregate, previous, sequence, index))
            else:
                last[aggregate] = sequence
        return violations, examples, sorted(split)

    def summary(self) -> Summary:
        violations, examples, split = self._order_and_placement()
        known = self._sent.keys() | self._rolled_back
        foreign = sum(1 for index in self._arrivals if index not in known)
        lost = list(self._in_flight)
        return Summary(
            committed=len(self._sent),
            rolled_back=len(self._rolled_back),
            received=sum(1 for i in self._received if i in self._sent),
            lost=len(lost),
            leaked=len(self._rolled_back & self._received),
            duplicates=self.duplicates,
            max_copies=1 + max(self._copies.values(), default=0) if self._received else 0,
            order_violations=violations,
            split_keys=len(split),
            foreign=foreign,
            latency_from_start_ms=summarize(self._from_start),
            latency_from_commit_ms=summarize(self._from_commit),
            order_violation_examples=examples,
            lost_examples=lost[:EXAMPLES],
            split_key_examples=split[:EXAMPLES],
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
