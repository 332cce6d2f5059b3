#!/usr/bin/env bash
# Toxiproxy, the TCP proxy through which the fault tests inject network faults (latency, bandwidth,
# resets, black holes, slow closes) between the relay and MariaDB or the Kafka brokers.
#
#   bash deploy/local/toxiproxy.sh {build|up|down|status}
#
# `build` compiles github.com/Shopify/toxiproxy/v2/cmd/server (TOXIPROXY_VERSION) with
# `go install` from the Go module proxy into ~/.cache/outbox-relay/bin/toxiproxy-server-<version>
# (once; cached outside the work tree). `up` builds if needed, starts the server with its HTTP API
# on 127.0.0.1:${OUTBOX_TOXIPROXY_PORT:-18474} and returns once the API answers; idempotent.
# `down` stops what `up` started (pid file). Proxies and toxics are made by the tests over the
# API (tests/proxies.py); the server starts with none. State: ${OUTBOX_LOCAL_DIR:-<repo>/.local}/
# toxiproxy (pid file, log).
set -euo pipefail

# shellcheck source=deploy/local/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

TOXIPROXY_VERSION="${TOXIPROXY_VERSION:-v2.5.0}"
BIN_DIR="$HOME/.cache/outbox-relay/bin"
BIN="$BIN_DIR/toxiproxy-server-$TOXIPROXY_VERSION"
STATE_DIR="${OUTBOX_LOCAL_DIR:-$REPO_ROOT/.local}/toxiproxy"
PORT="${OUTBOX_TOXIPROXY_PORT:-18474}"
PID_FILE="$STATE_DIR/toxiproxy.pid"
LOG_FILE="$STATE_DIR/toxiproxy.log"

pid_alive() {
    local pid
    [ -s "$PID_FILE" ] || return 1
    pid="$(cat "$PID_FILE")"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$BIN"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

api_ok() {
    python3 - "$PORT" <<'EOF'
import sys, urllib.request
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/version", timeout=2) as r:
        sys.exit(0 if r.status == 200 else 1)
except OSError:
    sys.exit(1)
EOF
}

build() {
    [ -x "$BIN" ] && return 0
    command -v go >/dev/null 2>&1 || die "toxiproxy: go not found (install Go 1.19+ to build toxiproxy)"
    local tmp="$BIN_DIR/.build.$$"
    mkdir -p "$tmp" "$STATE_DIR"
    log "toxiproxy: building github.com/Shopify/toxiproxy/v2/cmd/server@$TOXIPROXY_VERSION into $BIN"
    # Run outside any module: go install fetches the pinned version from the module proxy.
    if ! (cd "$tmp" && GOBIN="$tmp" GOFLAGS=-buildvcs=false \
        go install "github.com/Shopify/toxiproxy/v2/cmd/server@$TOXIPROXY_VERSION") \
        >"$STATE_DIR/build.log" 2>&1; then
        rm -rf "$tmp"
        log "---- $STATE_DIR/build.log ----"
        tail -n 30 "$STATE_DIR/build.log" >&2 || true
        die "toxiproxy: go install failed"
    fi
    mv "$tmp/server" "$BIN"
    rm -rf "$tmp"
}

up() {
    mkdir -p "$STATE_DIR"
    if pid_alive; then
        if api_ok; then
            log "toxiproxy: already running (pid $(cat "$PID_FILE"), API 127.0.0.1:$PORT)"
            return 0
        fi
    else
        rm -f "$PID_FILE"
        build
        port_open "$PORT" && die "toxiproxy: port $PORT is taken by another process (set OUTBOX_TOXIPROXY_PORT)"
        log "toxiproxy: starting on 127.0.0.1:$PORT (log: $LOG_FILE)"
        setsid nohup "$BIN" -host 127.0.0.1 -port "$PORT" </dev/null >>"$LOG_FILE" 2>&1 9>&- &
        echo "$!" >"$PID_FILE"
    fi
    local deadline=$((SECONDS + 20))
    until api_ok; do
        if ! pid_alive; then
            tail -n 20 "$LOG_FILE" >&2 || true
            die "toxiproxy: exited during startup"
        fi
        [ "$SECONDS" -lt "$deadline" ] || die "toxiproxy: API not answering after 20s"
        sleep 0.1
    done
    log "toxiproxy: up (pid $(cat "$PID_FILE"), API 127.0.0.1:$PORT)"
}

down() {
    if ! pid_alive; then
        rm -f "$PID_FILE"
        log "toxiproxy: not running"
        return 0
    fi
    local pid i
    pid="$(cat "$PID_FILE")"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
    rm -f "$PID_FILE"
    log "toxiproxy: stopped"
}

status() {
    if pid_alive && api_ok; then
        echo "toxiproxy: up (pid $(cat "$PID_FILE"), API 127.0.0.1:$PORT, $TOXIPROXY_VERSION)"
    else
        echo "toxiproxy: down"
        return 1
    fi
}

[ $# -eq 1 ] || { echo "usage: $0 {build|up|down|status}" >&2; exit 2; }
case "$1" in
    build | up | down)
        mkdir -p "$STATE_DIR"
        exec 9>"$STATE_DIR/toxiproxy.lock"
        flock 9
        "$1"
        ;;
    status) status ;;
    *) echo "usage: $0 {build|up|down|status}" >&2; exit 2 ;;
esac
