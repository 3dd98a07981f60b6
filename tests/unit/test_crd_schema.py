"""The committed CRD is the generated one, and it is structural."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from switchyard.operator.crd import client_keys_crd, crd, render, render_client_keys

REPO = Path(__file__).resolve().parents[2]


def test_committed_crd_is_up_to_date() -> None:
    committed = (REPO / "deploy" / "crds" / "routepolicy.yaml").read_text()
    assert committed == render(), (
        "run: python -m switchyard.operator.crd > deploy/crds/routepolicy.yaml"
    )


def _walk(node: Any, path: str = "") -> list[str]:
    problems = []
    if isinstance(node, dict):
        for banned in ("$ref", "anyOf", "oneOf", "title"):
            if banned in node:
                problems.append(f"{path}: {banned}")
        if ("properties" in node or "items" in node or "enum" in node) and "type" not in node:
            problems.append(f"{path}: no type")
        for key, value in node.get("properties", {}).items():
            if "description" not in value and path.startswith(".spec"):
                problems.append(f"{path}.{key}: no description")
            problems += _walk(value, f"{path}.{key}")
        if "items" in node:
            problems += _walk(node["items"], f"{path}[]")
    return problems


def test_schema_is_structural_and_described() -> None:
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert _walk(schema) == []
    models = schema["properties"]["spec"]["properties"]["models"]
    assert models["x-kubernetes-list-map-keys"] == ["name"]


def test_committed_client_keys_crd_is_up_to_date() -> None:
    for copy in ("deploy/crds/clientkeys.yaml", "helm/switchyard/crds/clientkeys.yaml"):
        assert (REPO / copy).read_text() == render_client_keys(), "run: make crd"


def test_client_keys_schema_is_structural_described_and_bounded() -> None:
    version = client_keys_crd()["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    assert _walk(schema) == []
    spec = schema["properties"]["spec"]
    for listed, bound in (("tenants", 256), ("keys", 1024)):
        assert spec["properties"][listed]["x-kubernetes-list-map-keys"] == ["name"]
        assert spec["properties"][listed]["maxItems"] == bound
    key = spec["properties"]["keys"]["items"]
    assert key["properties"]["sha256"]["pattern"] == "^[0-9a-f]{64}$"
    assert key["properties"]["secretRef"]["required"] == ["name", "key"]
    assert [r["rule"] for r in key["x-kubernetes-validations"]] == [
        "has(self.sha256) != has(self.secretRef)"
    ]
    # Every string is bounded: the API server refuses CEL rules it cannot cost.
    assert "maxLength" not in _unbounded_strings(spec)
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {
        "Ready": '.status.conditions[?(@.type=="Ready")].status',
        "Tenants": ".status.tenantCount",
        "Keys": ".status.keyCount",
        "Active": ".status.activeKeys",
        "Budget USD": ".status.budgetUsd",
        "Spent USD": ".status.spentUsd",
        "Age": ".metadata.creationTimestamp",
    }
    status = schema["properties"]["status"]["properties"]
    assert set(status) >= {"tenantCount", "keyCount", "activeKeys", "budgetUsd", "spentUsd"}
    # The RoutePolicy CRD does not pick up the ClientKeys rules.
    assert "ClientKey" not in str(crd()["spec"]["versions"][0]["schema"])


def _unbounded_strings(node: Any) -> str:
    if isinstance(node, dict):
        if node.get("type") == "string" and "maxLength" not in node and "enum" not in node:
            return "maxLength"
        return "".join(_unbounded_strings(v) for v in node.values())
    return ""
