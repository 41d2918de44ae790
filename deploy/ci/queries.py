"""Every PromQL expression the deployment ships, made runnable against the compose Prometheus.

Sources: the Grafana dashboard (its panels and its template variable), the alert rules, and the
prometheus-adapter rules behind the autoscaler. Each expression is rewritten only where it
cannot run as written outside its home, and each rewrite is one named rule:
- Grafana's `$model` becomes the regex Grafana sends for "All" (the variable's own values) and
  `$__rate_interval` what Grafana computes for a Prometheus data source with the default 15 s
  scrape interval setting (4 x 15 s).
- An alert's comparison with a number (`> 0.95`) gets `bool`, so the expression returns its
  series whether or not the alert fires (a firing alert is not what "returns data" means).
- The adapter's templates are rendered as the adapter does for one pod, with compose's target
  labels (job, instance) standing in for the labels that Kubernetes service discovery adds
  (namespace, pod): those two exist only under a ServiceMonitor.
Stdlib and PyYAML only: the smoke script runs this outside the project's virtual environment.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/dashboards/logquant.json"
ALERTS = ROOT / "deploy/prometheus/alerts.yml"
ADAPTER = ROOT / "deploy/k8s/base/prometheus-adapter-rules.yaml"

GRAFANA_RATE_INTERVAL = "1m"  # max($__interval + 15s, 4 x 15s) at the default scrape interval setting
K8S_TARGET_LABELS = {"namespace": "job", "pod": "instance"}  # label -> compose's stand-in
METRIC = re.compile(r"\b(logquant:[a-zA-Z0-9_]+)")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*\"")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
SCALAR_COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)\s*(?!bool\b)(-?[0-9][0-9.e+-]*)")


@dataclass(frozen=True)
class Query:
    source: str  # where it comes from, e.g. "dashboard: KV cache usage"
    expr: str  # as shipped
    runnable: str  # as sent to Prometheus


def grafana_regex(values: list[str]) -> str:
    """What Grafana puts in `=~"$var"` for a multi-value variable set to All (no custom value)."""
    escaped = [re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\\\1", v) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def dashboard_variable_query(path: Path = DASHBOARD) -> tuple[str, str, str]:
    """(variable name, metric, label) of the dashboard's one `label_values(metric, label)` variable."""
    (variable,) = json.loads(path.read_text())["templating"]["list"]
    found = re.fullmatch(r"label_values\(\s*([^,]+?)\s*,\s*(\w+)\s*\)", variable["query"])
    assert found, variable["query"]
    return variable["name"], found.group(1), found.group(2)


def dashboard_queries(variable_values: list[str], path: Path = DASHBOARD) -> list[Query]:
    dashboard = json.loads(path.read_text())
    name, _, _ = dashboard_variable_query(path)
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            runnable = target["expr"].replace("$__rate_interval", GRAFANA_RATE_INTERVAL)
            runnable = runnable.replace(f"${name}", grafana_regex(variable_values))
            assert "$" not in runnable, f"unknown Grafana variable in {target['expr']}"
            queries.append(Query(f"dashboard: {panel['title']} ({target['refId']})", target["expr"], runnable))
    return queries


def returning_series(expr: str) -> str:
    """`a > 0.95` -> `a > bool 0.95`: the expression's series whether or not the condition holds."""
    return SCALAR_COMPARISON.sub(r"\1 bool \2", expr)


def alert_queries(path: Path = ALERTS) -> list[Query]:
    groups = yaml.safe_load(path.read_text())["groups"]
    return [
        Query(f"alert: {rule['alert']}", rule["expr"].strip(), returning_series(" ".join(rule["expr"].split())))
        for group in groups
        for rule in group["rules"]
    ]


def adapter_queries(path: Path = ADAPTER) -> list[Query]:
    """The adapter's seriesQuery and metricsQuery, rendered for one pod of the compose stack."""
    config = yaml.safe_load(yaml.safe_load(path.read_text())["data"]["config.yaml"])
    queries = []
    for rule in config["rules"]:
        series_query = without_k8s_matchers(rule["seriesQuery"])
        metric = METRIC.search(series_query).group(1)
        metrics_query = (
            rule["metricsQuery"]
            .replace("<<.Series>>", metric)
            .replace("<<.LabelMatchers>>", 'job="logquant"')
            .replace("<<.GroupBy>>", K8S_TARGET_LABELS["pod"])
        )
        queries.append(Query(f"autoscaler: seriesQuery of {metric}", rule["seriesQuery"], series_query))
        queries.append(Query(f"autoscaler: metricsQuery of {metric}", rule["metricsQuery"], metrics_query))
    return queries


def without_k8s_matchers(selector: str) -> str:
    """`m{namespace!="",pod!=""}` -> `m`: drop matchers on labels only Kubernetes discovery adds."""
    labels = "|".join(K8S_TARGET_LABELS)
    selector = re.sub(rf'\b(?:{labels})\s*(?:=~|!~|!=|=)\s*"[^"]*"\s*,?\s*', "", selector)
    return selector.replace("{}", "")


def label_names(expr: str) -> set[str]:
    """Label names an expression matches on or groups by."""
    names = {m.group(1) for m in MATCHER.finditer(expr)}
    for grouping in GROUPING.finditer(expr):
        names |= {n.strip() for n in grouping.group(1).split(",") if n.strip()}
    return names


def metric_names(expr: str) -> set[str]:
    return set(METRIC.findall(expr))


def all_queries(variable_values: list[str]) -> list[Query]:
    return dashboard_queries(variable_values) + alert_queries() + adapter_queries()
