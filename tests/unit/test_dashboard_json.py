"""The Grafana dashboard file: what deploy/grafana/dashboard.py generates, the same file in the
chart and in deploy/grafana/, well-formed panels, and every metric it reads in the docs' table.
tests/integration/test_dashboard.py runs its queries against a real Prometheus."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).parents[1] / "infra"))

from promql import label_values_names, metric_names

REPO = Path(__file__).resolve().parents[2]
CHART_FILE = REPO / "helm/switchyard/dashboards/switchyard-dashboard.json"
DEPLOY_FILE = REPO / "deploy/grafana/switchyard-dashboard.json"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dashboard", REPO / "deploy/grafana/dashboard.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dashboard() -> dict[str, Any]:
    return json.loads(CHART_FILE.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expression) for every panel target and variable query."""
    found = [
        (f"panel {p['title']!r} {t['refId']}", t["expr"])
        for p in dashboard["panels"]
        for t in p.get("targets", [])
    ]
    found += [
        (f"variable {v['name']}", v["definition"])
        for v in dashboard["templating"]["list"]
        if v["type"] == "query"
    ]
    return found


def test_the_file_is_what_the_generator_writes() -> None:
    assert CHART_FILE.read_text(encoding="utf-8") == _generator().render(), (
        "stale dashboard: run `make dashboard`"
    )


def test_deploy_grafana_is_the_charts_file() -> None:
    assert DEPLOY_FILE.is_symlink()
    assert DEPLOY_FILE.resolve() == CHART_FILE.resolve()


def test_panels_are_well_formed() -> None:
    dashboard = _dashboard()
    assert dashboard["schemaVersion"] >= 39 and dashboard["uid"] == "switchyard"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"policy", "model"} <= variables.keys()
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["description"] and panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs)
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"


def test_the_dashboard_shows_what_the_issue_asks_for() -> None:
    names = {n for _, expr in queries(_dashboard()) for n in metric_names(expr)}
    for needed in (
        "switchyard_decisions_total",
        "switchyard_cost_usd_total",
        "switchyard_tokens_total",
        "switchyard_fallbacks_total",
        "envoy_cluster_retry_upstream_rq",
        "envoy_cluster_upstream_rq_time_bucket",
        "switchyard_decision_duration_seconds_bucket",
        "switchyard_classifier_duration_seconds_bucket",
        "switchyard_rejections_total",
        "switchyard_operator_config_generation",
        "switchyard_operator_clients_behind",
        "switchyard_operator_xds_responses_total",
        "switchyard_operator_policies",
        "switchyard_operator_config_apply_seconds_bucket",
    ):
        assert needed in names, needed


def test_every_metric_the_dashboard_reads_is_in_the_docs_table() -> None:
    docs = (REPO / "docs/architecture.md").read_text(encoding="utf-8")
    table = docs.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| [^|]+ \| `([a-z_:]+)`", table, re.M))
    for where, expr in queries(_dashboard()):
        for name in label_values_names(expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert base in documented, f"{where}: {name} is not in docs/architecture.md Metrics"
