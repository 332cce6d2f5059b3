#!/usr/bin/env bash
# The main job (README command 1):
#
#   bash deploy/local/run-demo.sh [--duration N] [--rate R] [relay demo args...]
#
# bootstrap (packages, venv) -> local MariaDB + Kafka up -> `relay demo`: the relay daemon with a
# simulated Service A (multi-table transactions writing outbox rows, some rolled back) and
# Service B (a Kafka consumer), printing throughput and commit-to-consume latency every second.
set -euo pipefail

# shellcheck source=deploy/local/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"
cd "$REPO_ROOT"

bash deploy/local/bootstrap.sh
bash deploy/local/servers.sh up

# The local servers of deploy/local/servers.sh (dev-only credentials); any RELAY_* already set wins.
# RELAY_DB__USER makes the database, the schema and the domain tables and is Service A: the local
# administrator. The relay runs as `relay`, with README's grants only (the demo grants them).
export RELAY_DB__HOST="${RELAY_DB__HOST:-127.0.0.1}"
export RELAY_DB__PORT="${RELAY_DB__PORT:-${OUTBOX_MARIADB_PORT:-3307}}"
export RELAY_DB__USER="${RELAY_DB__USER:-relay_admin}"
export RELAY_DB__PASSWORD="${RELAY_DB__PASSWORD:-relay_admin}"
export RELAY_DB__NAME="${RELAY_DB__NAME:-outbox}"
export RELAY_KAFKA__BOOTSTRAP_SERVERS="${RELAY_KAFKA__BOOTSTRAP_SERVERS:-127.0.0.1:${OUTBOX_KAFKA_PORT:-19092}}"
export RELAY_HTTP__PORT="${RELAY_HTTP__PORT:-0}"

exec .venv/bin/relay demo --relay-db-user "${OUTBOX_DEMO_RELAY_USER:-relay}" \
    --relay-db-password "${OUTBOX_DEMO_RELAY_PASSWORD:-relay}" "$@"
