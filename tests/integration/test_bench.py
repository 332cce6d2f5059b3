"""`relay bench --mode rate` end to end against the real servers: nothing lost, nothing leaked.

No timing assertions here: the timing goals live in benchmarks/README.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from servers import REPO_ROOT, Kafka, MariaDB

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RATE = 500
DURATION_S = 20


def test_bench_rate_loses_nothing(mariadb: MariaDB, kafka: Kafka) -> None:
    env = {
        **os.environ,
        "RELAY_DB__HOST": mariadb.host,
        "RELAY_DB__PORT": str(mariadb.port),
        "RELAY_DB__USER": mariadb.user,
        "RELAY_DB__PASSWORD": mariadb.password,
        "RELAY_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap,
    }
    argv = [sys.executable, "-m", "relay", "bench", "--mode", "rate", "--json"]
    argv += ["--rate", str(RATE), "--duration", str(DURATION_S), "--idle-seconds", "2"]
    proc = subprocess.run(  # noqa: S603 - our own CLI
        argv, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.stdout.strip(), f"no report; stderr:\n{proc.stderr[-4000:]}"
    report = json.loads(proc.stdout)
    rate = report["rate"]
    expected = RATE * DURATION_S
    assert rate["lost"] == 0, rate
    assert rate["rolled_back_delivered"] == 0, rate
    assert rate["order_violations"] == 0, rate["order_violation_examples"]
    assert rate["received"] > 0.9 * expected, rate
    assert rate["rolled_back"] > 0  # the rollback path was exercised
    assert proc.returncode == 0, proc.stderr[-4000:]
