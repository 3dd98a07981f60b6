"""The metrics and the Grafana dashboard against real parts: `switchyard up` (real Envoy, the
ext_proc workers, demo upstreams, and the control plane serving the operator's metrics) scraped
every second by a real Prometheus (tests/infra/build_prometheus.sh) while the official openai
client sends a small known load: non-streaming and streaming requests, a fallback, a model that
fails with no fallback and an unknown model, after one invalid and one valid policy edit.

What Prometheus stored equals that load (requests per model, tokens equal to the responses'
usage, cost equal to tokens times prices, the fallback, the edits), and every query of the
dashboard, its template variables substituted, reads only metrics the components export and
returns data. The load comes in two rounds with a scrape between them, so every counter it
touches was scraped before its last increase and each rate and quantile has a finite value.
"""

from __future__ import annotations

import copy
import json
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
import yaml
from gateway_harness import REPO, Gateway, start_gateway, url_model
from prometheus import Prometheus
from prometheus_client.parser import text_string_to_metric_families
from promql import label_values_names, metric_names

from switchyard.local.ports import free_port_block
from switchyard.local.runner import port_open, wait_until

POLICY = "default/metered"
CLUSTER = "default/metered/{}"
PRICES = {"cheap": (2.0, 8.0), "pricey": (10.0, 30.0), "broken": (1.0, 1.0), "down": (3.0, 3.0)}
FAILING = ("broken", "down")
DASHBOARD = REPO / "helm/switchyard/dashboards/switchyard-dashboard.json"
VARIABLES = {"$__rate_interval": "2m", "$__range": "10m", "$policy": ".*", "$model": ".*"}
MESSAGES = [{"role": "user", "content": "Summarise the plot of Hamlet in one line."}]


def _model(name: str, port: int, **extra: Any) -> dict[str, Any]:
    return url_model(name, port, PRICES[name], **extra)


def _policy(ports: dict[str, int], with_down: bool) -> dict[str, Any]:
    models = [
        _model("cheap", ports["cheap"]),
        _model("pricey", ports["pricey"]),
        _model("broken", ports["broken"], fallbacks=["pricey"]),
    ]
    if with_down:
        models.append(_model("down", ports["down"]))
    return {
        "apiVersion": "switchyard.dev/v1alpha1",
        "kind": "RoutePolicy",
        "metadata": {"name": "metered", "namespace": "default"},
        "spec": {
            "match": {"models": ["auto"]},
            "models": models,
            # The router scores every "auto" request; the one tier takes every score.
            "strategy": {
                "type": "classifier",
                "router": {"bundle": "builtin:default"},
                "tiers": [{"model": "cheap", "maxDifficulty": 1.0}],
            },
        },
    }


@dataclass
class Load:
    """What the clients sent and got back."""

    decisions: dict[str, int] = field(default_factory=dict)
    responses: dict[tuple[str, str], int] = field(default_factory=dict)
    tokens: dict[tuple[str, str], int] = field(default_factory=dict)
    rejected: int = 0
    fallbacks: int = 0

    def count(self, table: dict[Any, int], key: Any, amount: int = 1) -> None:
        table[key] = table.get(key, 0) + amount

    def answered(self, chosen: str, model: str, usage: Any) -> None:
        self.count(self.decisions, chosen)
        self.count(self.responses, (model, "complete"))
        self.count(self.tokens, (model, "input"), usage.prompt_tokens)
        self.count(self.tokens, (model, "output"), usage.completion_tokens)


@dataclass
class Run:
    gateway: Gateway
    prometheus: Prometheus
    load: Load
    jobs: tuple[str, ...]


def _send_round(client: openai.OpenAI, load: Load, plain: int, streams: int) -> None:
    for _ in range(plain):
        raw = client.chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
        assert raw.headers["x-switchyard-model"] == "cheap"
        load.answered("cheap", "cheap", raw.parse().usage)
    for _ in range(streams):
        chunks = list(
            client.chat.completions.create(
                model="auto",
                messages=MESSAGES,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert chunks[-1].usage is not None
        load.answered("cheap", "cheap", chunks[-1].usage)
    raw = client.chat.completions.with_raw_response.create(model="broken", messages=MESSAGES)
    assert raw.headers["x-switchyard-model"] == "pricey"
    load.answered("broken", "pricey", raw.parse().usage)
    load.fallbacks += 1
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="down", messages=MESSAGES)
    load.count(load.decisions, "down")
    load.count(load.responses, ("down", "error"))
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    load.rejected += 1


def _scrape(port: int, path: str = "/metrics") -> dict[tuple[str, frozenset[Any]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _total(samples: dict[tuple[str, frozenset[Any]], float], name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def _settle(run_gateway: Gateway, metrics: int, load: Load) -> None:
    """Until the components expose the whole load: the ext_proc workers add to their series
    once a second (extproc/tally.py), and Envoy its histograms every stats flush (5 s)."""
    responses = sum(load.responses.values())
    routed = sum(load.decisions.values())
    wait_until(
        lambda: (
            _total(_scrape(metrics), "switchyard_responses_total") == responses
            and _total(_scrape(metrics), "switchyard_decision_duration_seconds_count") == routed
        ),
        30,
        f"{responses} responses counted by the ext_proc",
    )
    cheap = load.decisions["cheap"]
    wait_until(
        lambda: _envoy_count(run_gateway, CLUSTER.format("cheap")) == cheap,
        30,
        f"{cheap} requests in Envoy's latency histogram",
    )


def _envoy_count(gateway: Gateway, cluster: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{gateway.admin_port}/stats/prometheus", timeout=5).text
    series = f'envoy_cluster_upstream_rq_time_count{{envoy_cluster_name="{cluster}"}}'
    pattern = rf"^{re.escape(series)} (\S+)$"
    match = re.search(pattern, text, re.M)
    return float(match.group(1)) if match else 0.0


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, prometheus_binary: str) -> Iterator[Run]:
    first = free_port_block(len(PRICES))
    ports = {name: first + i for i, name in enumerate(PRICES)}
    metrics, control = free_port_block(), free_port_block()
    demo = [
        {"name": name, "port": port, **({"failureRate": 1.0} if name in FAILING else {})}
        for name, port in ports.items()
    ]
    directory = tmp_path_factory.mktemp("dashboard")
    gateway = start_gateway(
        directory,
        _policy(ports, with_down=False),
        demoUpstreams=demo,
        metricsPort=metrics,
        controlPlaneMetricsPort=control,
    )
    prometheus: Prometheus | None = None
    try:
        wait_until(lambda: port_open("127.0.0.1", metrics), 30, "the ext_proc's metrics")
        jobs = {
            "extproc": [f"127.0.0.1:{metrics}"],
            "envoy": [f"127.0.0.1:{gateway.admin_port}"],
            "control-plane": [f"127.0.0.1:{control}"],
        }
        prometheus = Prometheus.start(
            prometheus_binary,
            tmp_path_factory.mktemp("prometheus"),
            jobs,
            paths={"envoy": "/stats/prometheus"},
        )
        before = time.time()
        for job in jobs:  # the counters' values before the edits and the load
            prometheus.wait_scraped(job, before)
        # An invalid edit is kept out (a reconcile error), a valid one applied.
        broken = copy.deepcopy(_policy(ports, with_down=True))
        broken["spec"]["models"][0]["pricing"]["inputPer1M"] = -1
        gateway.policy_file.write_text(yaml.safe_dump(broken))
        gateway.wait_for_output("keeping config")
        gateway.policy_file.write_text(yaml.safe_dump(_policy(ports, with_down=True)))
        gateway.wait_for_output(" applied")

        client = openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0)
        load = Load()
        for plain, streams in ((1, 1), (2, 1)):
            _send_round(client, load, plain, streams)
            _settle(gateway, metrics, load)
            settled = time.time()
            for job in jobs:
                prometheus.wait_scraped(job, settled)
        yield Run(gateway, prometheus, load, tuple(jobs))
    finally:
        if prometheus is not None:
            prometheus.stop()
        assert gateway.stop() == 0, "".join(gateway.output)


def _by(prometheus: Prometheus, query: str, *labels: str) -> dict[Any, float]:
    result = {}
    for sample in prometheus.query(query):
        key = tuple(sample.labels.get(label, "") for label in labels)
        result[key[0] if len(key) == 1 else key] = sample.value
    return result


def test_prometheus_holds_exactly_the_load(run: Run) -> None:
    prom, load = run.prometheus, run.load
    selector = f'{{policy="{POLICY}"}}'
    decisions = _by(prom, f"sum by (model) (switchyard_decisions_total{selector})", "model")
    assert decisions == load.decisions == {"cheap": 5, "broken": 2, "down": 2}
    responses = _by(
        prom,
        f"sum by (model, outcome) (switchyard_responses_total{selector})",
        "model",
        "outcome",
    )
    assert responses == load.responses
    tokens = _by(
        prom,
        f"sum by (model, direction) (switchyard_tokens_total{selector})",
        "model",
        "direction",
    )
    assert {k: v for k, v in tokens.items() if v} == load.tokens
    cost = _by(prom, f"sum by (model) (switchyard_cost_usd_total{selector})", "model")
    for model in ("cheap", "pricey"):
        price_in, price_out = PRICES[model]
        usd = (
            load.tokens[model, "input"] * price_in + load.tokens[model, "output"] * price_out
        ) / 1e6
        assert cost[model] == pytest.approx(usd, rel=1e-9)
    assert sum(v for m, v in cost.items() if m not in ("cheap", "pricey")) == 0
    fallbacks = _by(
        prom, "sum by (from_model, to_model) (switchyard_fallbacks_total)", "from_model", "to_model"
    )
    assert fallbacks == {("broken", "pricey"): load.fallbacks}
    rejections = _by(prom, "sum by (status, code) (switchyard_rejections_total)", "status", "code")
    assert rejections == {("404", "model_not_found"): load.rejected}
    routed = sum(load.decisions.values())
    assert prom.value("sum(switchyard_decision_duration_seconds_count)") == routed
    classified = _by(
        prom, "sum by (bundle) (switchyard_classifier_duration_seconds_count)", "bundle"
    )
    assert sum(classified.values()) == load.decisions["cheap"]  # only "auto" is scored


def test_envoy_stats_name_models_and_show_the_fallback_cause(run: Run) -> None:
    prom, load = run.prometheus, run.load

    def selector(model: str) -> str:
        return f'{{envoy_cluster_name="{CLUSTER.format(model)}"}}'

    def codes(metric: str, model: str) -> dict[Any, float]:
        query = f"sum by (envoy_response_code) ({metric}{selector(model)})"
        return _by(prom, query, "envoy_response_code")

    assert codes("envoy_cluster_upstream_rq", "cheap") == {"200": load.decisions["cheap"]}
    # The fallback's cause: the failed attempt on "broken", on its aggregate cluster.
    assert codes("envoy_cluster_retry_upstream_rq", "broken~fallbacks") == {"503": 2}
    assert codes("envoy_cluster_upstream_rq", "broken~fallbacks") == {"200": 2}
    assert codes("envoy_cluster_upstream_rq", "down") == {"503": 2}
    retried = f"envoy_cluster_upstream_rq_retry{selector('broken~fallbacks')}"
    assert prom.value(retried) == load.fallbacks


def test_the_control_plane_metrics_follow_the_edits(run: Run) -> None:
    prom = run.prometheus
    assert prom.value("switchyard_operator_config_generation") == 2  # the first config + 1 apply
    applies = _by(prom, "switchyard_operator_config_applies_total", "result")
    assert applies == {"acked": 1, "rejected": 0, "timeout": 0}
    assert _by(prom, "switchyard_operator_reconcile_errors_total", "reason") == {"InvalidSpec": 1}
    assert _by(prom, "switchyard_operator_policies", "state") == {"ready": 1, "not_ready": 0}
    assert _by(prom, "switchyard_operator_clients_behind", "kind") == {"envoy": 0, "extproc": 0}
    assert _by(prom, "switchyard_operator_connected_clients", "kind") == {"envoy": 1, "extproc": 2}
    results = _by(prom, "sum by (result) (switchyard_operator_xds_responses_total)", "result")
    assert set(results) == {"ack"} and results["ack"] > 0
    assert prom.value("switchyard_operator_config_apply_seconds_count") == 1


def _substitute(expr: str) -> str:
    for variable, value in sorted(VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(variable, value)
    assert "$" not in expr.replace("$1", ""), expr
    return expr


def _dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    found = [
        (f"panel {p['title']!r} {t['refId']}", t["expr"])
        for p in dashboard["panels"]
        for t in p.get("targets", [])
    ]
    return found + [
        (f"variable {v['name']}", v["definition"])
        for v in dashboard["templating"]["list"]
        if v["type"] == "query"
    ]


def test_every_dashboard_query_reads_exported_metrics_and_returns_data(run: Run) -> None:
    prom = run.prometheus
    exported = set(prom.api("label/__name__/values"))
    assert {j: len(prom.targets(j)) for j in run.jobs} == dict.fromkeys(run.jobs, 1)
    queries = _dashboard_queries()
    assert len(queries) >= 25
    for where, raw in queries:
        expr = _substitute(raw)
        names = label_values_names(expr)
        assert names, f"{where}: no metric in {expr}"
        assert names <= exported, f"{where}: {sorted(names - exported)} is exported by nothing"
        match = re.fullmatch(r"label_values\((.*), *(\w+)\)", expr, re.S)
        promql = match.group(1) if match else expr
        assert metric_names(promql) == names
        samples = prom.query(promql)
        finite = [s for s in samples if math.isfinite(s.value)]
        assert finite, f"{where}: no data from {promql} ({samples})"


def test_the_variables_list_the_policies_and_models(run: Run) -> None:
    """What Grafana would offer: label values of the variables' selectors, through their regex."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    offered = {}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.*), *(\w+)\)", _substitute(variable["definition"]))
        assert match is not None
        values = run.prometheus.api(f"label/{match.group(2)}/values", **{"match[]": match.group(1)})
        if variable["regex"]:
            pattern = re.compile(variable["regex"].strip("/"))
            values = [m.group(1) for v in values if (m := pattern.fullmatch(v))]
        offered[variable["name"]] = set(values)
    assert offered == {"policy": {POLICY}, "model": set(PRICES)}
