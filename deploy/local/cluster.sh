#!/usr/bin/env bash
# A local 3-node Kafka cluster (KRaft, 3 combined broker+controller nodes) for the fault matrix,
# beside the single broker of servers.sh (which the fast tests use).
#
#   bash deploy/local/cluster.sh {up|down|status}
#   bash deploy/local/cluster.sh {kill|start} NODE          (NODE: 1, 2 or 3)
#   bash deploy/local/cluster.sh leader                     (prints the quorum's active controller)
#
# Same jars as servers.sh (~/.cache/outbox-relay/kafka-<version>/libs), own state dir
# ${OUTBOX_LOCAL_DIR:-<repo>/.local}/cluster (node<N>/data, node<N>/server.properties, logs/,
# run/). Replication factor 3 and min.insync.replicas=2 everywhere; heap -Xmx320m per node.
#
# Ports, from OUTBOX_CLUSTER_PORT_BASE (29300), for node N in 1..3:
#   base+N     (29301-29303) PLAINTEXT: clients and inter-broker traffic
#   base+10+N  (29311-29313) CONTROLLER (the KRaft quorum)
#   base+20+N  (29321-29323) PROXIED listener, advertised as 127.0.0.1:base+30+N
#   base+30+N  (29331-29333) where a TCP proxy (toxiproxy, tests/proxies.py) listens and forwards
#                            to base+20+N: a client bootstrapped there stays on the proxies.
#
# `up` is idempotent and returns only when an idempotent acks=all produce to a topic with
# replication factor 3 works with all 3 brokers in the ISR of every partition of every topic.
# `kill N` sends SIGKILL (kill -9) and reaps; `start N` starts a stopped node and returns when it
# is back in every ISR. `down` stops what `up` started (SIGTERM, SIGKILL after 30 s); data is kept
# (reset: `cluster.sh down && rm -rf .local/cluster`).
# Extra broker properties (one `key=value` per line) for every node: OUTBOX_CLUSTER_PROPERTIES;
# they apply when a node starts.
set -euo pipefail

# shellcheck source=deploy/local/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

STATE_DIR="${OUTBOX_LOCAL_DIR:-$REPO_ROOT/.local}/cluster"
LOG_DIR="$STATE_DIR/logs"
RUN_DIR="$STATE_DIR/run"
NODES=(1 2 3)
BASE="${OUTBOX_CLUSTER_PORT_BASE:-29300}"
HEAP="${OUTBOX_CLUSTER_HEAP:-320m}"
UP_DEADLINE="${OUTBOX_CLUSTER_UP_DEADLINE:-120}"
EXTRA_PROPERTIES="${OUTBOX_CLUSTER_PROPERTIES:-}"
PROBE_TOPIC=_cluster_probe

KAFKA_POM="$LOCAL_DIR_SCRIPTS/kafka/pom.xml"
KAFKA_VERSION="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$KAFKA_POM")"
KAFKA_LIBS="$HOME/.cache/outbox-relay/kafka-$KAFKA_VERSION/libs"
PYTHON="${PYTHON:-$REPO_ROOT/.venv/bin/python}"

# C1 only and a serial collector: three JVMs start and idle cheaply on 2 cores.
JVM_OPTS=(-Xmx"$HEAP" -Xms96m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true)

client_port() { echo $((BASE + $1)); }
controller_port() { echo $((BASE + 10 + $1)); }
proxied_port() { echo $((BASE + 20 + $1)); }
proxy_port() { echo $((BASE + 30 + $1)); }
node_dir() { echo "$STATE_DIR/node$1"; }
node_pid() { echo "$RUN_DIR/node$1.pid"; }
node_log() { echo "$LOG_DIR/node$1.log"; }
node_properties() { echo "$(node_dir "$1")/server.properties"; }

bootstrap() {
    local n out=""
    for n in "${NODES[@]}"; do out+="${out:+,}127.0.0.1:$(client_port "$n")"; done
    echo "$out"
}

voters() {
    local n out=""
    for n in "${NODES[@]}"; do out+="${out:+,}$n@127.0.0.1:$(controller_port "$n")"; done
    echo "$out"
}

# ---------------------------------------------------------------- process helpers

# pid_alive PIDFILE NEEDLE: the pid in PIDFILE runs and its command line contains NEEDLE.
pid_alive() {
    local pidfile="$1" needle="$2" pid
    [ -s "$pidfile" ] || return 1
    pid="$(cat "$pidfile")"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$needle"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

node_alive() { pid_alive "$(node_pid "$1")" "$(node_properties "$1")"; }

tail_log() {
    log "---- last lines of $1 ----"
    tail -n "${2:-40}" "$1" >&2 2>/dev/null || true
    log "---- end of $1 ----"
}

check_node() {
    case "$1" in
        1 | 2 | 3) ;;
        *) die "no node '$1' (nodes: ${NODES[*]})" ;;
    esac
}

# ---------------------------------------------------------------- jars, config, storage

# The jars servers.sh uses, fetched the same way when missing (same cache, same marker).
fetch_jars() {
    local want have
    want="$(sha256sum "$KAFKA_POM" | cut -d' ' -f1)"
    have="$(cat "$KAFKA_LIBS/.pom.sha256" 2>/dev/null || true)"
    [ "$want" = "$have" ] && return 0
    ensure_java_and_maven
    local tmp="$KAFKA_LIBS.tmp.$$"
    rm -rf "$tmp"
    mkdir -p "$(dirname "$KAFKA_LIBS")" "$LOG_DIR"
    log "cluster: fetching Kafka $KAFKA_VERSION jars from Maven Central into $KAFKA_LIBS"
    if ! mvn -q -B -Dstyle.color=never -f "$KAFKA_POM" dependency:copy-dependencies \
        -DoutputDirectory="$tmp" >"$LOG_DIR/kafka-fetch.log" 2>&1; then
        rm -rf "$tmp"
        tail_log "$LOG_DIR/kafka-fetch.log"
        die "cluster: mvn dependency:copy-dependencies failed"
    fi
    echo "$want" >"$tmp/.pom.sha256"
    rm -rf "$KAFKA_LIBS"
    mv "$tmp" "$KAFKA_LIBS"
}

write_config() {
    local n="$1" dir
    dir="$(node_dir "$n")"
    mkdir -p "$dir/data"
    cat >"$(node_properties "$n")" <<EOF
# Generated by deploy/local/cluster.sh when the node starts; edit the script, not this file.
node.id=$n
process.roles=broker,controller
listeners=PLAINTEXT://127.0.0.1:$(client_port "$n"),CONTROLLER://127.0.0.1:$(controller_port "$n"),PROXIED://127.0.0.1:$(proxied_port "$n")
advertised.listeners=PLAINTEXT://127.0.0.1:$(client_port "$n"),CONTROLLER://127.0.0.1:$(controller_port "$n"),PROXIED://127.0.0.1:$(proxy_port "$n")
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,PROXIED:PLAINTEXT
controller.quorum.voters=$(voters)
log.dirs=$dir/data
num.partitions=6
default.replication.factor=3
min.insync.replicas=2
auto.create.topics.enable=false
offsets.topic.replication.factor=3
offsets.topic.num.partitions=3
transaction.state.log.replication.factor=3
transaction.state.log.min.isr=2
transaction.state.log.num.partitions=3
share.coordinator.state.topic.replication.factor=3
share.coordinator.state.topic.min.isr=2
group.initial.rebalance.delay.ms=0
delete.topic.enable=true
# A node that stops heartbeating is fenced (and leaves every ISR) after 6 s, not 9 s.
broker.heartbeat.interval.ms=1000
broker.session.timeout.ms=6000
replica.lag.time.max.ms=10000
num.network.threads=2
num.io.threads=2
num.replica.fetchers=1
num.recovery.threads.per.data.dir=1
background.threads=2
log.cleaner.threads=1
log.retention.hours=6
log.segment.bytes=33554432
EOF
    if [ -n "$EXTRA_PROPERTIES" ]; then
        printf '# OUTBOX_CLUSTER_PROPERTIES\n%s\n' "$EXTRA_PROPERTIES" >>"$(node_properties "$n")"
    fi
    cat >"$dir/log4j2.properties" <<'EOF'
# Generated by deploy/local/cluster.sh. stdout is appended to logs/node<N>.log.
status = warn
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = STDOUT
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.clients.name = org.apache.kafka.clients
logger.clients.level = WARN
EOF
}

new_cluster_id() {
    # Kafka's Uuid.randomUuid(): 16 random bytes, url-safe base64 without padding, not starting with '-'.
    python3 - <<'EOF'
import base64, os
while True:
    s = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
    if not s.startswith("-"):
        print(s)
        break
EOF
}

# All three nodes share one cluster id, made once (static quorum: controller.quorum.voters).
format_storage() {
    local n cid
    cid="$(cat "$STATE_DIR/cluster.id" 2>/dev/null || true)"
    if [ -z "$cid" ]; then
        cid="$(new_cluster_id)"
        echo "$cid" >"$STATE_DIR/cluster.id"
    fi
    for n in "${NODES[@]}"; do
        [ -f "$(node_dir "$n")/data/meta.properties" ] && continue
        log "cluster: formatting node $n (cluster id $cid)"
        java -Xmx128m -XX:TieredStopAtLevel=1 -Dlog4j2.configurationFile="$(node_dir "$n")/log4j2.properties" \
            -cp "$KAFKA_LIBS/*" kafka.tools.StorageTool format --ignore-formatted \
            --cluster-id "$cid" --config "$(node_properties "$n")" >>"$(node_log "$n")" 2>&1 \
            || { tail_log "$(node_log "$n")"; die "cluster: storage format of node $n failed"; }
    done
}

# check_ports N...: dies when a port of one of these (stopped) nodes is taken.
check_ports() {
    local n p
    for n in "$@"; do
        node_alive "$n" && continue
        for p in "$(client_port "$n")" "$(controller_port "$n")" "$(proxied_port "$n")"; do
            port_open "$p" && die "cluster: port $p of node $n is taken by another process (set OUTBOX_CLUSTER_PORT_BASE)"
        done
    done
    return 0
}

launch() {
    local n="$1"
    if node_alive "$n"; then
        return 0
    fi
    rm -f "$(node_pid "$n")"
    check_ports "$n"
    write_config "$n"
    log "cluster: starting node $n on 127.0.0.1:$(client_port "$n") (log: $(node_log "$n"))"
    # setsid: own session, so signals to the caller's process group do not reach the node.
    setsid nohup java "${JVM_OPTS[@]}" \
        -Dlog4j2.configurationFile="$(node_dir "$n")/log4j2.properties" \
        -cp "$KAFKA_LIBS/*" kafka.Kafka "$(node_properties "$n")" \
        </dev/null >>"$(node_log "$n")" 2>&1 9>&- &
    echo "$!" >"$(node_pid "$n")"
}

# ---------------------------------------------------------------- readiness

# probe BROKERS: exit 0 when BROKERS brokers are registered, every partition of every topic has a
# leader and its whole replica set in the ISR (all nodes up: full ISRs), and an idempotent
# acks=all produce to the probe topic (replication factor 3) is acknowledged. Reasons on stderr.
probe() {
    "$PYTHON" - "$(bootstrap)" "$1" "$PROBE_TOPIC" <<'EOF'
import asyncio
import sys

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

bootstrap, brokers, topic = sys.argv[1], int(sys.argv[2]), sys.argv[3]


async def check() -> str | None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    await admin.start()
    try:
        cluster = await admin.describe_cluster()
        alive = sorted(b["node_id"] for b in cluster["brokers"])
        if len(alive) < brokers:
            return f"brokers registered: {alive}"
        names = await admin.list_topics()
        if topic not in names:
            await admin.create_topics([NewTopic(topic, 3, 3)])
            return "probe topic created"
        for described in await admin.describe_topics(list(names)):
            if described.get("error_code", 0):
                return f"topic {described['topic']}: error {described['error_code']}"
            for p in described["partitions"]:
                if p["leader"] < 0 or sorted(p["isr"]) != sorted(p["replicas"]):
                    return f"{described['topic']}/{p['partition']}: leader {p['leader']} isr {p['isr']} replicas {p['replicas']}"
    finally:
        await admin.close()
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, enable_idempotence=True, acks="all", request_timeout_ms=5000
    )
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"probe", key=b"probe")
    finally:
        await producer.stop()
    return None


async def main() -> int:
    try:
        async with asyncio.timeout(20):
            problem = await check()
    except (KafkaError, OSError, TimeoutError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return 0


sys.exit(asyncio.run(main()))
EOF
}

# wait_healthy WHAT: until probe 3 passes; dies (with the nodes' logs) after UP_DEADLINE.
wait_healthy() {
    local deadline=$((SECONDS + UP_DEADLINE)) err="$RUN_DIR/probe.err" n
    until probe 3 2>"$err"; do
        for n in "${NODES[@]}"; do
            if ! node_alive "$n"; then
                tail_log "$(node_log "$n")" 60
                die "cluster: node $n exited while waiting for $1"
            fi
        done
        if [ "$SECONDS" -ge "$deadline" ]; then
            cat "$err" >&2 || true
            for n in "${NODES[@]}"; do tail_log "$(node_log "$n")" 20; done
            die "cluster: $1 not reached after ${UP_DEADLINE}s"
        fi
        sleep 0.5
    done
    rm -f "$err"
}

# ---------------------------------------------------------------- actions

cluster_up() {
    mkdir -p "$STATE_DIR" "$LOG_DIR" "$RUN_DIR"
    [ -x "$PYTHON" ] || die "cluster: $PYTHON not found (run deploy/local/bootstrap.sh or set PYTHON)"
    local n all_alive=1
    for n in "${NODES[@]}"; do node_alive "$n" || all_alive=0; done
    if [ "$all_alive" -eq 1 ] && probe 3 2>/dev/null; then
        log "cluster: already up ($(bootstrap))"
        return 0
    fi
    check_ports "${NODES[@]}"
    ensure_java_and_maven
    fetch_jars
    for n in "${NODES[@]}"; do node_alive "$n" || write_config "$n"; done
    format_storage
    for n in "${NODES[@]}"; do launch "$n"; done
    wait_healthy "3 brokers with full ISRs and an acks=all produce"
    log "cluster: up ($(bootstrap); proxied listeners advertised at 127.0.0.1:$(proxy_port 1)-$(proxy_port 3))"
}

cluster_down() {
    local n pid pids=()
    for n in "${NODES[@]}"; do
        if node_alive "$n"; then
            pid="$(cat "$(node_pid "$n")")"
            log "cluster: stopping node $n (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
    done
    local deadline=$((SECONDS + 30))
    for pid in "${pids[@]}"; do
        while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then
            log "cluster: pid $pid still running after 30s, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
        fi
    done
    for n in "${NODES[@]}"; do rm -f "$(node_pid "$n")"; done
    log "cluster: down"
}

cluster_status() {
    local n rc=0
    for n in "${NODES[@]}"; do
        if node_alive "$n" && port_open "$(client_port "$n")"; then
            echo "cluster node $n: up (pid $(cat "$(node_pid "$n")"), 127.0.0.1:$(client_port "$n"), controller $(controller_port "$n"), proxied $(proxied_port "$n") advertised as $(proxy_port "$n"))"
        else
            echo "cluster node $n: down"
            rc=1
        fi
    done
    return "$rc"
}

node_kill() {
    local n="$1" pid
    check_node "$n"
    if ! node_alive "$n"; then
        log "cluster: node $n not running"
        return 0
    fi
    pid="$(cat "$(node_pid "$n")")"
    kill -KILL "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
    rm -f "$(node_pid "$n")"
    log "cluster: node $n killed (kill -9 $pid)"
}

node_start() {
    local n="$1"
    check_node "$n"
    mkdir -p "$LOG_DIR" "$RUN_DIR"
    launch "$n"
    wait_healthy "node $n back in every ISR"
    log "cluster: node $n up (127.0.0.1:$(client_port "$n"))"
}

# The active controller (the KRaft quorum's leader): the leader of the highest epoch in the running
# nodes' quorum-state files, which each node writes at every election. (The jars servers.sh
# fetches have no kafka-tools, hence no MetadataQuorumCommand.)
quorum_leader() {
    local n files=()
    for n in "${NODES[@]}"; do
        node_alive "$n" && files+=("$(node_dir "$n")/data/__cluster_metadata-0/quorum-state")
    done
    [ "${#files[@]}" -gt 0 ] || die "cluster: no node running"
    python3 - "${files[@]}" <<'EOF'
import json, sys
states = [json.load(open(path)) for path in sys.argv[1:]]
best = max(states, key=lambda s: s.get("leaderEpoch", -1))
if best.get("leaderId", -1) < 0:
    sys.exit("no quorum leader recorded yet")
print(best["leaderId"])
EOF
}

usage() { echo "usage: $0 {up|down|status|leader} | {kill|start} NODE" >&2; exit 2; }

[ $# -ge 1 ] || usage
action="$1"
case "$action" in
    up | down | status | leader) [ $# -eq 1 ] || usage ;;
    kill | start) [ $# -eq 2 ] || usage ;;
    *) usage ;;
esac

# Serialise changes of this state dir (test fixtures and scripts).
if [ "$action" != status ] && [ "$action" != leader ]; then
    mkdir -p "$RUN_DIR"
    exec 9>"$RUN_DIR/cluster.lock"
    flock 9
fi

case "$action" in
    up) cluster_up ;;
    down) cluster_down ;;
    status) cluster_status ;;
    leader) quorum_leader ;;
    kill) node_kill "$2" ;;
    start) node_start "$2" ;;
esac
