"""The RoutePolicy CRD on a real kube-apiserver: CEL and schema reject nonsense, naming the field,
and agree with the validator local mode uses."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from gateway_harness import EXAMPLE_POLICY
from kube import KubeControlPlane

from switchyard.operator.policy import PolicyError, parse_policy

_DELETE = object()


def _edit(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    node: Any = doc
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node[part]
    last: Any = int(parts[-1]) if parts[-1].isdigit() else parts[-1]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return doc


PREDICTIVE: dict[str, Any] = {
    "type": "predictive",
    "router": {"bundle": "/bundles/fitted"},
    "predictive": {"costWeight": 0.01, "modelMap": {"light": "llama-8b"}},
    "default": "standard",
}


SEMANTIC: dict[str, Any] = {
    "type": "rules",
    "rules": [
        {
            "name": "sql",
            "when": {
                "semantic": {"examples": ["How do I join two tables in SQL?"], "threshold": 0.5}
            },
            "route": "standard",
        }
    ],
    "default": "light",
}


def _without(key: str) -> dict[str, Any]:
    return {k: v for k, v in PREDICTIVE.items() if k != key}


INVALID = [
    ("spec.models.0.pricing.inputPer1M", -1, "spec.models[0].pricing.inputPer1M"),
    ("spec.models.1.name", "light", "spec.models[1]"),
    ("spec.models.0.fallbacks", ["ghost"], "spec.models"),
    ("spec.models.0.backend", {"url": "http://a", "service": {"name": "s", "port": 80}},
     "spec.models[0].backend"),
    ("spec.models.0.backend", {"url": "ftp://a"}, "spec.models[0].backend.url"),
    ("spec.models.0.capabilities", ["telepathy"], "spec.models[0].capabilities[0]"),
    ("spec.models.0.contextWindow", 10, "spec.models[0].contextWindow"),
    ("spec.models.0.name", "Not_A_Label", "spec.models[0].name"),
    ("spec.strategy.type", "magic", "spec.strategy.type"),
    ("spec.strategy.tiers.0.maxDifficulty", 1.5, "spec.strategy.tiers[0].maxDifficulty"),
    ("spec.strategy.tiers", [], "spec.strategy.tiers"),
    ("spec.strategy.tiers.1", {"model": "standard"}, "spec.strategy.tiers"),
    ("spec.strategy.rules.0.route", "ghost", "spec.strategy.rules"),
    ("spec.strategy.rules.0.when", {"minDifficulty": 0.9, "maxDifficulty": 0.1},
     "spec.strategy.rules[0].when"),
    ("spec.strategy", {"type": "rules"}, "spec.strategy.default"),
    ("spec.match.models", [], "spec.match.models"),
    ("spec.match", _DELETE, "spec.match"),
    ("spec.autoscaling", {"minReplicas": 5, "maxReplicas": 2}, "spec.autoscaling"),
    ("spec.timeout", "soon", "spec.timeout"),
    ("spec.personalData", {"raiseFrom": ["public", "pii"]}, "spec.personalData.raiseFrom"),
    ("spec.personalData", {"dataClass": "public"}, "spec.personalData.raiseFrom"),
    ("spec.personalData", {"detectors": ["passport"]}, "spec.personalData.detectors[0]"),
    ("spec.personalData", {"detectors": ["email", "email"]}, "spec.personalData.detectors"),
    ("spec.personalData", {"detectors": []}, "spec.personalData.detectors"),
    ("spec.personalData", {"action": "drop"}, "spec.personalData.action"),
    ("spec.strategy", _without("predictive"), "spec.strategy.predictive"),
    ("spec.strategy", {**PREDICTIVE, "predictive": {"maxQualityLoss": 0.1, "costWeight": 1}},
     "spec.strategy.predictive"),
    ("spec.strategy", {**PREDICTIVE, "predictive": {"maxQualityLoss": 2}},
     "spec.strategy.predictive.maxQualityLoss"),
    ("spec.strategy", {**PREDICTIVE, "router": {"bundle": "builtin:default"}},
     "spec.strategy.router"),
    ("spec.strategy", _without("default"), "spec.strategy.default"),
    ("spec.strategy", {**PREDICTIVE, "predictive": {"costWeight": 0.1, "modelMap": {"ghost": "x"}}},
     "spec.strategy.predictive.modelMap"),
    ("spec.strategy", {"type": "weighted", "predictive": {"costWeight": 0.1}},
     "spec.strategy.predictive"),
    ("spec.budget", {"onExhausted": "downgrade"}, "spec.budget.downgradeTo"),
    ("spec.budget", {"downgradeTo": ["light"]}, "spec.budget.downgradeTo"),
    ("spec.budget", {"onExhausted": "downgrade", "downgradeTo": ["ghost"]},
     "spec.budget.downgradeTo"),
    ("spec.budget", {"onExhausted": "never"}, "spec.budget.onExhausted"),
    ("spec.strategy.rules.0.when", {"semantic": {"examples": ["x"] * 33, "threshold": 0.5}},
     "spec.strategy.rules[0].when.semantic.examples"),
    ("spec.strategy.rules.0.when", {"semantic": {"examples": [], "threshold": 0.5}},
     "spec.strategy.rules[0].when.semantic.examples"),
    ("spec.strategy.rules.0.when", {"semantic": {"examples": ["x" * 1001], "threshold": 0.5}},
     "spec.strategy.rules[0].when.semantic.examples[0]"),
    ("spec.strategy.rules.0.when", {"semantic": {"examples": ["x"], "threshold": 1.5}},
     "spec.strategy.rules[0].when.semantic.threshold"),
    ("spec.strategy.rules.0.when", {"semantic": {"examples": ["x"]}},
     "spec.strategy.rules[0].when.semantic.threshold"),
    ("spec.strategy", {**SEMANTIC, "router": {"bundle": "builtin:minilm"}},
     "spec.strategy.router"),
]  # fmt: skip


@pytest.fixture(scope="module")
def example() -> dict[str, Any]:
    return dict(yaml.safe_load(EXAMPLE_POLICY.read_text()))


def _apply(kube: KubeControlPlane, namespace: str, doc: dict[str, Any]) -> tuple[bool, str]:
    doc = {**doc, "metadata": {"name": "p", "namespace": namespace}}
    out = kube.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(doc), check=False)
    return "created" in out or "configured" in out, out


def test_valid_policy_is_accepted_with_defaults(
    routepolicy_crd: KubeControlPlane, namespace: str, example: dict[str, Any]
) -> None:
    accepted, out = _apply(routepolicy_crd, namespace, example)
    assert accepted, out
    stored = yaml.safe_load(
        routepolicy_crd.kubectl("get", "rp", "p", "-n", namespace, "-o", "yaml")
    )
    assert stored["spec"]["strategy"]["router"]["bundle"] == "builtin:default"
    assert stored["spec"]["timeout"] == "300s"
    columns = routepolicy_crd.kubectl("get", "routepolicies", "-n", namespace)
    assert columns.split()[:6] == ["NAME", "READY", "STRATEGY", "MODELS", "BUNDLE", "AGE"]


def test_refit_is_validated_by_the_api_server(
    routepolicy_crd: KubeControlPlane, namespace: str, example: dict[str, Any]
) -> None:
    doc = copy.deepcopy(example)
    doc["spec"]["strategy"]["router"]["refit"] = {"schedule": "0 3 * * *"}
    accepted, out = _apply(routepolicy_crd, namespace, doc)
    assert accepted, out
    stored = yaml.safe_load(
        routepolicy_crd.kubectl("get", "rp", "p", "-n", namespace, "-o", "yaml")
    )
    refit = stored["spec"]["strategy"]["router"]["refit"]
    assert (refit["minOutcomes"], refit["keep"], refit["suspend"]) == (300, 3, False)
    for bad, field in (({"schedule": "at three"}, "schedule"), ({"keep": 1}, "keep")):
        doc["spec"]["strategy"]["router"]["refit"] = {"schedule": "@daily", **bad}
        accepted, out = _apply(routepolicy_crd, namespace, doc)
        assert not accepted and f"spec.strategy.router.refit.{field}" in out, out


def test_predictive_policy_is_accepted(
    routepolicy_crd: KubeControlPlane, namespace: str, example: dict[str, Any]
) -> None:
    doc = _edit(example, "spec.strategy", PREDICTIVE)
    accepted, out = _apply(routepolicy_crd, namespace, doc)
    assert accepted, out
    parse_policy({**doc, "metadata": {"name": "p"}})


def test_semantic_policy_is_accepted(
    routepolicy_crd: KubeControlPlane, namespace: str, example: dict[str, Any]
) -> None:
    for router in ({}, {"router": {"bundle": "/bundles/fitted"}}):
        doc = _edit(example, "spec.strategy", {**SEMANTIC, **router})
        accepted, out = _apply(routepolicy_crd, namespace, doc)
        assert accepted, out
        parse_policy({**doc, "metadata": {"name": "p"}})


@pytest.mark.parametrize(("path", "value", "field"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_policy_is_rejected_naming_the_field(
    routepolicy_crd: KubeControlPlane,
    namespace: str,
    example: dict[str, Any],
    path: str,
    value: Any,
    field: str,
) -> None:
    doc = _edit(example, path, value)
    accepted, out = _apply(routepolicy_crd, namespace, doc)
    assert not accepted, f"API server accepted {path}={value!r}"
    assert field in out, out
    # The validator local mode uses rejects the same document.
    with pytest.raises(PolicyError):
        parse_policy({**doc, "metadata": {"name": "p"}})


def test_explain_describes_the_fields(routepolicy_crd: KubeControlPlane) -> None:
    out = routepolicy_crd.kubectl("explain", "routepolicy.spec.models")
    assert "contextWindow" in out
    assert "Tokens the model accepts" in out
