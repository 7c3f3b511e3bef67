"""deploy/grafana: the dashboard has the panels users look for, is provisioned with its datasource, and every PromQL
expression in it (and in the alert rules) names metrics the running service exports and runs on a real Prometheus."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.deploy_support import DEPLOY, PROMETHEUS_DIR, LiveStack

GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "oodserve.json"
PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "inf", "nan"}
PROMETHEUS_OWN_SERIES = {"up"}
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers that are not functions, keywords, label names or units."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = GROUPING.sub(" ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        before = text[match.start() - 1] if match.start() else " "
        if before.isdigit() or before in ".$":
            continue  # 1e-3, 5m, $variable
        if text[match.end() :].lstrip().startswith("(") or match.group().lower() in PROMQL_WORDS:
            continue
        names.add(match.group())
    return names


def exported_series_names(metrics_text: str) -> set[str]:
    """Queryable series names of an exposition, from the declared families (also those without samples yet)."""
    names = set()
    for family in text_string_to_metric_families(metrics_text):
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "summary": ["_sum", "_count", ""]}
        names.update(family.name + suffix for suffix in suffixes.get(family.type, [""]))
    return names


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_expressions(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) for every query target, plus the template variables' label_values selectors."""
    found = [(panel["title"], target["expr"]) for panel in panels(board) for target in panel.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            selector = re.fullmatch(r"label_values\((.*),\s*\w+\)", variable["query"]["query"])
            assert selector, variable["query"]
            found.append((f"variable {variable['name']}", selector.group(1)))
    return found


def alert_expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    return [(rule["alert"], rule["expr"]) for group in rules["groups"] for rule in group["rules"]]


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, endpoint) (rate(oodserve_http_request_duration_seconds_bucket'
        '{endpoint=~".*/(score|infer)"}[$__rate_interval]))) > 1e-3 and on (model) oodserve_ready offset 5m'
    )
    assert metric_names(expr) == {"oodserve_http_request_duration_seconds_bucket", "oodserve_ready"}
    assert metric_names('sum(rate(a_total{x="by (y)"}[5m])) / ignoring(le) group_left b') == {"a_total", "b"}
    text = "# HELP c_total c\n# TYPE c_total counter\n# HELP h h\n# TYPE h histogram\n# HELP g g\n# TYPE g gauge\n"
    assert exported_series_names(text) == {"c_total", "h_bucket", "h_sum", "h_count", "g"}


def test_dashboard_has_the_panels_users_look_for() -> None:
    board = dashboard()
    assert board["uid"] == "oodserve"
    titles = {panel["title"] for panel in panels(board)}
    for title in (
        "OOD rate over time vs alpha",
        "Verdict counts",
        "Signal p-values: $signal",
        "Fused p-value histogram (dashboard range)",
        "Scoring request latency quantiles",
        "Batch size",
        "Active provider",
        "Drift martingale (log10) vs alarm threshold",
        "Drift change statistic (log10 Shiryaev-Roberts)",
    ):
        assert title in titles
    by_title = {panel["title"]: panel for panel in panels(board)}
    per_signal = by_title["Signal p-values: $signal"]
    assert per_signal["type"] == "heatmap" and per_signal["repeat"] == "signal"
    assert all(target["format"] == "heatmap" for target in per_signal["targets"])
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in panels(board):
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
    ids = [panel["id"] for panel in panels(board)]
    assert len(ids) == len(set(ids))


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards() -> None:
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert (source["type"], source["url"], source["isDefault"]) == ("prometheus", "http://prometheus:9090", True)
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "oodserve.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_every_expression_names_metrics_the_service_exports(live_stack: LiveStack) -> None:
    exported = exported_series_names(live_stack.metrics_text) | PROMETHEUS_OWN_SERIES
    expressions = dashboard_expressions(dashboard()) + alert_expressions()
    assert len(expressions) > 30
    unknown = {(where, name) for where, expr in expressions for name in metric_names(expr) if name not in exported}
    assert not unknown, f"names not exported by the service: {sorted(unknown)}"
    referenced = {name for _, expr in expressions for name in metric_names(expr)}
    for name in ("oodserve_inputs_scored_total", "oodserve_ood_rate", "oodserve_signal_p_value_bucket", "oodserve_model_info"):
        assert name in referenced


def substitute_variables(expr: str, signal: str) -> str:
    """What Grafana sends: $model = All (regex .*), one signal, 1 m rate interval, 1 h range."""
    return (
        expr.replace("$__rate_interval", "1m")
        .replace("$__range", "1h")
        .replace("$model", ".*")
        .replace("$signal", signal)
    )


@pytest.mark.parametrize(
    "title",
    [
        "OOD rate (last verdicts window)",
        "Active provider",
        "OOD rate over time vs alpha",
        "Verdict counts",
        "Fused p-value histogram (dashboard range)",
        "Signal p-values: $signal",
        "Scoring request latency quantiles",
        "onnxruntime time per ONNX model",
        "Batch size",
        "Requests by endpoint and status",
        "Queue depth vs capacity",
        "Refused score requests (503 queue full, 504 deadline)",
        "Drift martingale (log10) vs alarm threshold",
        "Drift change statistic (log10 Shiryaev-Roberts)",
        "Drift alarms and inputs since restart",
    ],
)
def test_dashboard_panel_queries_return_data_from_prometheus(live_stack: LiveStack, title: str) -> None:
    signals = live_stack.query("count by (signal) (oodserve_signal_p_value_count)")["data"]["result"]
    signal = sorted(item["metric"]["signal"] for item in signals)[0]
    (panel,) = [panel for panel in panels(dashboard()) if panel["title"] == title]
    for target in panel["targets"]:
        answer = live_stack.query(substitute_variables(target["expr"], signal))
        assert answer["status"] == "success", (title, target["expr"], answer)
        assert answer["data"]["result"], (title, target["expr"])


def test_every_dashboard_query_is_valid_promql(live_stack: LiveStack) -> None:
    for where, expr in dashboard_expressions(dashboard()):
        answer = live_stack.query(substitute_variables(expr, "typicality"))
        assert answer["status"] == "success", (where, expr, answer)
