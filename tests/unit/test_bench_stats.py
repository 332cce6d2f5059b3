"""The delivery bookkeeping of the tools and the end-to-end tests: percentiles, loss,
duplicates, order, key placement, rolled-back ids, latency windows; and the bench's Service A:
writer kinds (plain SQL never loads ``relay.writer``), events per transaction, rates."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from typing import Any

import pytest

from relay import cli, config
from relay.tools import loadgen, stats

PREFIX = "0123abcd-0000-4000-8000"


def test_message_id_round_trip() -> None:
    mid = stats.message_id(PREFIX, 0x1F)
    assert len(mid) == 36
    assert stats.parse_message_id(PREFIX, mid) == 0x1F
    assert stats.parse_message_id("ffffffff-0000-4000-8000", mid) is None
    assert stats.parse_message_id(PREFIX, "not-a-message-id") is None


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert stats.percentile(values, 50) == 50.0
    assert stats.percentile(values, 99) == 99.0
    assert stats.percentile(values, 99.9) == 100.0
    assert stats.percentile(values, 0) == 1.0
    assert math.isnan(stats.percentile([], 50))


def test_summarize_has_every_figure() -> None:
    out = stats.summarize([3.0, 1.0, 2.0])
    assert out["p50"] == 2.0
    assert out["max"] == 3.0
    assert out["count"] == 3.0
    assert set(out) == {"p50", "p95", "p99", "p99.9", "max", "count"}


def test_log_histogram_is_within_precision() -> None:
    hist = stats.LogHistogram(precision=0.01)
    for v in range(1, 1001):
        hist.record(float(v))
    assert hist.count == 1000
    assert hist.max == 1000.0
    assert hist.percentile(50) == pytest.approx(500.0, rel=0.02)
    assert hist.percentile(99) == pytest.approx(990.0, rel=0.02)
    assert hist.percentile(100) == 1000.0


def test_clean_run_has_latencies_and_no_loss() -> None:
    t = stats.Tracker()
    t.committed(0, aggregate=1, sequence=1, t_start=10.0, t_commit=10.010)
    t.committed(1, aggregate=1, sequence=2, t_start=10.0, t_commit=10.010)
    assert t.in_flight == 2
    t.received(0, 10.020)
    t.received(1, 10.030)
    s = t.summary()
    assert (s.committed, s.received, s.lost, s.duplicates, s.order_violations) == (2, 2, 0, 0, 0)
    assert s.ok
    assert s.latency_from_commit_ms["max"] == pytest.approx(20.0)
    assert s.latency_from_start_ms["p50"] == pytest.approx(20.0)


def test_missing_message_is_lost() -> None:
    t = stats.Tracker()
    t.committed(0, 1, 1, 0.0, 1.0)
    t.committed(1, 1, 2, 0.0, 1.0)
    t.received(0, 2.0)
    s = t.summary()
    assert s.lost == 1
    assert not s.ok
    assert t.overdue(now=40.0, after_s=30.0) == 1
    assert t.overdue(now=20.0, after_s=30.0) == 0


def test_duplicate_is_counted_not_order_checked() -> None:
    t = stats.Tracker()
    for i in range(3):
        t.committed(i, 7, i + 1, 0.0, 0.0)
    t.received(0, 1.0)
    t.received(1, 1.0)
    t.received(0, 1.0)  # redelivery of an older event: a duplicate, not a violation
    t.received(2, 1.0)
    s = t.summary()
    assert (s.duplicates, s.order_violations, s.lost) == (1, 0, 0)


def test_order_violation_per_aggregate() -> None:
    t = stats.Tracker()
    t.committed(0, 1, 1, 0.0, 0.0)
    t.committed(1, 1, 2, 0.0, 0.0)
    t.committed(2, 2, 1, 0.0, 0.0)  # another aggregate: its own sequence
    t.received(1, 1.0)
    t.received(2, 1.0)
    t.received(0, 1.0)
    s = t.summary()
    assert s.order_violations == 1
    assert s.order_violation_examples == [(1, 2, 1, 0)]
    assert not s.ok


def test_rolled_back_delivery_is_a_leak_either_way_round() -> None:
    t = stats.Tracker()
    t.rolled_back(0)
    t.received(0, 1.0)
    t.received(1, 1.0)  # received before Service A reported the rollback
    t.rolled_back(1)
    s = t.summary()
    assert s.leaked == 2
    assert s.rolled_back == 2
    assert s.received == 0
    assert not s.ok


def test_foreign_messages_are_counted_not_failed() -> None:
    t = stats.Tracker()
    t.received(None, 1.0)
    t.received(5, 1.0)  # of this run, but neither committed nor rolled back
    s = t.summary()
    assert s.foreign == 2
    assert s.ok  # relay bench does not fail on them...
    assert s.problems() == ["unknown messages: 2 []"]  # ...the end-to-end tests do


def test_commit_recorded_after_its_delivery_is_still_order_checked() -> None:
    """A commit whose outcome was resolved after the message arrived (database restart)."""
    t = stats.Tracker()
    t.committed(1, 7, 2, 0.0, 0.0)
    t.received(1, 1.0)
    t.received(0, 1.5)  # arrives before its commit is known, and after a later sequence
    t.committed(0, 7, 1, math.nan, 2.0)
    s = t.summary()
    assert (s.committed, s.received, s.lost, s.foreign) == (2, 2, 0, 0)
    assert s.order_violation_examples == [(7, 2, 1, 0)]


def test_a_receipt_before_the_report_of_its_commit_still_counts_its_latency() -> None:
    """A writer process reports its commits in batches: Service B may be faster."""
    t = stats.Tracker()
    t.received(0, 1.25)
    t.committed(0, 7, 1, 1.0, 1.125)
    t.received(0, 1.5)  # a duplicate, after the report
    s = t.summary()
    assert (s.committed, s.received, s.lost, s.duplicates, s.foreign) == (1, 1, 0, 1, 0)
    assert s.latency_from_start_ms["p50"] == 250.0
    assert s.latency_from_commit_ms["p50"] == 125.0
    assert t.latency_count == 1


def test_aggregate_on_two_partitions_is_a_split_key() -> None:
    t = stats.Tracker()
    for i in range(3):
        t.committed(i, 9, i + 1, 0.0, 0.0)
    t.received(0, 1.0, partition=2)
    t.received(1, 1.0, partition=2)
    t.received(2, 1.0, partition=4)
    s = t.summary()
    assert (s.split_keys, s.split_key_examples) == (1, [9])
    assert not s.ok


def test_copies_and_pending_before_a_time() -> None:
    t = stats.Tracker()
    for i in range(3):
        t.committed(i, i, 1, 0.0, float(i))
    for _ in range(3):
        t.received(0, 5.0)
    assert t.pending() == 2
    assert t.pending(committed_before=2.0) == 1  # index 1 only
    s = t.summary()
    assert (s.duplicates, s.max_copies, s.lost_examples) == (2, 3, [1, 2])


def test_sequence_gaps_name_the_aggregate() -> None:
    t = stats.Tracker()
    t.committed(0, 1, 1, 0.0, 0.0)
    t.committed(1, 1, 2, 0.0, 0.0)
    t.committed(2, 2, 1, 0.0, 0.0)
    t.committed(3, 2, 3, 0.0, 0.0)  # aggregate 2 skipped sequence 2
    assert t.sequence_gaps() == [2]


def test_preloaded_rows_have_no_latency() -> None:
    t = stats.Tracker()
    t.committed(0, 1, 1, math.nan, math.nan)
    t.received(0, 5.0)
    s = t.summary()
    assert s.lost == 0
    assert s.latency_from_commit_ms["count"] == 0.0


def test_window_is_taken_sorted_and_reset() -> None:
    t = stats.Tracker()
    for i, latency in enumerate((0.030, 0.010, 0.020)):
        t.committed(i, i, 1, 0.0, 0.0)
        t.received(i, latency)
    assert t.take_window() == pytest.approx([10.0, 20.0, 30.0])
    assert t.take_window() == []


METRICS = """\
# HELP outbox_relay_claim_duration_seconds Time to lock shards and claim a batch of rows.
# TYPE outbox_relay_claim_duration_seconds histogram
outbox_relay_claim_duration_seconds_bucket{le="0.001"} 10.0
outbox_relay_claim_duration_seconds_bucket{le="0.005"} 90.0
outbox_relay_claim_duration_seconds_bucket{le="0.01"} 100.0
outbox_relay_claim_duration_seconds_bucket{le="+Inf"} 100.0
outbox_relay_claim_duration_seconds_count 100.0
outbox_relay_claim_duration_seconds_sum 0.3
outbox_relay_published_total 1234.0
"""


def test_parse_histogram_and_quantile() -> None:
    buckets, total = stats.parse_histogram(METRICS, "outbox_relay_claim_duration_seconds")
    assert buckets[-1] == (math.inf, 100.0)
    assert total == pytest.approx(0.3)
    assert stats.histogram_quantile(buckets, 0.5) == pytest.approx(0.001 + 0.004 * 40 / 80)
    assert stats.histogram_quantile(buckets, 0.99) == pytest.approx(0.005 + 0.005 * 9 / 10)
    assert math.isnan(stats.histogram_quantile([], 0.99))


def test_bucket_delta_and_counter() -> None:
    after, _ = stats.parse_histogram(METRICS, "outbox_relay_claim_duration_seconds")
    before = [(0.001, 5.0), (0.005, 5.0), (0.01, 5.0), (math.inf, 5.0)]
    assert stats.bucket_delta(after, before)[1] == (0.005, 85.0)
    assert stats.parse_counter(METRICS, "outbox_relay_published") == 1234.0
    assert math.isnan(stats.parse_counter(METRICS, "outbox_relay_missing"))


def test_windows_from_start_and_from_commit_are_taken_together() -> None:
    t = stats.Tracker()
    for i, (start, commit, receive) in enumerate(((0.0, 0.010, 0.030), (0.0, 0.005, 0.015))):
        t.committed(i, i, 1, start, commit)
        t.received(i, receive)
    from_start, from_commit = t.take_windows()
    assert from_start == pytest.approx([15.0, 30.0])
    assert from_commit == pytest.approx([10.0, 20.0])
    assert t.take_windows() == ([], [])


def test_latencies_of_messages_committed_since_a_moment() -> None:
    t = stats.Tracker()
    t.committed(0, 1, 1, 0.0, 1.0)
    t.received(0, 1.5)
    position = t.latency_count
    t.committed(1, 2, 1, 2.0, 2.1)
    t.committed(2, 3, 1, 2.0, 2.2)
    t.received(2, 2.4)
    t.received(1, 2.5)
    from_start, from_commit = t.latencies_committed_since(2.0)
    assert from_start == pytest.approx([400.0, 500.0])
    assert from_commit == pytest.approx([200.0, 400.0])
    assert t.latencies_committed_since(2.0, position) == (from_start, from_commit)
    assert t.latencies_committed_since(0.5, position)[0] == pytest.approx([400.0, 500.0])
    assert len(t.latencies_committed_since(0.5)[0]) == 3


# -- Service A of the bench ---------------------------------------------------------------------


class RecordingCursor:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[Any]]] = []

    async def executemany(self, statement: str, rows: list[Any]) -> None:
        self.calls.append((statement, rows))


async def test_plain_sql_writer_inserts_a_literal_statement_and_sends_no_wake_up() -> None:
    outbox = loadgen._SqlOutbox("outbox")
    cur = RecordingCursor()
    events = [loadgen._Event("m-1", 7, {"version": 0}, {"version": 1, "note": "x"})]
    await outbox.add(cur, events)
    ((statement, rows),) = cur.calls
    assert statement.startswith("INSERT INTO `outbox` (message_id, aggregate_type, aggregate_id")
    assert rows == [
        (
            "m-1",
            "account",
            "7",
            "AccountBalanceChanged",
            "u",
            '{"version":0}',
            '{"version":1,"note":"x"}',
            "demo_account",
        )
    ]
    outbox.notify()  # nothing to send, nothing raised


def test_plain_sql_writer_never_loads_the_writer_helper() -> None:
    code = (
        "import json, sys\n"
        "from relay import config\n"
        "from relay.tools import bench, loadgen, stats\n"
        "w = loadgen.Writers(config.Settings(), loadgen.Workload(aggregates=1, event_bytes=0),"
        " stats.Tracker(), kind='sql', tx_rate=10)\n"
        "before = 'relay.writer' in sys.modules\n"
        "loadgen.Writers(config.Settings(), loadgen.Workload(aggregates=1, event_bytes=0),"
        " stats.Tracker(), kind='helper', tx_rate=10)\n"
        "print(json.dumps([before, 'relay.writer' in sys.modules]))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    proc = subprocess.run(  # noqa: S603 - this interpreter, our own code
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [False, True]


def test_writer_kinds_and_rates() -> None:
    settings = config.Settings()
    workload = loadgen.Workload(aggregates=1, event_bytes=0, events_per_tx=(2, 4))
    assert workload.mean_events_per_tx == 3.0
    tracker = stats.Tracker()
    with pytest.raises(ValueError, match="no wake-up"):
        loadgen.Writers(settings, workload, tracker, kind="sql", notify_to="127.0.0.1:9")
    with pytest.raises(ValueError, match="kind"):
        loadgen.Writers(settings, workload, tracker, kind="java")
    with pytest.raises(ValueError, match="not both"):
        loadgen.Writers(settings, workload, tracker, rate=10, tx_rate=10)
    by_events = loadgen.Writers(settings, workload, tracker, kind="sql", rate=570.0)
    assert by_events._rate == pytest.approx(570.0 / (3.0 * 0.95))  # committed events/s -> txn/s
    assert loadgen.Writers(settings, workload, tracker, kind="sql", tx_rate=200)._rate == 200
    with pytest.raises(ValueError, match="events per transaction"):
        loadgen.Workload(events_per_tx=(0, 2))


def test_bench_options() -> None:
    args = cli.parser().parse_args(["bench"])
    assert (args.mode, args.writer, args.rate, args.events_per_txn) == ("rate", "sql", 500, (1, 3))
    assert args.duration is None  # rate mode 60 s, capacity 20 s per step
    args = cli.parser().parse_args(
        ["bench", "--mode", "capacity", "--writer", "helper", "--events-per-txn", "2-5"]
    )
    assert (args.mode, args.writer, args.events_per_txn) == ("capacity", "helper", (2, 5))
    assert cli.parser().parse_args(["demo", "--events-per-txn", "1"]).events_per_txn == (1, 1)
    for bad in (
        ["--events-per-txn", "3-1"],
        ["--events-per-txn", "x"],
        ["--rate", "0"],
        ["--step-factor", "1"],
        ["--max-steps", "0"],
    ):
        with pytest.raises(SystemExit):
            cli.parser().parse_args(["bench", *bad])
