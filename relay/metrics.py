"""Prometheus metrics of the relay. Prefix ``outbox_relay_``, base units, bounded labels."""

from __future__ import annotations

import platform

import prometheus_client

from relay import __version__

PREFIX = "outbox_relay"

# Publish lag: row event time to Kafka acknowledgement. The 1 s bucket is the p99 target.
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)

# Bounded label values for failed rows.
FAILURE_REASONS = (
    "too_large",
    "bad_headers",
    "bad_json",
    "bad_row",
    "invalid_topic",
    "rejected",
)
# Bounded label values for cycles that failed (their unsent rows stay new and are retried).
RETRY_REASONS = ("timeout", "kafka", "database", "operational", "mark")
# Kinds of aggregate holds: a poison row waiting for an operator, or an automatic timed hold
# after an operational error that concerned only some records (topic missing, not authorized).
HOLD_KINDS = ("poison", "timed")

publish_lag = prometheus_client.Histogram(
    f"{PREFIX}_publish_lag_seconds",
    "Time from the outbox row's event time to the Kafka acknowledgement.",
    buckets=LAG_BUCKETS,
)
published = prometheus_client.Counter(
    f"{PREFIX}_published", "Outbox rows published to Kafka and marked published."
)
failed = prometheus_client.Counter(
    f"{PREFIX}_failed",
    "Outbox rows marked failed (poison rows), by reason.",
    ["reason"],
)
dead_lettered = prometheus_client.Counter(
    f"{PREFIX}_dead_lettered", "Failed rows copied to the dead-letter topic."
)
batch_retries = prometheus_client.Counter(
    f"{PREFIX}_batch_retries",
    "Claimed batches rolled back (rows stay new and are retried), by reason.",
    ["reason"],
)
batch_size = prometheus_client.Histogram(
    f"{PREFIX}_batch_size_rows", "Rows per claimed batch.", buckets=BATCH_BUCKETS
)
claim_duration = prometheus_client.Histogram(
    f"{PREFIX}_claim_duration_seconds",
    "Time to lock shards and claim a batch of rows.",
    buckets=STEP_BUCKETS,
)
publish_duration = prometheus_client.Histogram(
    f"{PREFIX}_publish_duration_seconds",
    "Time from handing a batch to the producer to the last acknowledgement.",
    buckets=STEP_BUCKETS,
)
mark_duration = prometheus_client.Histogram(
    f"{PREFIX}_mark_duration_seconds",
    "Time to mark a batch published and commit.",
    buckets=STEP_BUCKETS,
)
backlog_rows = prometheus_client.Gauge(
    f"{PREFIX}_backlog_rows",
    "Unpublished (new) outbox rows, sampled; saturates at RELAY_BACKLOG__COUNT_CAP.",
)
backlog_oldest_age = prometheus_client.Gauge(
    f"{PREFIX}_backlog_oldest_age_seconds",
    "Age of the oldest unpublished outbox row, sampled; 0 when there is none.",
)
held_aggregates = prometheus_client.Gauge(
    f"{PREFIX}_held_aggregates",
    "Aggregates whose rows wait behind a hold, by kind (poison: `relay skip`/`relay replay`"
    " releases it; timed: retried automatically), sampled.",
    ["kind"],
)
held_rows = prometheus_client.Gauge(
    f"{PREFIX}_held_rows", "Rows waiting behind a hold of their aggregate, sampled."
)
ready = prometheus_client.Gauge(
    f"{PREFIX}_ready",
    "1 when the workers' last cycles succeeded, 0 after RELAY_WORKER__UNREADY_AFTER_FAILED_CYCLES"
    " consecutive failed cycles.",
)
failed_rows = prometheus_client.Gauge(
    f"{PREFIX}_failed_rows", "Rows in status failed waiting for `relay replay`, sampled."
)
cleaner_deleted = prometheus_client.Counter(
    f"{PREFIX}_cleaner_deleted_rows", "Published rows deleted by the cleaner."
)
cleaner_runs = prometheus_client.Counter(
    f"{PREFIX}_cleaner_runs",
    "Cleaner runs, by result (done, skipped: another replica holds the lock, error).",
    ["result"],
)
wakeups = prometheus_client.Counter(f"{PREFIX}_wakeups", "Wake-up datagrams received from writers.")
binlog_commits = prometheus_client.Counter(
    f"{PREFIX}_binlog_commits", "Commits of outbox inserts seen in the binary log (wake-ups)."
)
loop_errors = prometheus_client.Counter(
    f"{PREFIX}_loop_errors",
    "Unexpected errors caught and survived by a background loop, by loop.",
    ["loop"],
)
build_info = prometheus_client.Info(f"{PREFIX}_build", "Version of the relay and its runtime.")
build_info.info({"version": __version__, "python": platform.python_version()})

for _reason in FAILURE_REASONS:
    failed.labels(_reason)
for _reason in RETRY_REASONS:
    batch_retries.labels(_reason)
for _kind in HOLD_KINDS:
    held_aggregates.labels(_kind)
for _result in ("done", "skipped", "error"):
    cleaner_runs.labels(_result)
