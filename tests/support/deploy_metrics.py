"""Which metric names the deployment files use, and which ones exist.

The Grafana dashboard, the alert rules and the prometheus-adapter rules all name metrics inside
PromQL strings, and the HorizontalPodAutoscalers name the adapter's metrics, where a typo fails
silently: an empty panel, an alert that never fires, an HPA that never scales. This module pulls
every metric name out of those strings with a real PromQL parser (`promql-parser`), and follows
each HPA metric through the adapter rule that serves it, so that tests can compare them with the
names that exist:

    referenced_metric_names()      every metric the deployment files reference   (main entry point)
    hpa_metric_series()            the series behind the HPAs' custom metrics
    documented_metric_series()     the minigpt5_* series that docs/API.md promises
    TRITON_251_METRICS             Triton 2.51's own nv_* series
    exposition_series_names(text)  the series in a live /metrics page, for a check against a server

All names are *series* names as they appear on /metrics: a histogram `x` is `x_bucket`, `x_sum` and
`x_count`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import promql_parser
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
MONITORING = REPO_ROOT / "deploy" / "monitoring"
DASHBOARDS_DIR = MONITORING / "grafana" / "dashboards"
PROMETHEUS_RULE = MONITORING / "prometheusrule.yaml"
COMPOSE_RULES_DIR = MONITORING / "prometheus" / "rules"
ADAPTER_VALUES = MONITORING / "prometheus-adapter" / "values.yaml"
K8S = REPO_ROOT / "deploy" / "k8s"
API_MD = REPO_ROOT / "docs" / "API.md"

# Triton 2.51 (NGC 24.10) metric names, without the opt-in summaries (`--metrics-config
# summary_latencies=true`, *_summary_us) and response-cache series (nv_cache_*), which this
# deployment does not enable.
# How they were checked:
#   - seen on /metrics of the real tritonserver 2.51.0 binary (nvidia-pytriton 0.7.0) serving a python
#     backend model on CPU: the nv_inference_*, nv_pinned_memory_pool_* and nv_cpu_* names below;
#   - the GPU ones (only exported where there is a GPU) read from triton-inference-server/core at tag
#     r24.10, src/metrics.cc: nv_gpu_*, nv_energy_consumption.
# Labels: per-model series carry `model` and `version`; nv_inference_request_failure also `reason`
# (REJECTED, CANCELED, BACKEND, OTHER); GPU series carry `gpu_uuid`.
TRITON_251_METRICS: frozenset[str] = frozenset(
    {
        # per model (counters, microseconds where *_us)
        "nv_inference_request_success",
        "nv_inference_request_failure",
        "nv_inference_count",
        "nv_inference_exec_count",
        "nv_inference_request_duration_us",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_input_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_inference_compute_output_duration_us",
        # per model (gauge)
        "nv_inference_pending_request_count",
        # server memory pools and host (gauges)
        "nv_pinned_memory_pool_total_bytes",
        "nv_pinned_memory_pool_used_bytes",
        "nv_cpu_utilization",
        "nv_cpu_memory_total_bytes",
        "nv_cpu_memory_used_bytes",
        # per GPU (gauges, except the energy counter)
        "nv_gpu_utilization",
        "nv_gpu_memory_total_bytes",
        "nv_gpu_memory_used_bytes",
        "nv_gpu_power_usage",
        "nv_gpu_power_limit",
        "nv_energy_consumption",
    }
)

# Grafana's built-in interval variables; a duration is all PromQL needs to parse them.
_GRAFANA_DURATION_VARS = re.compile(
    r"\$(?:\{__(?:rate_interval|interval|range)(?::\w+)?\}|__(?:rate_interval|interval|range)\b)"
)
# prometheus-adapter's Go-template placeholders in metricsQuery.
_ADAPTER_PLACEHOLDERS = {
    "<<.LabelMatchers>>": 'namespace="adapter-placeholder"',
    "<<.GroupBy>>": "pod",
}


def promql_metric_names(expr: str) -> set[str]:
    """Every metric name that a PromQL expression selects.

    Grafana variables are allowed: `$__rate_interval` and friends are replaced by a duration, and
    `$var` inside label values are plain strings to PromQL. A selector that picks metrics by a
    regular expression on `__name__` cannot be checked and raises ValueError, as does an
    expression that does not parse.
    """
    text = _GRAFANA_DURATION_VARS.sub("5m", expr)
    try:
        ast = promql_parser.parse(text)
    except Exception as err:  # the parser raises plain exceptions carrying the position
        raise ValueError(f"PromQL does not parse: {expr!r}: {err}") from err
    names: set[str] = set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            for matcher in node.matchers.matchers:
                if matcher.name != "__name__":
                    continue
                if matcher.op != promql_parser.MatchOp.Equal:
                    raise ValueError(f"__name__ must be matched exactly to be checkable: {expr!r}")
                names.add(matcher.value)
        return True

    promql_parser.walk(ast, visit)
    return names


# --- where the expressions live -------------------------------------------------------------------


def _walk_panels(panels: Iterable[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from _walk_panels(panel.get("panels", []))  # collapsed rows nest their panels


def _template_query_exprs(query: str) -> list[str]:
    """PromQL inside a Grafana Prometheus variable query (label_values / query_result)."""
    query = query.strip()
    m = re.fullmatch(r"label_values\((?P<arg>.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)", query, re.S)
    if m:
        return [m.group("arg")]
    if re.fullmatch(r"label_values\(\s*[A-Za-z_][A-Za-z0-9_]*\s*\)", query) or query.startswith("label_names("):
        return []  # a label only, no metric
    m = re.fullmatch(r"query_result\((?P<arg>.*)\)", query, re.S)
    if m:
        return [m.group("arg")]
    if query.startswith("metrics("):
        raise ValueError(f"metrics(regex) variables cannot be checked: {query!r}")
    return [query]  # a bare PromQL query


def dashboard_exprs(dashboard: dict) -> list[str]:
    """Every PromQL string of a Grafana dashboard: panel targets and templating variables."""
    exprs = []
    for panel in _walk_panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                exprs.append(target["expr"])
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        if query:
            exprs.extend(_template_query_exprs(query))
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if annotation.get("expr"):
            exprs.append(annotation["expr"])
    return exprs


def rule_group_exprs(groups: list[dict]) -> tuple[list[str], set[str]]:
    """(every `expr` of Prometheus rule groups, the names that recording rules define)."""
    exprs, recorded = [], set()
    for group in groups:
        for rule in group.get("rules", []):
            exprs.append(rule["expr"])
            if "record" in rule:
                recorded.add(rule["record"])
    return exprs, recorded


def adapter_rule_exprs(values: dict) -> list[str]:
    """The PromQL of prometheus-adapter rules (Helm values `rules.custom` or a plain `rules:` list),
    with the adapter's <<.Series>>/<<.LabelMatchers>>/<<.GroupBy>> placeholders filled in."""
    rules = values.get("rules", [])
    if isinstance(rules, dict):
        rules = rules.get("custom", [])
    exprs = []
    for rule in rules:
        series_query = rule["seriesQuery"]
        exprs.append(series_query)
        if "metricsQuery" in rule:
            series = sorted(promql_metric_names(series_query))
            if len(series) != 1:
                raise ValueError(f"seriesQuery should select one metric: {series_query!r}")
            query = rule["metricsQuery"].replace("<<.Series>>", series[0])
            for placeholder, value in _ADAPTER_PLACEHOLDERS.items():
                query = query.replace(placeholder, value)
            exprs.append(query)
    return exprs


def adapter_series(values: dict) -> dict[str, str]:
    """{name the adapter serves (its rule's `name.as`): the series its seriesQuery selects}."""
    rules = values.get("rules", [])
    if isinstance(rules, dict):
        rules = rules.get("custom", [])
    served = {}
    for rule in rules:
        (series,) = promql_metric_names(rule["seriesQuery"])
        served[rule.get("name", {}).get("as", series)] = series
    return served


def hpa_custom_metrics(root: Path | None = None) -> dict[str, str]:
    """{custom metric name: the HPA file naming it} for every HorizontalPodAutoscaler under deploy/k8s
    (Pods and Object metrics; Resource metrics such as cpu come from the kubelet, not Prometheus)."""
    root = Path(root) if root else REPO_ROOT
    found = {}
    for path in sorted((root / K8S.relative_to(REPO_ROOT)).rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict) or doc.get("kind") != "HorizontalPodAutoscaler":
                continue
            for metric in doc.get("spec", {}).get("metrics", []):
                kind = metric["type"]
                if kind in ("Pods", "Object"):
                    found[metric[kind.lower()]["metric"]["name"]] = str(path.relative_to(root))
    return found


def hpa_metric_series(root: Path | None = None) -> set[str]:
    """The series behind the HPAs' custom metrics, through the adapter rules that serve them. An HPA
    metric that no adapter rule serves raises ValueError: that HPA would never get a value."""
    root = Path(root) if root else REPO_ROOT
    served = adapter_series(yaml.safe_load((root / ADAPTER_VALUES.relative_to(REPO_ROOT)).read_text()))
    missing = {name: path for name, path in hpa_custom_metrics(root).items() if name not in served}
    if missing:
        raise ValueError(f"HPA metrics that prometheus-adapter does not serve: {missing}")
    return {served[name] for name in hpa_custom_metrics(root)}


def deployment_exprs(root: Path | None = None) -> dict[str, list[str]]:
    """Every PromQL string of the deployment files, by the file it comes from."""
    root = Path(root) if root else REPO_ROOT
    mon = root / MONITORING.relative_to(REPO_ROOT)
    found: dict[str, list[str]] = {}
    for path in sorted((mon / "grafana" / "dashboards").glob("*.json")):
        found[str(path.relative_to(root))] = dashboard_exprs(json.loads(path.read_text()))
    prometheus_rule = yaml.safe_load((mon / "prometheusrule.yaml").read_text())
    found[str((mon / "prometheusrule.yaml").relative_to(root))] = rule_group_exprs(prometheus_rule["spec"]["groups"])[0]
    for path in sorted((mon / "prometheus" / "rules").glob("*.yml")):
        found[str(path.relative_to(root))] = rule_group_exprs(yaml.safe_load(path.read_text())["groups"])[0]
    adapter = mon / "prometheus-adapter" / "values.yaml"
    found[str(adapter.relative_to(root))] = adapter_rule_exprs(yaml.safe_load(adapter.read_text()))
    return found


def _recorded_names(root: Path) -> set[str]:
    mon = root / MONITORING.relative_to(REPO_ROOT)
    recorded = rule_group_exprs(yaml.safe_load((mon / "prometheusrule.yaml").read_text())["spec"]["groups"])[1]
    for path in (mon / "prometheus" / "rules").glob("*.yml"):
        recorded |= rule_group_exprs(yaml.safe_load(path.read_text())["groups"])[1]
    return recorded


def referenced_metric_names(root: Path | None = None) -> set[str]:
    """Every metric name the dashboard(s), the alert rules (PrometheusRule and the compose rule
    files), the prometheus-adapter rules and the HPAs (through the adapter) reference, as series
    names (`x_bucket`, not `x`). Names that the recording rules themselves define are left out: they
    are not scraped."""
    root = Path(root) if root else REPO_ROOT
    names: set[str] = hpa_metric_series(root)
    for exprs in deployment_exprs(root).values():
        for expr in exprs:
            names |= promql_metric_names(expr)
    return names - _recorded_names(root)


# --- what exists ------------------------------------------------------------------------------------

_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
_SUMMARY_SUFFIXES = ("_sum", "_count")


def documented_metrics(api_md: Path | None = None) -> dict[str, str]:
    """{metric family: kind} from the metrics table of docs/API.md (rows "| `name` | kind | ...")."""
    text = Path(api_md or API_MD).read_text()
    return {
        m.group("name"): m.group("kind")
        for m in re.finditer(
            r"^\|\s*`(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)`\s*\|\s*(?P<kind>counter|gauge|histogram|summary)\s*\|",
            text,
            re.M,
        )
    }


def series_names(family: str, kind: str) -> set[str]:
    """The series names a metric family of this kind shows on /metrics."""
    if kind == "histogram":
        return {family + s for s in _HISTOGRAM_SUFFIXES}
    if kind == "summary":
        return {family} | {family + s for s in _SUMMARY_SUFFIXES}
    return {family}


def documented_metric_series(api_md: Path | None = None) -> set[str]:
    """Every series name that docs/API.md's metrics table promises (histograms expanded)."""
    out: set[str] = set()
    for family, kind in documented_metrics(api_md).items():
        out |= series_names(family, kind)
    return out


def known_metric_names(api_md: Path | None = None) -> set[str]:
    """The names the deployment files may reference: docs/API.md's plus Triton 2.51's."""
    return documented_metric_series(api_md) | set(TRITON_251_METRICS)


def exposition_series_names(text: str) -> set[str]:
    """Series names in a Prometheus text exposition (the body of GET :8002/metrics)."""
    names = set()
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line)
        if m:
            names.add(m.group(0))
    return names
