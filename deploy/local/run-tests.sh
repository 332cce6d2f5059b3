#!/usr/bin/env bash
# The whole check, as CI runs it (README command 2):
#
#   bash deploy/local/run-tests.sh [pytest args...]
#
# bootstrap (packages, venv) -> servers up -> ruff check -> ruff format --check -> mypy -> pytest "$@".
# Stops at the first failure. Leaves MariaDB and Kafka running afterwards
# (stop them with: bash deploy/local/servers.sh down).
set -euo pipefail

# shellcheck source=deploy/local/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"
cd "$REPO_ROOT"

step() { log "==> $*"; }

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
step "pytest $*"
.venv/bin/pytest "$@"
log "all checks passed; MariaDB and Kafka are left running (bash deploy/local/servers.sh down)"
