"""Golden files: RoutePolicy YAML in, Envoy resources out, so any change to the translation
shows up as a diff (as Envoy AI Gateway's ``testdata/translate_*``).

Each case is ``testdata/translate/<case>.in.yaml``: RoutePolicy documents plus an optional
``kind: TranslateCase`` document (GatewaySettings fields, failOpenModel, environment, Service
endpoints as the operator resolves them). The expected resources are ``<case>.out.json``:
the ADS snapshot's listener, routes and clusters (and the ext_proc's EDS resource) as
canonical proto JSON. ``examples`` reads examples/policy.yaml.

Regenerate after an intended change, then review the diff:
    UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_translate_golden.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from switchyard.api.v1 import routing_pb2 as pb
from switchyard.operator.compiler import ServiceEndpoints, compile_config
from switchyard.operator.envoy_config import GatewaySettings, extproc_load_assignment
from switchyard.operator.multicluster import Topology
from switchyard.operator.policy import load_documents, parse_policy
from switchyard.operator.xds_server import (
    CLUSTER,
    LISTENER,
    ROUTE,
    Resources,
    build_snapshot,
    pack,
)

REPO = Path(__file__).resolve().parents[2]
TESTDATA = Path(__file__).parent / "testdata" / "translate"
CA_FILE = "/etc/ssl/certs/ca-certificates.crt"
CASES = {
    "examples": REPO / "examples" / "policy.yaml",
    **{p.name.removesuffix(".in.yaml"): p for p in sorted(TESTDATA.glob("*.in.yaml"))},
}


def _api_key(namespace: str, name: str, key: str) -> str:
    return f"secret:{namespace}/{name}/{key}"


def _endpoints(table: dict[str, list[dict[str, Any]]]) -> ServiceEndpoints:
    def resolve(namespace: str, service: str, port: int) -> list[pb.Endpoint]:
        return [pb.Endpoint(**e) for e in table.get(f"{namespace}/{service}:{port}", [])]

    return resolve


def _unpacked(resources: Resources) -> list[dict[str, Any]]:
    return [
        json_format.MessageToDict(r, preserving_proto_field_name=True) for r in resources.resources
    ]


def translate(source: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The Envoy resources the control plane serves for one case."""
    docs = load_documents(source.read_text(encoding="utf-8"), str(source))
    case = next((d for d in docs if d.get("kind") == "TranslateCase"), {})
    policies = [parse_policy(d, str(source)) for d in docs if d.get("kind") == "RoutePolicy"]
    for name, value in case.get("env", {}).items():
        monkeypatch.setenv(name, value)
    fields = dict(case.get("settings", {}))
    if "extproc_endpoints" in fields:
        fields["extproc_endpoints"] = [tuple(e) for e in fields["extproc_endpoints"]]
    settings = GatewaySettings(system_ca_file=CA_FILE, **fields)
    endpoints = _endpoints(case["endpoints"]) if "endpoints" in case else None
    topology = Topology(regions=case.get("regions", {}))
    config = compile_config(policies, case.get("failOpenModel", ""), endpoints, topology)
    snapshot = build_snapshot(config, settings, _api_key if case.get("apiKeys") else None)
    out: dict[str, Any] = {
        "listener": _unpacked(snapshot[LISTENER]),
        "routes": _unpacked(snapshot[ROUTE]),
        "clusters": _unpacked(snapshot[CLUSTER]),
    }
    if settings.extproc_eds:
        found = [tuple(e) for e in case.get("extprocEndpoints", [])]
        out["extproc_endpoints"] = _unpacked(pack([extproc_load_assignment(sorted(found))]))
    return out


def canonical(resources: dict[str, Any]) -> str:
    return json.dumps(resources, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


@pytest.mark.parametrize("case", sorted(CASES))
def test_translation_matches_the_golden_file(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    actual = canonical(translate(CASES[case], monkeypatch))
    golden = TESTDATA / f"{case}.out.json"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(actual, encoding="utf-8")
    assert golden.exists(), f"no {golden.name}: run with UPDATE_GOLDEN=1 and review it"
    assert actual == golden.read_text(encoding="utf-8"), (
        f"{case}: Envoy resources differ from {golden.name}; if intended, regenerate with "
        "UPDATE_GOLDEN=1 and review the diff"
    )


def test_every_case_is_pinned() -> None:
    """A golden file without its input would silently stop being checked."""
    outputs = {p.name.removesuffix(".out.json") for p in TESTDATA.glob("*.out.json")}
    assert outputs == set(CASES)
