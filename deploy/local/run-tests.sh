#!/usr/bin/env bash
# The whole check, as CI runs it (README command 2):
#
#   bash deploy/local/run-tests.sh [pytest args...]
#
# bootstrap (packages, venv) -> servers up -> ruff check -> ruff format --check -> mypy -> pytest "$@".
# Stops at the first failure. Leaves MariaDB and Kafka running afterwards
# (stop them with: bash deploy/local/servers.sh down).
#
#   bash deploy/local/run-tests.sh --slow [pytest args...]
#
# The same steps, but pytest runs the fault suite only (-m fault, figures printed: -s) with the
# 10-minute chaos soak (OUTBOX_SOAK_S=600 instead of CI's 120) and records the results under
# benchmarks/results/: fault-matrix.txt (OUTBOX_FAULT_RECORD=1: the matrix, the kill -9 test and
# the soak's table) and soak-600s.json + soak-600s.md (OUTBOX_SOAK_RESULTS). About 20 minutes.
# It restarts the shared servers (test_broker_restart.py, test_db_restart.py) like the full run.
set -euo pipefail

slow=0
if [ "${1:-}" = "--slow" ]; then
    slow=1
    shift
fi

# shellcheck source=deploy/local/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"
cd "$REPO_ROOT"

step() { log "==> $*"; }
# Free space where the servers and the tests write (a full disk fails tests in confusing ways).
disk_free() { log "disk free: $(df -Ph "$REPO_ROOT" | awk 'NR == 2 {print $4}') under $REPO_ROOT, $(df -Ph "${TMPDIR:-/tmp}" | awk 'NR == 2 {print $4}') under ${TMPDIR:-/tmp}"; }
trap 'rc=$?; [ "$rc" = 0 ] || disk_free; exit "$rc"' EXIT

step "bootstrap"
bash deploy/local/bootstrap.sh
step "servers up"
bash deploy/local/servers.sh up
step "ruff check"
.venv/bin/ruff check .
step "ruff format --check"
.venv/bin/ruff format --check .
step "mypy"
.venv/bin/mypy
disk_free
if [ "$slow" = 1 ]; then
    export OUTBOX_SOAK_S="${OUTBOX_SOAK_S:-600}"
    export OUTBOX_SOAK_RESULTS="${OUTBOX_SOAK_RESULTS:-benchmarks/results}"
    export OUTBOX_FAULT_RECORD=1
    step "pytest -m fault -s $* (soak ${OUTBOX_SOAK_S} s; results in benchmarks/results)"
    .venv/bin/pytest -m fault -s "$@"
else
    step "pytest $*"
    .venv/bin/pytest "$@"
fi
log "all checks passed; MariaDB and Kafka are left running (bash deploy/local/servers.sh down)"
