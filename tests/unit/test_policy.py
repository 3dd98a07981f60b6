from __future__ import annotations

from typing import Any

import pytest

from switchyard.operator.policy import PolicyError, parse_policy


def test_example_policy_is_valid(policy_doc: dict[str, Any]) -> None:
    policy = parse_policy(policy_doc)
    assert policy.key == "default/default"
    assert [m.name for m in policy.spec.models] == ["light", "standard", "capable"]
    assert policy.spec.models[0].data_classes == ["public", "internal", "pii"]
    assert policy.spec.strategy.tiers[-1].max_difficulty is None


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    node: Any = doc
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node[part]
    last = parts[-1]
    if value is _DELETE:
        del node[int(last) if last.isdigit() else last]
    elif last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value


_DELETE = object()

INVALID = [
    ("spec.models.0.pricing.inputPer1M", -1, "spec.models[0].pricing.inputPer1M"),
    ("spec.models.1.name", "light", "duplicate model name"),
    ("spec.models.0.fallbacks", ["nope"], "models[0].fallbacks[0]: unknown model 'nope'"),
    ("spec.models.0.fallbacks", ["light"], "cannot fall back to itself"),
    ("spec.models.0.backend", {"url": "ftp://x"}, "spec.models[0].backend.url"),
    ("spec.models.0.backend", {}, "exactly one of url or service"),
    ("spec.models.0.capabilities", ["telepathy"], "spec.models[0].capabilities[0]"),
    ("spec.models.0.contextWindow", 10, "spec.models[0].contextWindow"),
    ("spec.models.0.name", "Light_Model", "spec.models[0].name"),
    ("spec.strategy.type", "magic", "spec.strategy.type"),
    ("spec.strategy.tiers.0.maxDifficulty", 1.5, "spec.strategy.tiers[0].maxDifficulty"),
    ("spec.strategy.tiers.1.maxDifficulty", 0.1, "maxDifficulty must increase"),
    ("spec.strategy.tiers.2", {"model": "capable", "maxDifficulty": 0.9}, "last tier"),
    ("spec.strategy.tiers", [], "needs at least one tier"),
    ("spec.strategy.rules.0.route", "ghost", "strategy.rules[0].route: unknown model 'ghost'"),
    ("spec.strategy.rules.0.when", {"regex": "("}, "invalid regular expression"),
    ("spec.match.models", [], "spec.match.models"),
    ("spec.models", [], "spec.models"),
    ("spec.match", _DELETE, "spec.match"),
    ("spec.strategy.unknownField", 1, "spec.strategy.unknownField"),
    ("apiVersion", "v1", "apiVersion"),
]


@pytest.mark.parametrize(
    ("path", "value", "message"), INVALID, ids=[c[0] + "=" + repr(c[1])[:20] for c in INVALID]
)
def test_invalid_policy_names_field(
    policy_doc: dict[str, Any], path: str, value: Any, message: str
) -> None:
    _set(policy_doc, path, value)
    with pytest.raises(PolicyError) as info:
        parse_policy(policy_doc, "policy.yaml")
    assert message in str(info.value)
    assert str(info.value).startswith("policy.yaml: invalid RoutePolicy")


def test_rules_strategy_needs_default(policy_doc: dict[str, Any]) -> None:
    policy_doc["spec"]["strategy"] = {
        "type": "rules",
        "rules": [{"when": {"keywords": ["sql"]}, "route": "standard"}],
    }
    with pytest.raises(PolicyError, match=r"strategy\.default"):
        parse_policy(policy_doc)
    policy_doc["spec"]["strategy"]["default"] = "light"
    assert parse_policy(policy_doc).spec.strategy.default == "light"


def test_session_affinity_header_is_a_lowercased_header_name(policy_doc: dict[str, Any]) -> None:
    policy_doc["spec"]["sessionAffinity"] = {"header": "X-Conversation-ID"}
    assert parse_policy(policy_doc).spec.session_affinity.header == "x-conversation-id"  # type: ignore[union-attr]
    policy_doc["spec"]["sessionAffinity"] = {"header": "bad header"}
    with pytest.raises(PolicyError, match=r"sessionAffinity\.header"):
        parse_policy(policy_doc)
