#!/usr/bin/env bash
# Project-owned MariaDB and Kafka (KRaft, one node) for development and tests.
#
#   bash deploy/local/servers.sh {up|down|status} [mariadb|kafka]     (no 2nd argument = both)
#
# State lives under ${OUTBOX_LOCAL_DIR:-<repo>/.local}: mariadb/data, kafka/data, logs/, run/.
# `up` is idempotent and returns once the server really works (SQL over TCP as the relay user;
# a Kafka produce/consume round trip). `down` stops only what `up` started (by pid file).
# Ports: OUTBOX_MARIADB_PORT (3307), OUTBOX_KAFKA_PORT (19092), OUTBOX_KAFKA_CONTROLLER_PORT (19093),
# OUTBOX_KAFKA_SSL_PORT (19094: TLS, client certificate required), OUTBOX_KAFKA_SASL_PORT (19095:
# SASL_SSL, SCRAM-SHA-512). TLS everywhere from a test CA made by certs.sh under <state>/certs.
set -euo pipefail

# shellcheck source=deploy/local/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

STATE_DIR="${OUTBOX_LOCAL_DIR:-$REPO_ROOT/.local}"
LOG_DIR="$STATE_DIR/logs"
RUN_DIR="$STATE_DIR/run"
CERTS_DIR="$STATE_DIR/certs"

MARIADB_PORT="${OUTBOX_MARIADB_PORT:-3307}"
MARIADB_DIR="$STATE_DIR/mariadb"
MARIADB_DATA="$MARIADB_DIR/data"
MARIADB_SOCKET="$RUN_DIR/mariadb.sock"
MARIADB_TMP="$MARIADB_DIR/tmp" # its temporary files (big transactions' binlog caches, sorts)
MARIADB_PID="$RUN_DIR/mariadb.pid"
MARIADB_LOG="$LOG_DIR/mariadb.log"
# dev-only users, documented in deploy/local/README.md (mariadb_provision creates them):
# relay (the daemon, README "Grants"), relay_migrate (`relay migrate`), service_a (Service A's
# INSERT), relay_admin (the test harness's and tools' administrator). The probes log in as relay.
MARIADB_USER=relay
MARIADB_PASSWORD=relay

KAFKA_PORT="${OUTBOX_KAFKA_PORT:-19092}"
KAFKA_CONTROLLER_PORT="${OUTBOX_KAFKA_CONTROLLER_PORT:-19093}"
KAFKA_SSL_PORT="${OUTBOX_KAFKA_SSL_PORT:-19094}"
KAFKA_SASL_PORT="${OUTBOX_KAFKA_SASL_PORT:-19095}"
KAFKA_SCRAM_USER=relay
KAFKA_SCRAM_PASSWORD=relay # dev-only credentials, documented in deploy/local/README.md
KAFKA_POM="$LOCAL_DIR_SCRIPTS/kafka/pom.xml"
KAFKA_VERSION="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$KAFKA_POM")"
KAFKA_LIBS="$HOME/.cache/outbox-relay/kafka-$KAFKA_VERSION/libs"
KAFKA_DIR="$STATE_DIR/kafka"
KAFKA_DATA="$KAFKA_DIR/data"
KAFKA_PID="$RUN_DIR/kafka.pid"
KAFKA_LOG="$LOG_DIR/kafka.log"
KAFKA_UP_DEADLINE="${OUTBOX_KAFKA_UP_DEADLINE:-90}"

PYTHON="${PYTHON:-$REPO_ROOT/.venv/bin/python}"

ensure_certs() { bash "$LOCAL_DIR_SCRIPTS/certs.sh" "$CERTS_DIR"; }

# ---------------------------------------------------------------- process helpers

# pid_alive PIDFILE NEEDLE: true when the pid in PIDFILE runs and its command line contains NEEDLE
# (guards against a recycled pid after a reboot or crash).
pid_alive() {
    local pidfile="$1" needle="$2" pid
    [ -s "$pidfile" ] || return 1
    pid="$(cat "$pidfile")"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$needle"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# stop_pidfile NAME PIDFILE NEEDLE TIMEOUT: SIGTERM, wait for exit, SIGKILL after TIMEOUT seconds.
stop_pidfile() {
    local name="$1" pidfile="$2" needle="$3" timeout="$4" pid i
    if ! pid_alive "$pidfile" "$needle"; then
        rm -f "$pidfile"
        log "$name: not running"
        return 0
    fi
    pid="$(cat "$pidfile")"
    log "$name: stopping pid $pid"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < timeout * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name: still running after ${timeout}s, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    fi
    rm -f "$pidfile"
    log "$name: stopped"
}

tail_log() {
    log "---- last lines of $1 ----"
    tail -n "${2:-40}" "$1" >&2 2>/dev/null || true
    log "---- end of $1 ----"
}

# ---------------------------------------------------------------- MariaDB

# Admin access over the private socket with unix_socket auth: root@localhost when we are root;
# otherwise mariadb-install-db's --auth-root-socket-user account, named after our OS user.
mariadb_root() { mariadb --no-defaults --socket="$MARIADB_SOCKET" -u"$(id -un)" "$@"; }

mariadb_tcp_ok() {
    mariadb --no-defaults --protocol=TCP -h127.0.0.1 -P"$MARIADB_PORT" \
        -u"$MARIADB_USER" -p"$MARIADB_PASSWORD" --connect-timeout=3 -N -e 'SELECT 1' >/dev/null 2>&1
}

# TLS as a client checking the server certificate against the test CA: the session's cipher.
mariadb_tls_cipher() {
    mariadb --no-defaults --protocol=TCP -h127.0.0.1 -P"$MARIADB_PORT" \
        -u"$MARIADB_USER" -p"$MARIADB_PASSWORD" --connect-timeout=3 \
        --ssl --ssl-ca="$CERTS_DIR/ca.pem" --ssl-verify-server-cert \
        -N -e "SHOW SESSION STATUS LIKE 'Ssl_cipher'" 2>/dev/null | cut -f2
}

mariadb_user_args() {
    # mariadbd refuses to run as root unless told to; as another user it simply runs as that user.
    if [ "$(id -u)" -eq 0 ]; then echo "--user=root"; fi
}

mariadb_init_datadir() {
    [ -d "$MARIADB_DATA/mysql" ] && return 0
    local tmp="$MARIADB_DIR/data.init"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    log "mariadb: initialising $MARIADB_DATA"
    # shellcheck disable=SC2046
    if ! mariadb-install-db --no-defaults --datadir="$tmp" $(mariadb_user_args) \
        --auth-root-authentication-method=socket --auth-root-socket-user="$(id -un)" \
        --skip-test-db --skip-name-resolve >"$LOG_DIR/mariadb-install-db.log" 2>&1; then
        tail_log "$LOG_DIR/mariadb-install-db.log"
        die "mariadb-install-db failed"
    fi
    mv "$tmp" "$MARIADB_DATA" # atomic: a half-initialised datadir is never left behind
}

# The README's ("Grants") daemon grants on the outbox tables of database outbox that exist:
# a GRANT on a missing table fails, and `relay migrate` creates them (`relay demo
# --relay-db-user relay`, as run-demo.sh runs it, grants them itself after migrating).
mariadb_relay_table_grants() {
    local table privileges
    for table in outbox outbox_shard outbox_hold outbox_meta; do
        case "$table" in
            outbox) privileges="SELECT, UPDATE, DELETE" ;;
            outbox_shard) privileges="SELECT, UPDATE" ;;
            outbox_hold) privileges="SELECT, INSERT, UPDATE, DELETE" ;;
            outbox_meta) privileges="SELECT" ;;
        esac
        mariadb_grant_if_table "$privileges" "$table" "$MARIADB_USER"
    done
}

# GRANT <privileges> ON outbox.<table> TO <user> at both hosts, printed, if the table exists.
mariadb_grant_if_table() {
    local privileges="$1" table="$2" user="$3" host
    if [ -n "$(mariadb_root -N -e "SELECT 1 FROM information_schema.tables
        WHERE table_schema = 'outbox' AND table_name = '$table'")" ]; then
        for host in % localhost; do
            echo "GRANT $privileges ON \`outbox\`.\`$table\` TO '$user'@'$host';"
        done
    fi
}

mariadb_provision() {
    # Idempotent and converging (an older servers.sh made `relay` all-privileged: that goes);
    # dev-only credentials, user name = password. Both hosts '%' and 'localhost' each.
    # - relay_admin: ALL WITH GRANT OPTION. Only the test harness and the tools' set-up use it
    #   (create/drop the tests' outbox_t_* databases, seed and inspect rows, grant the relay).
    # - relay_migrate: README's migrate user, on outbox and (wildcard) every outbox_t_* database.
    # - relay: exactly README's daemon grants, table by table (mariadb_relay_table_grants); the
    #   tests grant it the same on each test database after migrating (tests/servers.py).
    # - service_a: Service A's INSERT on outbox.outbox (granted once that table exists).
    # The global-level REVOKEs leave the table grants of running tests' databases alone.
    {
        cat <<'SQL'
CREATE DATABASE IF NOT EXISTS outbox CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;
CREATE USER IF NOT EXISTS 'relay_admin'@'%' IDENTIFIED BY 'relay_admin';
CREATE USER IF NOT EXISTS 'relay_admin'@'localhost' IDENTIFIED BY 'relay_admin';
GRANT ALL PRIVILEGES ON *.* TO 'relay_admin'@'%' WITH GRANT OPTION;
GRANT ALL PRIVILEGES ON *.* TO 'relay_admin'@'localhost' WITH GRANT OPTION;
CREATE USER IF NOT EXISTS 'relay_migrate'@'%' IDENTIFIED BY 'relay_migrate';
CREATE USER IF NOT EXISTS 'relay_migrate'@'localhost' IDENTIFIED BY 'relay_migrate';
GRANT CREATE, ALTER, INDEX, SELECT, INSERT, UPDATE ON `outbox`.* TO 'relay_migrate'@'%';
GRANT CREATE, ALTER, INDEX, SELECT, INSERT, UPDATE ON `outbox`.* TO 'relay_migrate'@'localhost';
GRANT CREATE, ALTER, INDEX, SELECT, INSERT, UPDATE ON `outbox\_t\_%`.* TO 'relay_migrate'@'%';
GRANT CREATE, ALTER, INDEX, SELECT, INSERT, UPDATE ON `outbox\_t\_%`.* TO 'relay_migrate'@'localhost';
CREATE USER IF NOT EXISTS 'service_a'@'%' IDENTIFIED BY 'service_a';
CREATE USER IF NOT EXISTS 'service_a'@'localhost' IDENTIFIED BY 'service_a';
SQL
        local host
        for host in % localhost; do
            echo "CREATE USER IF NOT EXISTS '$MARIADB_USER'@'$host' IDENTIFIED BY '$MARIADB_PASSWORD';"
            echo "REVOKE ALL PRIVILEGES ON *.* FROM '$MARIADB_USER'@'$host';"
            echo "REVOKE GRANT OPTION ON *.* FROM '$MARIADB_USER'@'$host';"
        done
        mariadb_relay_table_grants
        mariadb_grant_if_table INSERT outbox service_a
    } | mariadb_root
}

mariadb_up() {
    local started=0
    mkdir -p "$MARIADB_DIR" "$MARIADB_TMP" "$LOG_DIR" "$RUN_DIR"
    if pid_alive "$MARIADB_PID" "$MARIADB_DATA"; then
        if mariadb_root -N -e 'SELECT 1' >/dev/null 2>&1; then
            mariadb_provision # converges the users of a server provisioned by an older script
            if mariadb_tcp_ok; then
                log "mariadb: already running (pid $(cat "$MARIADB_PID"), 127.0.0.1:$MARIADB_PORT)"
                mariadb_warn_without_tls
                return 0
            fi
        fi
        log "mariadb: pid $(cat "$MARIADB_PID") runs but does not answer yet; waiting"
    else
        rm -f "$MARIADB_PID"
        ensure_mariadb_installed
        if port_open "$MARIADB_PORT"; then
            die "mariadb: port $MARIADB_PORT is taken by another process (set OUTBOX_MARIADB_PORT)"
        fi
        mariadb_init_datadir
        ensure_certs
        local mariadbd
        mariadbd="$(mariadbd_path)"
        log "mariadb: starting $mariadbd on 127.0.0.1:$MARIADB_PORT (log: $MARIADB_LOG)"
        # --no-defaults: ignore /etc/mysql (the machine's service config); everything is explicit.
        # The binary log (RELAY_WAKEUP__BINLOG follows it) in 16 MB files purged after 60 s: a full
        # test run writes over 1 GB of them. Temporary files (the binlog cache of a big
        # transaction, sorts) under the state dir, not /tmp.
        # setsid: own session, so Ctrl-C / signals to the caller's process group (e.g. pytest
        # that auto-started the server) do not reach the server.
        # shellcheck disable=SC2046
        setsid nohup "$mariadbd" --no-defaults $(mariadb_user_args) \
            --datadir="$MARIADB_DATA" --socket="$MARIADB_SOCKET" --pid-file="$MARIADB_PID" \
            --bind-address=127.0.0.1 --port="$MARIADB_PORT" --skip-name-resolve \
            --log-error="$MARIADB_LOG" \
            --ssl-ca="$CERTS_DIR/ca.pem" --ssl-cert="$CERTS_DIR/server.pem" --ssl-key="$CERTS_DIR/server.key" \
            --tmpdir="$MARIADB_TMP" \
            --server-id=1 --log-bin=mariadb-bin --binlog-format=ROW \
            --max-binlog-size=16M --binlog-expire-logs-seconds=60 \
            --innodb-buffer-pool-size=256M --innodb-flush-log-at-trx-commit=1 \
            --max-connections=500 \
            --character-set-server=utf8mb4 --collation-server=utf8mb4_unicode_ci \
            </dev/null >>"$MARIADB_LOG" 2>&1 9>&- & # 9>&-: the daemon must not hold the lock fd
        echo "$!" >"$MARIADB_PID"
        started=1
    fi
    local deadline=$((SECONDS + 60))
    until mariadb_root -N -e 'SELECT 1' >/dev/null 2>&1; do
        if ! pid_alive "$MARIADB_PID" "$MARIADB_DATA"; then
            tail_log "$MARIADB_LOG"
            die "mariadb: server exited during startup"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            tail_log "$MARIADB_LOG"
            die "mariadb: not ready after 60s"
        fi
        sleep 0.2
    done
    mariadb_provision
    mariadb_tcp_ok || { tail_log "$MARIADB_LOG"; die "mariadb: SELECT 1 over TCP as $MARIADB_USER failed"; }
    local cipher
    cipher="$(mariadb_tls_cipher)"
    if [ -z "$cipher" ]; then
        if [ "$started" -eq 0 ] && [ "$(mariadb_root -N -e 'SELECT @@have_ssl')" != YES ]; then
            mariadb_warn_without_tls # started by an older servers.sh
        else
            tail_log "$MARIADB_LOG"
            die "mariadb: no TLS connection verified against $CERTS_DIR/ca.pem"
        fi
    fi
    log "mariadb: up (pid $(cat "$MARIADB_PID"), 127.0.0.1:$MARIADB_PORT, user $MARIADB_USER, TLS ${cipher:-off})"
}

# A server started by a servers.sh from before TLS keeps running without it: say so, never
# restart it behind the back of whoever uses it.
mariadb_warn_without_tls() {
    if [ "$(mariadb_root -N -e 'SELECT @@have_ssl' 2>/dev/null)" != YES ]; then
        log "mariadb: WARNING: running without TLS (started before servers.sh enabled it);" \
            "the TLS tests fail until it is restarted: servers.sh down mariadb && servers.sh up mariadb"
    fi
}

mariadb_down() { stop_pidfile mariadb "$MARIADB_PID" "$MARIADB_DATA" 120; }

mariadb_status() {
    if ! pid_alive "$MARIADB_PID" "$MARIADB_DATA"; then
        echo "mariadb: down"
        return 1
    fi
    if mariadb_tcp_ok; then
        echo "mariadb: up (pid $(cat "$MARIADB_PID"), 127.0.0.1:$MARIADB_PORT, TLS $(mariadb_root -N -e 'SELECT @@have_ssl' 2>/dev/null))"
    else
        echo "mariadb: not answering (pid $(cat "$MARIADB_PID"), 127.0.0.1:$MARIADB_PORT)"
        return 1
    fi
}

# ---------------------------------------------------------------- Kafka

kafka_fetch_jars() {
    local want have
    want="$(sha256sum "$KAFKA_POM" | cut -d' ' -f1)"
    have="$(cat "$KAFKA_LIBS/.pom.sha256" 2>/dev/null || true)"
    [ "$want" = "$have" ] && return 0
    ensure_java_and_maven
    local tmp="$KAFKA_LIBS.tmp.$$"
    rm -rf "$tmp"
    mkdir -p "$(dirname "$KAFKA_LIBS")"
    log "kafka: fetching Kafka $KAFKA_VERSION jars from Maven Central into $KAFKA_LIBS"
    mkdir -p "$LOG_DIR"
    if ! mvn -q -B -Dstyle.color=never -f "$KAFKA_POM" dependency:copy-dependencies \
        -DoutputDirectory="$tmp" >"$LOG_DIR/kafka-fetch.log" 2>&1; then
        rm -rf "$tmp"
        tail_log "$LOG_DIR/kafka-fetch.log"
        die "kafka: mvn dependency:copy-dependencies failed"
    fi
    echo "$want" >"$tmp/.pom.sha256"
    rm -rf "$KAFKA_LIBS"
    mv "$tmp" "$KAFKA_LIBS"
}

# pem_property NAME FILE: a Java properties entry whose value is the PEM file (continued lines).
pem_property() {
    printf '%s=' "$1"
    sed -e 's/$/ \\/' -e '$ s/ \\$//' "$2"
}

kafka_write_config() {
    mkdir -p "$KAFKA_DIR" "$KAFKA_DATA"
    # The file holds the broker's private key (inline PEM values ssl.keystore.key and
    # ssl.keystore.certificate.chain, so the key needs no password): readable by us only.
    (umask 077 && : >"$KAFKA_DIR/server.properties")
    chmod 600 "$KAFKA_DIR/server.properties"
    cat >"$KAFKA_DIR/server.properties" <<EOF
# Generated by deploy/local/servers.sh on every 'up'; edit the script, not this file.
node.id=1
process.roles=broker,controller
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT,SSL://127.0.0.1:$KAFKA_SSL_PORT,SASL_SSL://127.0.0.1:$KAFKA_SASL_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT,SSL://127.0.0.1:$KAFKA_SSL_PORT,SASL_SSL://127.0.0.1:$KAFKA_SASL_PORT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SSL:SSL,SASL_SSL:SASL_SSL
# SSL: mutual TLS (a client certificate from the test CA is required). SASL_SSL: TLS (no client
# certificate) + SCRAM-SHA-512, users in the cluster metadata (format --add-scram, or kafka_scram).
ssl.keystore.type=PEM
ssl.truststore.type=PEM
ssl.truststore.location=$CERTS_DIR/ca.pem
listener.name.ssl.ssl.client.auth=required
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
controller.quorum.bootstrap.servers=127.0.0.1:$KAFKA_CONTROLLER_PORT
log.dirs=$KAFKA_DATA
num.partitions=6
default.replication.factor=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=6
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=6
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
min.insync.replicas=1
group.initial.rebalance.delay.ms=0
delete.topic.enable=true
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
log.retention.hours=24
log.segment.bytes=104857600
EOF
    {
        pem_property ssl.keystore.certificate.chain "$CERTS_DIR/server.pem"
        pem_property ssl.keystore.key "$CERTS_DIR/server.key"
    } >>"$KAFKA_DIR/server.properties"
    cat >"$KAFKA_DIR/log4j2.properties" <<'EOF'
# Generated by deploy/local/servers.sh. stdout is appended to logs/kafka.log by servers.sh.
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

kafka_format() {
    [ -f "$KAFKA_DATA/meta.properties" ] && return 0
    local cid
    cid="$(new_cluster_id)"
    log "kafka: formatting $KAFKA_DATA (cluster id $cid, SCRAM-SHA-512 user $KAFKA_SCRAM_USER)"
    java -Xmx256m -Dlog4j2.configurationFile="$KAFKA_DIR/log4j2.properties" -cp "$KAFKA_LIBS/*" \
        kafka.tools.StorageTool format --standalone --ignore-formatted \
        --add-scram "SCRAM-SHA-512=[name=$KAFKA_SCRAM_USER,password=$KAFKA_SCRAM_PASSWORD]" \
        --cluster-id "$cid" --config "$KAFKA_DIR/server.properties" >>"$KAFKA_LOG" 2>&1 \
        || { tail_log "$KAFKA_LOG"; die "kafka: storage format failed"; }
}

kafka_tool() {
    java -Xmx128m -Dlog4j2.configurationFile="$KAFKA_DIR/log4j2.properties" -cp "$KAFKA_LIBS/*" "$@"
}

# A data dir formatted before SCRAM (by an older servers.sh) has no SCRAM user: add it through
# the running broker (kafka-configs), keeping every topic and offset. Never re-formats.
kafka_scram() {
    local out="$RUN_DIR/scram-users.out"
    if ! kafka_tool kafka.admin.ConfigCommand --bootstrap-server "127.0.0.1:$KAFKA_PORT" --describe \
        --entity-type users --entity-name "$KAFKA_SCRAM_USER" >"$out" 2>&1; then
        cat "$out" >&2
        die "kafka: cannot list the SCRAM users"
    fi
    grep -q "SCRAM-SHA-512" "$out" && return 0
    log "kafka: adding the SCRAM-SHA-512 user $KAFKA_SCRAM_USER (data dir formatted without it)"
    kafka_tool kafka.admin.ConfigCommand --bootstrap-server "127.0.0.1:$KAFKA_PORT" --alter \
        --add-config "SCRAM-SHA-512=[password=$KAFKA_SCRAM_PASSWORD]" \
        --entity-type users --entity-name "$KAFKA_SCRAM_USER" >"$out" 2>&1 \
        || { cat "$out" >&2; die "kafka: adding the SCRAM user failed"; }
}

# kafka_secure_probe ssl|sasl PORT [TIMEOUT_S]: a produce through that listener.
kafka_secure_probe() {
    "$PYTHON" "$LOCAL_DIR_SCRIPTS/kafka/secure_probe.py" "$1" --bootstrap "127.0.0.1:$2" \
        --certs "$CERTS_DIR" --user "$KAFKA_SCRAM_USER" --password "$KAFKA_SCRAM_PASSWORD" \
        --timeout "${3:-20}"
}

# The SSL and SASL_SSL listeners take a produce; the SCRAM user is added first when missing.
kafka_secure_up() {
    local err="$RUN_DIR/secure_probe.err"
    kafka_secure_probe ssl "$KAFKA_SSL_PORT" 2>"$err" \
        || { cat "$err" >&2; tail_log "$KAFKA_LOG" 60; die "kafka: the SSL (mTLS) listener does not work"; }
    if ! kafka_secure_probe sasl "$KAFKA_SASL_PORT" 10 2>"$err"; then
        kafka_scram
        kafka_secure_probe sasl "$KAFKA_SASL_PORT" 2>"$err" \
            || { cat "$err" >&2; tail_log "$KAFKA_LOG" 60; die "kafka: the SASL_SSL listener does not work"; }
    fi
    rm -f "$err"
}

# A broker started by a servers.sh from before TLS keeps running without the secured listeners:
# say so, never restart it behind the back of whoever uses it.
kafka_warn_without_tls() {
    if ! port_open "$KAFKA_SSL_PORT" || ! port_open "$KAFKA_SASL_PORT"; then
        log "kafka: WARNING: no SSL/SASL_SSL listener on $KAFKA_SSL_PORT/$KAFKA_SASL_PORT (started" \
            "before servers.sh added them); the TLS tests fail until it is restarted:" \
            "servers.sh down kafka && servers.sh up kafka"
    fi
}

kafka_roundtrip() {
    "$PYTHON" "$LOCAL_DIR_SCRIPTS/roundtrip.py" --bootstrap "127.0.0.1:$KAFKA_PORT" "$@"
}

kafka_up() {
    local started=0
    mkdir -p "$KAFKA_DIR" "$LOG_DIR" "$RUN_DIR"
    [ -x "$PYTHON" ] || die "kafka: $PYTHON not found (run deploy/local/bootstrap.sh or set PYTHON)"
    if pid_alive "$KAFKA_PID" "$KAFKA_DIR/server.properties"; then
        if kafka_roundtrip --quiet 2>/dev/null; then
            log "kafka: already running (pid $(cat "$KAFKA_PID"), 127.0.0.1:$KAFKA_PORT)"
            kafka_warn_without_tls
            return 0
        fi
        log "kafka: pid $(cat "$KAFKA_PID") runs but the round trip fails yet; waiting"
    else
        rm -f "$KAFKA_PID"
        ensure_java_and_maven
        local p
        for p in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT" "$KAFKA_SSL_PORT" "$KAFKA_SASL_PORT"; do
            if port_open "$p"; then
                die "kafka: port $p is taken by another process (set OUTBOX_KAFKA_PORT / OUTBOX_KAFKA_CONTROLLER_PORT / OUTBOX_KAFKA_SSL_PORT / OUTBOX_KAFKA_SASL_PORT)"
            fi
        done
        kafka_fetch_jars
        ensure_certs
        kafka_write_config
        kafka_format
        log "kafka: starting Kafka $KAFKA_VERSION on 127.0.0.1:$KAFKA_PORT (log: $KAFKA_LOG)"
        setsid nohup java -Xmx512m -Xms256m -XX:+UseG1GC -Djava.awt.headless=true \
            -Dlog4j2.configurationFile="$KAFKA_DIR/log4j2.properties" \
            -cp "$KAFKA_LIBS/*" kafka.Kafka "$KAFKA_DIR/server.properties" \
            </dev/null >>"$KAFKA_LOG" 2>&1 9>&- &
        echo "$!" >"$KAFKA_PID"
        started=1
    fi
    local deadline=$((SECONDS + KAFKA_UP_DEADLINE)) err="$RUN_DIR/roundtrip.err"
    until kafka_roundtrip --quiet 2>"$err"; do
        if ! pid_alive "$KAFKA_PID" "$KAFKA_DIR/server.properties"; then
            tail_log "$KAFKA_LOG" 60
            die "kafka: broker exited during startup"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            cat "$err" >&2 || true
            tail_log "$KAFKA_LOG" 60
            die "kafka: no produce/consume round trip after ${KAFKA_UP_DEADLINE}s"
        fi
        sleep 1
    done
    rm -f "$err"
    local secure="SSL $KAFKA_SSL_PORT, SASL_SSL $KAFKA_SASL_PORT"
    if [ "$started" -eq 1 ] || port_open "$KAFKA_SSL_PORT"; then
        kafka_secure_up
    else
        kafka_warn_without_tls # started by an older servers.sh
        secure="no SSL/SASL_SSL listeners"
    fi
    log "kafka: up (pid $(cat "$KAFKA_PID"), 127.0.0.1:$KAFKA_PORT; $secure)"
}

kafka_down() { stop_pidfile kafka "$KAFKA_PID" "$KAFKA_DIR/server.properties" 60; }

kafka_status() {
    if ! pid_alive "$KAFKA_PID" "$KAFKA_DIR/server.properties"; then
        echo "kafka: down"
        return 1
    fi
    if port_open "$KAFKA_PORT"; then
        local secure="SSL $KAFKA_SSL_PORT, SASL_SSL $KAFKA_SASL_PORT"
        port_open "$KAFKA_SSL_PORT" || secure="no SSL/SASL_SSL listeners"
        echo "kafka: up (pid $(cat "$KAFKA_PID"), 127.0.0.1:$KAFKA_PORT; $secure)"
    else
        echo "kafka: not listening (pid $(cat "$KAFKA_PID"), 127.0.0.1:$KAFKA_PORT)"
        return 1
    fi
}

# ---------------------------------------------------------------- main

usage() { echo "usage: $0 {up|down|status} [mariadb|kafka]" >&2; exit 2; }

[ $# -ge 1 ] && [ $# -le 2 ] || usage
action="$1"
case "${2:-all}" in
    all) servers=(mariadb kafka) ;;
    mariadb | kafka) servers=("$2") ;;
    *) usage ;;
esac

# Serialise up/down of this state dir (e.g. test fixtures starting servers while a script does).
if [ "$action" = up ] || [ "$action" = down ]; then
    mkdir -p "$RUN_DIR"
    exec 9>"$RUN_DIR/servers.lock"
    flock 9
fi

case "$action" in
    up)
        for s in "${servers[@]}"; do "${s}_up"; done
        ;;
    down)
        # reverse order: Kafka first, then MariaDB
        for ((i = ${#servers[@]} - 1; i >= 0; i--)); do "${servers[i]}_down"; done
        ;;
    status)
        rc=0
        for s in "${servers[@]}"; do "${s}_status" || rc=1; done
        exit "$rc"
        ;;
    *) usage ;;
esac
