"""`relay bench` end to end against the real servers, with the plain-SQL writer (no wake-up):
`--mode rate` and a two-step `--mode capacity` (its writers in two processes) lose nothing,
leak nothing, keep order.

No timing assertions here: the timing goals live in benchmarks/README.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
from servers import REPO_ROOT, Kafka, MariaDB

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RATE_TXN_PER_S = 250  # 1-3 events per transaction, 5% rolled back: ~475 events/s
DURATION_S = 20


def bench(mariadb: MariaDB, kafka: Kafka, *options: str) -> tuple[dict[str, Any], str]:
    """Run `relay bench --json ...`: the report, and stderr (logs and live progress).

    As the administrator, not the relay's least-privilege user: the bench is a load tool that
    creates its scratch database and tables and writes the rows, and its relay shares its
    settings (the least-privilege relay is what the rest of the suite runs)."""
    env = {
        **os.environ,
        "RELAY_DB__HOST": mariadb.host,
        "RELAY_DB__PORT": str(mariadb.port),
        "RELAY_DB__USER": mariadb.user,
        "RELAY_DB__PASSWORD": mariadb.password,
        "RELAY_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap,
    }
    argv = [sys.executable, "-m", "relay", "bench", "--json", "--idle-seconds", "1", *options]
    proc = subprocess.run(  # noqa: S603 - our own CLI
        argv, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.stdout.strip(), f"no report; stderr:\n{proc.stderr[-4000:]}"
    report: dict[str, Any] = json.loads(proc.stdout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return report, proc.stderr


def assert_delivered(section: dict[str, Any]) -> None:
    assert section["lost"] == 0, section
    assert section["rolled_back_delivered"] == 0, section
    assert section["order_violations"] == 0, section["order_violation_examples"]
    assert section["drained"], section
    assert section["rolled_back"] > 0  # the rollback path was exercised


def test_bench_rate_plain_sql_loses_nothing(mariadb: MariaDB, kafka: Kafka) -> None:
    options = ("--mode", "rate", "--rate", str(RATE_TXN_PER_S), "--duration", str(DURATION_S))
    report, stderr = bench(mariadb, kafka, *options)
    rate = report["rate"]
    assert (rate["writer"], rate["wakeup"]) == ("sql", False)
    assert report["config"]["rate_unit"] == "txn/s"
    assert_delivered(rate)
    expected_events = RATE_TXN_PER_S * DURATION_S * 2 * 0.95
    assert rate["received"] > 0.9 * expected_events, rate
    assert rate["relay"]["exit_code"] == 0
    assert "p99 ms" in stderr  # live progress: a header, then a line a second
    progress = [line for line in stderr.splitlines() if line.split()[1:2] == ["rate"]]
    assert len(progress) >= DURATION_S // 2, stderr[-4000:]


def test_bench_capacity_smoke(mariadb: MariaDB, kafka: Kafka) -> None:
    """Two short steps: the search, its per-step verdicts and the delivery checks; Service A in
    two processes, which report their commits to the bench in batches."""
    report, stderr = bench(
        mariadb,
        kafka,
        *("--mode", "capacity", "--rate", "100", "--max-rate", "150"),
        *("--duration", "3", "--max-steps", "2", "--writer-processes", "2"),
    )
    assert report["config"]["writer_processes"] == 2
    result = report["capacity"]
    assert (result["writer"], result["wakeup"]) == ("sql", False)
    assert_delivered(result)
    assert result["foreign"] == 0  # both processes' message ids are the run's
    steps = result["steps"]
    assert [s["target_txn_per_s"] for s in steps] == [100, 150]
    for step in steps:
        assert step["committed_events_per_s"] > 0, step
        assert step["transactions"] > 0, step  # the processes' statistics reach the report
        assert step["writer_processes_cpu_s"] > 0, step
        assert step["latency_from_tx_start_ms"]["count"] > 0, step
        assert step["passed"] == (not step["reasons"]), step
    timed = sum(s["latency_from_tx_start_ms"]["count"] for s in steps)
    assert timed >= 0.99 * result["received"], (timed, result["received"])
    assert result["result"]["stopped"] in ("max_rate", "converged", "max_steps")
    assert "step 2 (ramp)" in stderr
