"""`make bench`'s peer setups and report: the Envoy config written for Envoy AI Gateway's ext_proc
loads in the real Envoy, its filter config's cost expression is well-typed CEL, and the summary
computes the Switchyard/peer ratios and the verdicts against the targets from the runs."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_peers
from peers import Model, aigw_envoy_config, aigw_filter_config, litellm_config

from switchyard.local.runner import envoy_binary

MODELS = [Model("light", "demo-light-8b", 0.05, 4), Model("capable", "demo-capable", 5, 25)]


def test_ai_gateway_envoy_config_loads_in_envoy(tmp_path: Path) -> None:
    config = aigw_envoy_config(18080, tmp_path / "aigw.sock", 18081, MODELS)
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(config))
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    clusters = {c["name"] for c in config["static_resources"]["clusters"]}
    assert clusters == {"aigw-light", "aigw-capable", "aigw-extproc-uds"}


def test_ai_gateway_costs_only_with_accounting() -> None:
    assert "llmRequestCosts" not in aigw_filter_config(MODELS, accounting=False)
    costs = aigw_filter_config(MODELS, accounting=True)["llmRequestCosts"]
    assert isinstance(costs, list)
    assert [c["type"] for c in costs] == ["InputToken", "OutputToken", "TotalToken", "CEL"]
    # CEL has no int * double: every price is a double literal, integral ones included.
    cel = costs[-1]["cel"]
    assert "double(output_tokens) * 4.0 " in cel and "double(input_tokens) * 5.0 " in cel
    assert all(c["routeName"] for c in costs)


def test_litellm_routes_each_model_to_the_upstream() -> None:
    config = litellm_config(18081, MODELS)
    deployments = {m["model_name"]: m["litellm_params"] for m in config["model_list"]}
    assert deployments["light"]["model"] == "openai/demo-light-8b"
    assert deployments["capable"]["api_base"] == "http://127.0.0.1:18081/v1"


def _run(rps: float, cpu: float) -> dict[str, float]:
    return {"rps": rps, "p50": 1.0, "p99": 2.0, "others": 0.0, "cpu envoy": cpu, "rss envoy": 50}


def _open(p99: float) -> dict[str, float]:
    return {"rate": 10.0, "p50": 1.0, "p99": p99, "success": 1.0}


def test_summary_ratios_and_targets() -> None:
    data = {
        "idle_rss": {"direct": 40.0, "switchyard": 100.0, "aigw": 80.0},
        "closed": {
            "direct": [_run(4000, 0.05), _run(4000, 0.05)],
            "switchyard": [_run(3000, 0.30), _run(2000, 0.30)],
            "aigw": [_run(1500, 0.60), _run(2000, 0.50)],
        },
        "open": {
            "rate": {n: [_open(2.0), _open(2.0)] for n in ("direct", "switchyard", "aigw")},
            "half": {"direct": [_open(1.0), _open(1.0)], "switchyard": [_open(5.0), _open(3.5)]},
        },
        "rate": 10,
        "half": 1250,
    }
    rows = bench_peers.summarise(data)
    assert rows["aigw"]["rps_ratio"] == pytest.approx([2.0, 1.0])
    assert rows["aigw"]["cpu_ratio"] == pytest.approx([0.5, 0.6])
    assert rows["switchyard"]["half_added_p99"] == pytest.approx([4.0, 2.5])
    args = argparse.Namespace(
        label="test", connections=16, seconds=1, rounds=2, concurrency=1, open_seconds=1
    )
    meta = {"when": "now", "machine": "m", "envoy": "e", "litellm": "-", "command": "c"}
    text = bench_peers.markdown(args, data, rows, meta)
    assert "| AI Gateway ext_proc, accounting on | 1750 (1500-2000) |" in text
    # Median ratio 1.5 meets the ≥ 1.5 target; median added p99 3.25 ms misses ≤ 3 ms.
    assert "accounting on in both: 1.50 (1.00-2.00) (target ≥ 1.50) — met" in text
    assert "(half its saturation): 3.25 (2.50-4.00) (target ≤ 3.00) — NOT met" in text
