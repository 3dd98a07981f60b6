"""The committed CRD is the generated one, and it is structural."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from switchyard.operator.crd import crd, render

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
