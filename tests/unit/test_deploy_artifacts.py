"""Offline checks of the deployment artifacts against the code they deploy.

Dockerfile, Helm chart, plain manifests, Prometheus alerts and the Grafana dashboard name env
vars, metrics and labels of the relay; these tests fail when one of them names something that
relay.config or relay.metrics does not have. Helm itself is not needed: the plain manifests in
deploy/kubernetes are the chart's rendered output (deploy/kubernetes/render.sh).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import prometheus_client
import promql_parser
import pydantic
import pytest

import relay
import relay.config
import relay.metrics

# PyYAML (a dependency of yamllint) imported dynamically so that mypy needs no types-PyYAML.
yaml = importlib.import_module("yaml")

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "outbox-relay"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "outbox-relay.json"
MANIFESTS = ROOT / "deploy" / "kubernetes"
PLAIN_DEPLOYMENT = MANIFESTS / "deployment.yaml"
SIDECAR = MANIFESTS / "sidecar-example.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY_README = ROOT / "deploy" / "README.md"

# Labels that Prometheus or the Kubernetes service discovery adds to every scraped series.
TARGET_LABELS = frozenset(
    {"job", "instance", "namespace", "pod", "service", "endpoint", "container", "__name__"}
)
# Series that Prometheus itself makes, not the relay.
SCRAPE_SERIES = frozenset({"up"})
# prometheus_client's process collector (Linux only, so listed in case /proc is missing).
PROCESS_SERIES = frozenset(
    {
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    }
)
SUFFIXES: dict[str, tuple[str, ...]] = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
    "info": ("_info",),
    "gauge": ("",),
}
# The env vars the relay reads outside the Settings model.
EXTRA_ENV = frozenset({"RELAY_SECRETS_DIR"})
ENV_NAME = re.compile(r"(?<![A-Za-z0-9_])RELAY_[A-Z0-9_]*[A-Z0-9]")
SECRET_FILE_NAME = re.compile(r"(?<![A-Za-z0-9_])relay_[a-z0-9]+__[a-z0-9_]*[a-z0-9]")
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


# --- what the code defines -----------------------------------------------------------------


def _series_labels() -> dict[str, frozenset[str]]:
    """Every series name the relay's registry exposes, with the label names it carries."""
    labelnames: dict[str, tuple[str, ...]] = {}
    for value in vars(relay.metrics).values():
        if isinstance(value, prometheus_client.metrics.MetricWrapperBase):
            labelnames[value._name] = tuple(value._labelnames)
    series: dict[str, frozenset[str]] = {}
    for family in prometheus_client.REGISTRY.collect():
        base = frozenset(labelnames.get(family.name, ()))
        for suffix in SUFFIXES.get(family.type, ("",)):
            extra = {"le"} if suffix == "_bucket" else set()
            series[family.name + suffix] = base | extra
        for sample in family.samples:
            series[sample.name] = series.get(sample.name, frozenset()) | frozenset(sample.labels)
    for name in PROCESS_SERIES:
        series.setdefault(name, frozenset())
    return series


SERIES = _series_labels()
LABEL_VALUES: dict[str, frozenset[str]] = {
    "reason": frozenset(relay.metrics.FAILURE_REASONS) | frozenset(relay.metrics.RETRY_REASONS),
    "result": frozenset({"done", "skipped", "error"}),
}


def _settings_env_names() -> frozenset[str]:
    names: set[str] = set()
    for group, field in relay.config.Settings.model_fields.items():
        model = field.annotation
        assert isinstance(model, type)
        assert issubclass(model, pydantic.BaseModel), group
        names.update(f"RELAY_{group}__{sub}".upper() for sub in model.model_fields)
    return frozenset(names)


SETTINGS_ENV = _settings_env_names()


def _load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert all(isinstance(doc, dict) for doc in docs), path
    return docs


def _selectors(expr: Any) -> Iterator[Any]:
    found: list[Any] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)

    promql_parser.walk(expr, visit)
    yield from found


def _grouping_labels(expr: Any) -> set[str]:
    labels: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            labels.update(node.modifier.labels)

    promql_parser.walk(expr, visit)
    return labels


def check_promql(expr_text: str) -> set[str]:
    """Parse one PromQL expression, check its series and labels; return the series names."""
    expr = promql_parser.parse(expr_text)
    names: set[str] = set()
    known_labels: set[str] = set(TARGET_LABELS)
    for selector in _selectors(expr):
        name = selector.name
        assert name, f"selector without a metric name in {expr_text!r}"
        names.add(name)
        if name in SCRAPE_SERIES:
            continue
        assert name in SERIES, f"{name} is not a metric of relay.metrics ({expr_text!r})"
        allowed = SERIES[name] | TARGET_LABELS
        known_labels |= allowed
        for matcher in selector.matchers.matchers:
            assert matcher.name in allowed, f"{name} has no label {matcher.name}"
            if matcher.name in LABEL_VALUES and matcher.op == promql_parser.MatchOp.Equal:
                assert matcher.value in LABEL_VALUES[matcher.name], (name, matcher.value)
    unknown = _grouping_labels(expr) - known_labels
    assert not unknown, f"grouping by labels no series has: {unknown} in {expr_text!r}"
    return names


def _grafana_to_promql(text: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        text = text.replace(variable, value)
    return re.sub(r"\$\{?[A-Za-z_]+\}?", ".*", text)


# --- the metric and label helpers themselves ------------------------------------------------


def test_series_catalogue_has_the_documented_series() -> None:
    for name in (
        "outbox_relay_publish_lag_seconds_bucket",
        "outbox_relay_published_total",
        "outbox_relay_failed_total",
        "outbox_relay_build_info",
        "outbox_relay_loop_errors_total",
        "process_resident_memory_bytes",
    ):
        assert name in SERIES
    assert "reason" in SERIES["outbox_relay_failed_total"]
    assert "loop" in SERIES["outbox_relay_loop_errors_total"]
    assert "outbox_relay_published" not in SERIES


@pytest.mark.parametrize(
    "expr",
    [
        "rate(outbox_relay_no_such_metric_total[5m])",
        'outbox_relay_failed_total{bogus="x"}',
        'outbox_relay_failed_total{reason="no_such_reason"}',
        "sum by (bogus) (outbox_relay_backlog_rows)",
        "outbox_relay_published",  # the counter without _total is not exposed
    ],
)
def test_check_promql_rejects(expr: str) -> None:
    with pytest.raises(AssertionError):
        check_promql(expr)


def test_check_promql_rejects_syntax_errors() -> None:
    with pytest.raises(ValueError, match=r".+"):
        check_promql("sum(rate(outbox_relay_published_total[5m])")


# --- Prometheus alerts ----------------------------------------------------------------------


def _alert_rules(path: Path) -> list[dict[str, Any]]:
    doc = yaml.safe_load(path.read_text())
    rules: list[dict[str, Any]] = [rule for group in doc["groups"] for rule in group["rules"]]
    return rules


def test_alerts_parse_and_name_real_metrics() -> None:
    rules = _alert_rules(ALERTS)
    assert rules
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        check_promql(rule["expr"])
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]


def test_alerts_cover_the_required_conditions() -> None:
    exprs = {rule["alert"]: " ".join(rule["expr"].split()) for rule in _alert_rules(ALERTS)}
    lag = exprs["OutboxRelayPublishLagHigh"]
    assert "histogram_quantile(0.99" in lag
    assert "rate(outbox_relay_publish_lag_seconds_bucket[5m])" in lag
    assert lag.endswith("> 1")
    # The SLO threshold is a bucket boundary, so the quantile is exact at 1 s.
    assert 1.0 in relay.metrics.LAG_BUCKETS
    assert exprs["OutboxRelayBacklogStale"].endswith(
        "(outbox_relay_backlog_oldest_age_seconds) > 60"
    )
    assert "outbox_relay_failed_rows) > 0" in exprs["OutboxRelayFailedRows"]
    assert exprs["OutboxRelayAbsent"] == "absent(outbox_relay_build_info)"
    assert "outbox_relay_batch_retries_total" in exprs["OutboxRelayBatchRetriesHigh"]
    assert 'outbox_relay_cleaner_runs_total{result="error"}' in exprs["OutboxRelayCleanerErrors"]
    durations = {rule["alert"]: rule["for"] for rule in _alert_rules(ALERTS)}
    assert durations["OutboxRelayPublishLagHigh"] == "5m"


def test_chart_ships_the_same_alerts() -> None:
    assert (CHART / "files" / "alerts.yaml").read_bytes() == ALERTS.read_bytes()
    template = (CHART / "templates" / "prometheusrule.yaml").read_text()
    assert '.Files.Get "files/alerts.yaml"' in template


def test_promtool_unit_tests_cover_every_alert() -> None:
    doc = yaml.safe_load(ALERT_TESTS.read_text())
    assert doc["rule_files"] == ["alerts.yaml"]
    tested = {
        case["alertname"]
        for test in doc["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    alerts = {rule["alert"] for rule in _alert_rules(ALERTS)}
    # Loop errors are a plain increase(); every other alert has a firing case.
    assert alerts - tested == {"OutboxRelayLoopErrors"}
    for test in doc["tests"]:
        for series in test["input_series"]:
            check_promql(series["series"])


# --- Grafana dashboard ----------------------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def test_dashboard_structure() -> None:
    dashboard = _dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    assert dashboard["__inputs"][0]["pluginId"] == "prometheus"
    panels = _panels(dashboard)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]


def test_dashboard_queries_parse_and_name_real_metrics() -> None:
    dashboard = _dashboard()
    used: set[str] = set()
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            used |= check_promql(_grafana_to_promql(target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", variable["query"]["query"])
        assert match, variable["name"]
        used |= check_promql(_grafana_to_promql(match.group(1)))
        assert match.group(2) in TARGET_LABELS
    required = {
        "outbox_relay_published_total",
        "outbox_relay_publish_lag_seconds_bucket",
        "outbox_relay_backlog_rows",
        "outbox_relay_backlog_oldest_age_seconds",
        "outbox_relay_failed_total",
        "outbox_relay_batch_retries_total",
        "outbox_relay_claim_duration_seconds_bucket",
        "outbox_relay_publish_duration_seconds_bucket",
        "outbox_relay_mark_duration_seconds_bucket",
        "outbox_relay_batch_size_rows_bucket",
        "outbox_relay_cleaner_deleted_rows_total",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "outbox_relay_build_info",
    }
    assert required <= used, required - used


def test_dashboard_lag_panel_has_the_slo_line() -> None:
    lag = [p for p in _panels(_dashboard()) if p["title"].startswith("Publish lag p50 / p99")]
    assert len(lag) == 1
    defaults = lag[0]["fieldConfig"]["defaults"]
    assert defaults["unit"] == "s"
    assert defaults["custom"]["thresholdsStyle"]["mode"] in {"line", "line+area"}
    assert 1 in [step["value"] for step in defaults["thresholds"]["steps"]]
    exprs = " ".join(t["expr"] for t in lag[0]["targets"])
    assert "histogram_quantile(0.5," in exprs
    assert "histogram_quantile(0.99," in exprs


# --- env vars and secret files --------------------------------------------------------------


def _env_sources() -> list[Path]:
    sources = [
        DOCKERFILE,
        DEPLOY_README,
        ALERTS,
        DASHBOARD,
        *sorted(CHART.rglob("*")),
        *sorted(MANIFESTS.glob("*")),
    ]
    return [path for path in sources if path.is_file()]


def test_settings_catalogue() -> None:
    assert {"RELAY_DB__HOST", "RELAY_DB__PASSWORD", "RELAY_WORKER__SHUTDOWN_TIMEOUT_S"} <= (
        SETTINGS_ENV
    )
    assert "RELAY_DB__NOPE" not in SETTINGS_ENV
    # The one variable outside the model is read by relay.config.load.
    assert '"RELAY_SECRETS_DIR"' in Path(relay.config.__file__).read_text()


def test_every_named_env_var_is_a_setting() -> None:
    assert DEPLOY_README.is_file()
    seen: set[str] = set()
    for path in _env_sources():
        text = path.read_text()
        names = set(ENV_NAME.findall(text))
        names |= {name.upper() for name in SECRET_FILE_NAME.findall(text)}
        unknown = names - SETTINGS_ENV - EXTRA_ENV
        assert not unknown, f"{path.relative_to(ROOT)} names unknown settings: {sorted(unknown)}"
        seen |= names
    # The scan found the settings the artifacts must set.
    assert {"RELAY_DB__HOST", "RELAY_DB__PASSWORD", "RELAY_KAFKA__BOOTSTRAP_SERVERS"} <= seen


def test_env_scan_catches_typos() -> None:
    names = set(ENV_NAME.findall("x RELAY_DB__HOTS=1 y RELAY_WORKER__COUNT"))
    assert names - SETTINGS_ENV == {"RELAY_DB__HOTS"}
    assert SECRET_FILE_NAME.findall("/run/secrets/relay/relay_db__password") == [
        "relay_db__password"
    ]


def test_chart_values() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    env: dict[str, Any] = values["env"]
    assert set(env) <= SETTINGS_ENV
    owned = {"RELAY_HTTP__PORT", "RELAY_WAKEUP__ENABLED", "RELAY_WAKEUP__PORT", "RELAY_SECRETS_DIR"}
    assert not set(env) & owned
    assert not [key for key in env if "PASSWORD" in key]
    assert all(isinstance(value, str) for value in env.values())
    for file_name in values["secrets"]["files"]:
        assert file_name.upper() in SETTINGS_ENV
    assert values["secrets"]["mountPath"] == "/run/secrets/relay"
    drain = float(env.get("RELAY_WORKER__SHUTDOWN_TIMEOUT_S", 20))
    assert values["terminationGracePeriodSeconds"] > drain
    assert values["ports"]["http"] == relay.config.HttpSettings().port
    assert values["migrate"]["enabled"] is False
    assert values["securityContext"]["readOnlyRootFilesystem"] is True
    assert values["podSecurityContext"]["runAsUser"] == 10001
    assert values["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert values["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert _mebibytes(values["resources"]["requests"]["memory"]) >= 150
    assert _mebibytes(values["resources"]["limits"]["memory"]) >= 225


def test_chart_version_matches_the_relay() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == relay.__version__


def _mebibytes(quantity: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Mi|Gi|M|G)", quantity)
    assert match, quantity
    factor = {"Mi": 1.0, "Gi": 1024.0, "M": 1e6 / 2**20, "G": 1e9 / 2**20}[match.group(2)]
    return float(match.group(1)) * factor


# --- Kubernetes manifests -------------------------------------------------------------------


def _manifest_files() -> list[Path]:
    files = sorted(MANIFESTS.glob("*.yaml"))
    assert PLAIN_DEPLOYMENT in files
    assert SIDECAR in files
    return files


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: p.name)
def test_manifests_validate_against_the_kubernetes_schema(path: Path) -> None:
    version = kubernetes_validate.latest_version()
    for doc in _load_yaml_documents(path):
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no schema in kubernetes-validate; checked below
        kubernetes_validate.validate(doc, version, strict=True)


def test_kubernetes_validate_rejects_a_broken_deployment() -> None:
    doc = _kind(_load_yaml_documents(PLAIN_DEPLOYMENT), "Deployment")
    doc["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["prot"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def _kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, kind
    return found[0]


def _container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in pod_spec["containers"] if c["name"] == name]
    assert len(found) == 1, name
    container: dict[str, Any] = found[0]
    return container


def _load_settings(
    container: dict[str, Any], secrets: Path, monkeypatch: pytest.MonkeyPatch
) -> relay.config.Settings:
    """Settings the relay would build from the container's env and a mounted password file."""
    for key in list(os.environ):
        if key.startswith("RELAY_"):
            monkeypatch.delenv(key)
    env = {item["name"]: item["value"] for item in container["env"] if "value" in item}
    assert env["RELAY_SECRETS_DIR"]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    secrets.mkdir()
    (secrets / "relay_db__password").write_text("s3cret")
    monkeypatch.setenv("RELAY_SECRETS_DIR", str(secrets))
    return relay.config.load()


def _check_relay_pod(
    pod_spec: dict[str, Any], container: dict[str, Any], settings: relay.config.Settings
) -> None:
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    http_port_name = container["livenessProbe"]["httpGet"]["port"]
    assert ports[http_port_name] == settings.http.port
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert pod_spec["terminationGracePeriodSeconds"] > settings.worker.shutdown_timeout_s
    assert settings.db.password.get_secret_value() == "s3cret"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert "memory" in container["resources"]["limits"]
    assert all("PASSWORD" not in item["name"] for item in container["env"])
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    secret_volumes = [v for v in pod_spec["volumes"] if "secret" in v]
    assert len(secret_volumes) == 1
    assert mounts[secret_volumes[0]["name"]] == "/run/secrets/relay"
    paths = {item["path"] for item in secret_volumes[0]["secret"]["items"]}
    assert "relay_db__password" in paths


def test_plain_deployment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = _load_yaml_documents(PLAIN_DEPLOYMENT)
    assert {doc["kind"] for doc in docs} == {
        "Deployment",
        "Service",
        "ServiceAccount",
        "PodDisruptionBudget",
    }
    deployment = _kind(docs, "Deployment")
    pod_spec = deployment["spec"]["template"]["spec"]
    container = _container(pod_spec, "relay")
    settings = _load_settings(container, tmp_path / "secrets", monkeypatch)
    _check_relay_pod(pod_spec, container, settings)
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["args"] == ["run"]
    assert container["image"].endswith(":" + relay.__version__)
    assert pod_spec["securityContext"]["runAsUser"] == 10001
    assert pod_spec["securityContext"]["runAsNonRoot"] is True
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert _kind(docs, "Service")["spec"]["selector"] == selector
    assert _kind(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_plain_migrate_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job = _kind(_load_yaml_documents(MANIFESTS / "migrate-job.yaml"), "Job")
    pod_spec = job["spec"]["template"]["spec"]
    container = _container(pod_spec, "migrate")
    assert container["args"] == ["migrate"]
    settings = _load_settings(container, tmp_path / "secrets", monkeypatch)
    assert settings.db.password.get_secret_value() == "s3cret"
    # The Job's pods must not be selected by the relay's Service or PDB.
    assert job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] != "relay"


def test_sidecar_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = _load_yaml_documents(SIDECAR)
    deployment = _kind(docs, "Deployment")
    pod_spec = deployment["spec"]["template"]["spec"]
    assert len(pod_spec["containers"]) == 2
    container = _container(pod_spec, "outbox-relay")
    settings = _load_settings(container, tmp_path / "secrets", monkeypatch)
    _check_relay_pod(pod_spec, container, settings)
    assert settings.worker.count == 1
    # A failing /readyz would take the application's pod out of its Service.
    assert "readinessProbe" not in container
    app = _container(pod_spec, "app")
    app_db_host = {item["name"]: item.get("value") for item in app["env"]}["DATABASE_HOST"]
    assert settings.db.host == app_db_host
    assert settings.wakeup.enabled
    assert settings.wakeup.host == "127.0.0.1"
    monitor = _kind(docs, "PodMonitor")
    ports = {p["name"] for p in container["ports"]}
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= ports
    assert re.search(".*outbox-relay.*", monitor["metadata"]["name"])


# --- Dockerfile -----------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out: list[tuple[str, str]] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        keyword, _, rest = stripped.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile() -> None:
    instructions = _instructions()
    stages = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert len(stages) >= 2, "multi-stage build"
    args = dict(
        rest.split("=", 1) for keyword, rest in instructions if keyword == "ARG" and "=" in rest
    )
    assert args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    final = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    tail = instructions[final:]
    assert ("USER", "10001:10001") in tail
    assert tail[-2:] == [("ENTRYPOINT", '["relay"]'), ("CMD", '["run"]')]
    exposed = " ".join(rest for keyword, rest in tail if keyword == "EXPOSE").split()
    assert f"{relay.config.HttpSettings().port}/tcp" in exposed
    assert not [rest for keyword, rest in tail if keyword == "HEALTHCHECK"]
    # The console script the image runs is the one pyproject.toml installs.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["relay"] == "relay.cli:main"
    copied = {
        src
        for keyword, rest in instructions
        if keyword == "COPY" and "--from" not in rest
        for src in rest.split()[:-1]
    }
    assert {"pyproject.toml", pyproject["project"]["readme"], "relay"} <= copied
    allowed = {
        line[1:].rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.startswith("!")
    }
    assert "*" in DOCKERIGNORE.read_text().splitlines()
    assert copied <= allowed, copied - allowed


# --- YAML style ----------------------------------------------------------------------------

YAMLLINT_CONFIG = """
extends: default
rules:
  document-start: disable
  line-length: {max: 120, level: warning}
  indentation: {spaces: consistent, indent-sequences: whatever}
  comments: {min-spaces-from-content: 1}
  truthy: {allowed-values: ["true", "false"], check-keys: false}
"""


def _yaml_files() -> list[Path]:
    files = [
        *sorted((ROOT / "deploy").glob("*/*.yaml")),
        CHART / "Chart.yaml",
        CHART / "values.yaml",
        CHART / "files" / "alerts.yaml",
    ]
    return [f for f in files if "local" not in f.relative_to(ROOT).parts]


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_lint(path: Path) -> None:
    assert path.is_file()
    list(yaml.safe_load_all(path.read_text()))
    linter = pytest.importorskip("yamllint.linter")
    config_module = pytest.importorskip("yamllint.config")
    config = config_module.YamlLintConfig(YAMLLINT_CONFIG)
    errors = [
        f"{p.line}:{p.column} {p.message}"
        for p in linter.run(path.read_text(), config, str(path))
        if p.level == "error"
    ]
    assert not errors, errors
