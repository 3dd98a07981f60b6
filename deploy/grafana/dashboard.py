"""Switchyard's Grafana dashboard, generated: ``python deploy/grafana/dashboard.py`` (or
``make dashboard``) writes helm/switchyard/dashboards/switchyard-dashboard.json, which the chart
ships as a ConfigMap and deploy/grafana/switchyard-dashboard.json links to.
tests/unit/test_dashboard_json.py fails while the file differs from what this script writes, and
tests/integration/test_dashboard.py runs every query against a real Prometheus.

Every series is described in docs/architecture.md ("Metrics"). Envoy names a model's cluster
``<namespace>/<policy>/<model>`` in its stats, and ``.../<model>~fallbacks`` for the aggregate
cluster a model with fallbacks is routed to, so ``($policy)/($model)`` selects the same
policies and models in Envoy's series as in the ext_proc's ``policy`` and ``model`` labels.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUTPUT = (
    Path(__file__).resolve().parents[2] / "helm/switchyard/dashboards/switchyard-dashboard.json"
)
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "[$__rate_interval]"
RANGE = "[$__range]"
ROUTED = '{policy=~"$policy", model=~"$model"}'
"""The ext_proc's series of the chosen policies and models."""
MODEL_CLUSTERS = '{envoy_cluster_name=~"($policy)/($model)"}'
"""Envoy's clusters of the chosen models themselves (connection-level series)."""
ROUTE_CLUSTERS = '{envoy_cluster_name=~"($policy)/($model)(~fallbacks)?"}'
"""The clusters the routes send the chosen models' requests to (request-level series: a model
with fallbacks is routed to its aggregate cluster, which counts the request once, whichever
model answered)."""
FALLBACK_CLUSTERS = '{envoy_cluster_name=~"($policy)/($model)~fallbacks"}'

Panel = dict[str, Any]


def target(expr: str, legend: str, ref: str = "A") -> dict[str, Any]:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": ref}


def targets(*pairs: tuple[str, str]) -> list[dict[str, Any]]:
    return [target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(pairs)]


def timeseries(
    title: str,
    description: str,
    queries: list[dict[str, Any]],
    unit: str,
    stack: bool = False,
    width: int = 12,
) -> Panel:
    custom: dict[str, Any] = {"fillOpacity": 10, "showPoints": "never", "spanNulls": True}
    if stack:
        custom |= {"fillOpacity": 60, "stacking": {"mode": "normal", "group": "A"}}
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": queries,
        "fieldConfig": {"defaults": {"unit": unit, "min": 0, "custom": custom}, "overrides": []},
        "options": {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "gridPos": {"w": width, "h": 8},
    }


def stat(
    title: str,
    description: str,
    queries: list[dict[str, Any]],
    unit: str = "none",
    red_from: float | None = None,
    text_mode: str = "value_and_name",
    width: int = 4,
) -> Panel:
    steps: list[dict[str, Any]] = [{"color": "green", "value": None}]
    if red_from is not None:
        steps.append({"color": "red", "value": red_from})
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": queries,
        "fieldConfig": {
            "defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}},
            "overrides": [],
        },
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value" if red_from is not None else "none",
            "graphMode": "none",
            "textMode": text_mode,
            "justifyMode": "auto",
            "orientation": "auto",
        },
        "gridPos": {"w": width, "h": 5},
    }


def quantiles(series: str, by: str, selector: str, legend: str) -> list[dict[str, Any]]:
    """p50 and p99 of a histogram, per ``by``."""
    rate = f"sum by ({by}le) (rate({series}{selector}{RATE}))"
    return targets(
        (f"histogram_quantile(0.5, {rate})", f"p50 {legend}".strip()),
        (f"histogram_quantile(0.99, {rate})", f"p99 {legend}".strip()),
    )


def traffic() -> list[Panel]:
    return [
        timeseries(
            "Requests/s by routed model",
            "Route distribution: requests the ext_proc routed, by the model it chose "
            "(switchyard_decisions_total). A fallback is counted here under the chosen model; "
            "'Responses/s' shows the model that answered.",
            targets(
                (
                    f"sum by (policy, model) (rate(switchyard_decisions_total{ROUTED}{RATE}))",
                    "{{policy}} {{model}}",
                )
            ),
            "reqps",
            stack=True,
        ),
        timeseries(
            "Decisions/s by kind",
            "How the model was chosen: classifier, rule, default, weighted, direct (a concrete "
            "model name).",
            targets(
                (
                    f"sum by (kind) (rate(switchyard_decisions_total{ROUTED}{RATE}))",
                    "{{kind}}",
                )
            ),
            "reqps",
            stack=True,
            width=6,
        ),
        {
            "type": "piechart",
            "title": "Share of requests by routed model",
            "description": "Requests routed to each model over the dashboard's time range.",
            "datasource": DATASOURCE,
            "targets": targets(
                (
                    f"sum by (model) (increase(switchyard_decisions_total{ROUTED}{RANGE}))",
                    "{{model}}",
                )
            ),
            "fieldConfig": {"defaults": {"unit": "short"}, "overrides": []},
            "options": {
                "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                "pieType": "donut",
                "legend": {"displayMode": "table", "placement": "right", "values": ["percent"]},
                "tooltip": {"mode": "single"},
            },
            "gridPos": {"w": 6, "h": 8},
        },
        timeseries(
            "Responses/s by answering model and outcome",
            "Routed responses by the model that answered: complete, incomplete (the client "
            "hung up or the upstream failed mid-body) or error (an HTTP error status).",
            targets(
                (
                    f"sum by (model, outcome) (rate(switchyard_responses_total{ROUTED}{RATE}))",
                    "{{model}} {{outcome}}",
                )
            ),
            "reqps",
        ),
        timeseries(
            "Rejections/s by status and code",
            "Requests the ext_proc answered itself with an OpenAI-style error (bad JSON, "
            "unknown model, no model fits, ...).",
            targets(
                (
                    f"sum by (status, code) (rate(switchyard_rejections_total{RATE}))",
                    "{{status}} {{code}}",
                )
            ),
            "reqps",
        ),
    ]


def cost() -> list[Panel]:
    return [
        timeseries(
            "Cost per route ($/h)",
            "Spend rate at the policies' prices, by policy and answering model "
            "(switchyard_cost_usd_total, tokens as the provider reported them).",
            targets(
                (
                    "3600 * sum by (policy, model) "
                    f"(rate(switchyard_cost_usd_total{ROUTED}{RATE}))",
                    "{{policy}} {{model}}",
                )
            ),
            "currencyUSD",
            stack=True,
            width=10,
        ),
        stat(
            "Cost in range",
            "Spend over the dashboard's time range.",
            targets(
                (f"sum(increase(switchyard_cost_usd_total{ROUTED}{RANGE}))", "cost"),
            ),
            unit="currencyUSD",
            text_mode="value",
        ),
        timeseries(
            "Cost per response",
            "Average cost of one response, by answering model.",
            targets(
                (
                    f"sum by (policy, model) (rate(switchyard_cost_usd_total{ROUTED}{RATE}))"
                    " / sum by (policy, model) "
                    f"(rate(switchyard_responses_total{ROUTED}{RATE}))",
                    "{{policy}} {{model}}",
                )
            ),
            "currencyUSD",
            width=10,
        ),
        timeseries(
            "Tokens/s by model and direction",
            "Input and output tokens of routed requests, by answering model (as the provider "
            "reported them; estimated for incomplete responses).",
            targets(
                (
                    f"sum by (model, direction) (rate(switchyard_tokens_total{ROUTED}{RATE}))",
                    "{{model}} {{direction}}",
                )
            ),
            "short",
            stack=True,
            width=24,
        ),
    ]


def fallbacks() -> list[Panel]:
    fallback_rate = (
        "sum by (policy, model) (label_replace(rate(switchyard_fallbacks_total"
        f'{{policy=~"$policy", from_model=~"$model"}}{RATE}), "model", "$1", "from_model", "(.*)"))'
        f" / sum by (policy, model) (rate(switchyard_decisions_total{ROUTED}{RATE}))"
    )
    return [
        timeseries(
            "Fallbacks/s (chosen → answering model)",
            "Responses from a fallback instead of the chosen model: Envoy retried the request "
            "on the next model after a connect failure, reset, 5xx or 429 "
            "(switchyard_fallbacks_total).",
            targets(
                (
                    "sum by (policy, from_model, to_model) (rate(switchyard_fallbacks_total"
                    f'{{policy=~"$policy", from_model=~"$model"}}{RATE}))',
                    "{{from_model}} → {{to_model}}",
                )
            ),
            "reqps",
            width=8,
        ),
        timeseries(
            "Fallback rate",
            "Share of the requests routed to a model that another model answered.",
            targets((fallback_rate, "{{policy}} {{model}}")),
            "percentunit",
            width=8,
        ),
        timeseries(
            "Failed attempts by cause (Envoy)",
            "Why attempts failed, from Envoy's per-cluster stats (the ext_proc sees only which "
            "model answered): HTTP status of attempts retried on a fallback "
            "(envoy_cluster_retry_upstream_rq on the ~fallbacks cluster), connect failures and "
            "upstream resets (the model's own cluster), timeouts, and requests whose fallbacks "
            "ran out.",
            targets(
                (
                    "sum by (envoy_cluster_name, envoy_response_code) "
                    f"(rate(envoy_cluster_retry_upstream_rq{FALLBACK_CLUSTERS}{RATE}))",
                    "{{envoy_cluster_name}} HTTP {{envoy_response_code}}",
                ),
                (
                    "sum by (envoy_cluster_name) "
                    f"(rate(envoy_cluster_upstream_cx_connect_fail{MODEL_CLUSTERS}{RATE}))",
                    "{{envoy_cluster_name}} connect failure",
                ),
                (
                    "sum by (envoy_cluster_name) (rate(envoy_cluster_upstream_cx_destroy_remote"
                    f"_with_active_rq{MODEL_CLUSTERS}{RATE}))",
                    "{{envoy_cluster_name}} reset by upstream",
                ),
                (
                    "sum by (envoy_cluster_name) "
                    f"(rate(envoy_cluster_upstream_rq_timeout{ROUTE_CLUSTERS}{RATE})"
                    f" + rate(envoy_cluster_upstream_rq_per_try_timeout{ROUTE_CLUSTERS}{RATE}))",
                    "{{envoy_cluster_name}} timeout",
                ),
                (
                    "sum by (envoy_cluster_name) "
                    f"(rate(envoy_cluster_upstream_rq_retry_limit_exceeded{FALLBACK_CLUSTERS}{RATE}))",
                    "{{envoy_cluster_name}} fallbacks exhausted",
                ),
            ),
            "reqps",
            width=8,
        ),
    ]


def latency() -> list[Panel]:
    return [
        timeseries(
            "Upstream latency p50/p99 by model (Envoy)",
            "Time from the upstream request to the end of the upstream response "
            "(envoy_cluster_upstream_rq_time, ms). A model with fallbacks is measured on its "
            "~fallbacks cluster, failed attempts and the fallback's answer included.",
            quantiles(
                "envoy_cluster_upstream_rq_time_bucket",
                "envoy_cluster_name, ",
                ROUTE_CLUSTERS,
                "{{envoy_cluster_name}}",
            ),
            "ms",
        ),
        timeseries(
            "Upstream errors/s by model (Envoy)",
            "Responses with a 4xx or 5xx status that reached the client, by the cluster the "
            "request was routed to (after any fallbacks).",
            targets(
                (
                    "sum by (envoy_cluster_name, envoy_response_code) (rate("
                    'envoy_cluster_upstream_rq{envoy_cluster_name=~"($policy)/($model)'
                    f'(~fallbacks)?", envoy_response_code=~"[45].."}}{RATE}))',
                    "{{envoy_cluster_name}} {{envoy_response_code}}",
                )
            ),
            "reqps",
        ),
        timeseries(
            "Decision latency p50/p99 (ext_proc)",
            "Time from a request's body to its routing decision in the ext_proc "
            "(switchyard_decision_duration_seconds).",
            quantiles(
                "switchyard_decision_duration_seconds_bucket",
                "policy, ",
                '{policy=~"$policy"}',
                "{{policy}}",
            ),
            "s",
        ),
        timeseries(
            "Classifier latency p50/p99 (ext_proc)",
            "The router model's share of the decision, per bundle, batching included "
            "(switchyard_classifier_duration_seconds).",
            quantiles(
                "switchyard_classifier_duration_seconds_bucket", "bundle, ", "", "{{bundle}}"
            ),
            "s",
        ),
    ]


def config_state() -> list[Panel]:
    return [
        stat(
            "Config generation",
            "Configs the control plane started to deliver since it started.",
            targets(("max(switchyard_operator_config_generation)", "generation")),
            text_mode="value",
        ),
        stat(
            "Config version",
            "The RoutingConfig version the ext_procs are sent now.",
            targets(("max by (version) (switchyard_operator_config_info)", "{{version}}")),
            text_mode="name",
        ),
        stat(
            "Clients behind",
            "Connected Envoys and ext_procs not on the current config: delivery is stuck while "
            "it stays above 0.",
            targets(("sum by (kind) (switchyard_operator_clients_behind)", "{{kind}}")),
            red_from=1,
        ),
        stat(
            "Connected clients",
            "Open ADS (envoy) and config stream (extproc) streams.",
            targets(("sum by (kind) (switchyard_operator_connected_clients)", "{{kind}}")),
        ),
        stat(
            "Policies not ready",
            "RoutePolicies whose Ready condition is False.",
            targets(
                ('sum(switchyard_operator_policies{state="not_ready"})', "not ready"),
            ),
            red_from=1,
            text_mode="value",
        ),
        stat(
            "Config apply p99",
            "Seconds from an apply until every Envoy and ext_proc ACKed it, over the time range "
            "(switchyard_operator_config_apply_seconds).",
            targets(
                (
                    "histogram_quantile(0.99, sum by (le) "
                    f"(increase(switchyard_operator_config_apply_seconds_bucket{RANGE})))",
                    "p99",
                )
            ),
            unit="s",
            text_mode="value",
        ),
        timeseries(
            "ACKs and NACKs per client",
            "Responses to pushed config per Envoy node and ext_proc replica; any NACK means a "
            "client rejected a config (the operator restores the previous one).",
            targets(
                (
                    "sum by (client, result) "
                    f"(increase(switchyard_operator_xds_responses_total{RATE}))",
                    "{{client}} {{result}}",
                )
            ),
            "short",
        ),
        timeseries(
            "Applies and reconcile errors",
            "Config applies by result (acked, rejected, timeout) and RoutePolicy reconciles "
            "that did not end Ready, by reason.",
            targets(
                (
                    f"sum by (result) (increase(switchyard_operator_config_applies_total{RATE}))",
                    "apply {{result}}",
                ),
                (
                    f"sum by (reason) (increase(switchyard_operator_reconcile_errors_total{RATE}))",
                    "reconcile error {{reason}}",
                ),
            ),
            "short",
        ),
    ]


ROWS = (
    ("Traffic", traffic),
    ("Cost and tokens", cost),
    ("Fallbacks", fallbacks),
    ("Latency and upstream errors", latency),
    ("Config delivery (control plane)", config_state),
)


def layout() -> list[Panel]:
    """Rows of panels, left to right, wrapping at Grafana's 24 columns; ids in order."""
    panels: list[Panel] = []
    y = 0
    for title, build in ROWS:
        panels.append(
            {"type": "row", "title": title, "collapsed": False, "panels": [],
             "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}}
        )  # fmt: skip
        y += 1
        x = height = 0
        for panel in build():
            grid = panel["gridPos"]
            if x + grid["w"] > 24:
                x, y, height = 0, y + height, 0
            grid |= {"x": x, "y": y}
            x, height = x + grid["w"], max(height, grid["h"])
            panels.append(panel)
        y += height
    for number, panel in enumerate(panels, start=1):
        panel["id"] = number
    return panels


def variable(name: str, label: str, query: str, regex: str = "") -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": query,
        "query": query,  # the classic string form: every Grafana version migrates it itself
        "regex": regex,
        "refresh": 2,
        "sort": 1,
        "multi": True,
        "includeAll": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "hide": 0,
        "options": [],
    }


def dashboard() -> dict[str, Any]:
    return {
        "uid": "switchyard",
        "title": "Switchyard",
        "description": "LLM routing: route distribution, cost, tokens, fallbacks, latency and "
        "config delivery (ext_proc, Envoy and operator metrics).",
        "tags": ["switchyard", "llm", "envoy"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "",
        "annotations": {"list": []},
        "links": [],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "regex": "",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                    "options": [],
                },
                variable("policy", "Policy", "label_values(switchyard_decisions_total, policy)"),
                # Every model Envoy has a cluster for, fallback-only models included.
                variable(
                    "model",
                    "Model",
                    'label_values(envoy_cluster_membership_total{envoy_cluster_name=~"($policy)/.+"}'
                    ", envoy_cluster_name)",
                    regex="/.*\\/([^\\/~]+)$/",
                ),
            ]
        },
        "panels": layout(),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(render(), encoding="utf-8")
    print(f"wrote {OUTPUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
