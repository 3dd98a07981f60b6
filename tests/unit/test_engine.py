from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import orjson
import pytest
from conftest import compile_docs

from switchyard.extproc.config import CompiledConfig, CompiledPolicy, ModelRoute
from switchyard.extproc.engine import decide, select_target, session_view
from switchyard.extproc.errors import GatewayError
from switchyard.extproc.request import Endpoint, ParsedRequest, parse_request
from switchyard.extproc.scoring import RouterScores


def request(prompt: str = "hello", model: str = "auto", **fields: Any) -> ParsedRequest:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], **fields}
    return parse_request(Endpoint.CHAT, orjson.dumps(body))


def scores(difficulty: float, category: str = "chat") -> RouterScores:
    return RouterScores(difficulty=difficulty, category=category, categories={category: 1.0})


@pytest.fixture
def config(policy_doc: dict[str, Any]) -> CompiledConfig:
    tiers = policy_doc["spec"]["strategy"]["tiers"]
    tiers[0]["maxDifficulty"], tiers[1]["maxDifficulty"] = 0.35, 0.7
    return compile_docs(policy_doc)


def policy_of(config: CompiledConfig, headers: dict[str, str] | None = None) -> CompiledPolicy:
    target = select_target(config, request(), headers or {})
    assert isinstance(target, CompiledPolicy)
    return target


@pytest.mark.parametrize(
    ("difficulty", "model"),
    [
        (0.0, "light"),
        (0.35, "light"),
        (0.36, "standard"),
        (0.7, "standard"),
        (0.71, "capable"),
        (1.0, "capable"),
    ],
)
def test_classifier_tiers_are_the_cost_quality_knob(
    config: CompiledConfig, difficulty: float, model: str
) -> None:
    decision = decide(policy_of(config), request(), {}, scores(difficulty))
    assert decision.model.name == model
    assert decision.policy == "default/default"
    assert decision.reason.startswith("classifier: difficulty")


def test_rules_run_before_the_strategy(config: CompiledConfig) -> None:
    decision = decide(policy_of(config), request(), {"x-priority": "low"}, scores(0.99))
    assert decision.model.name == "light"
    assert decision.reason == "rule: low-priority"


def test_context_window_moves_long_prompts_up(config: CompiledConfig) -> None:
    long_prompt = "word " * 40_000  # ~50k tokens: beyond light's 32k window
    decision = decide(policy_of(config), request(long_prompt), {}, scores(0.1))
    assert decision.model.name == "standard"
    assert "constrained" in decision.reason


def test_max_tokens_counts_against_the_window(config: CompiledConfig) -> None:
    req = request("short", max_tokens=31_999)
    assert decide(policy_of(config), req, {}, scores(0.1)).model.name == "standard"


def test_too_long_for_every_model_is_400(config: CompiledConfig) -> None:
    with pytest.raises(GatewayError) as info:
        decide(policy_of(config), request("word " * 200_000), {}, scores(0.1))
    assert (info.value.status, info.value.code) == (400, "context_length_exceeded")


def test_pii_stays_on_models_that_allow_it(config: CompiledConfig) -> None:
    decision = decide(
        policy_of(config), request(), {"x-switchyard-data-class": "pii"}, scores(0.95)
    )
    assert decision.model.name == "light"
    assert "constrained" in decision.reason


def test_unknown_data_class_is_403(config: CompiledConfig) -> None:
    with pytest.raises(GatewayError) as info:
        decide(policy_of(config), request(), {"x-switchyard-data-class": "secret"}, scores(0.2))
    assert (info.value.status, info.value.code) == (403, "data_class_not_allowed")


def test_images_need_a_model_with_the_capability(config: CompiledConfig) -> None:
    body = {
        "model": "auto",
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}
        ],
    }
    req = parse_request(Endpoint.CHAT, orjson.dumps(body))
    assert decide(policy_of(config), req, {}, scores(0.0)).model.name == "capable"


def test_unsupported_capability_is_400(policy_doc: dict[str, Any]) -> None:
    for model in policy_doc["spec"]["models"]:
        model["capabilities"] = []
    config = compile_docs(policy_doc)
    with pytest.raises(GatewayError) as info:
        decide(policy_of(config), request(tools=[{"type": "function"}]), {}, scores(0.2))
    assert (info.value.status, info.value.code) == (400, "unsupported_capability")


def test_direct_model_and_unknown_model(config: CompiledConfig) -> None:
    target = select_target(config, request(model="standard"), {})
    assert isinstance(target, ModelRoute)
    decision = decide(target, request(model="standard"), {}, None)
    assert (decision.model.name, decision.reason) == ("standard", "direct: model named in request")
    qualified = select_target(config, request(model="default/default/capable"), {})
    assert isinstance(qualified, ModelRoute) and qualified.name == "capable"
    with pytest.raises(GatewayError) as info:
        select_target(config, request(model="gpt-17"), {})
    assert (info.value.status, info.value.code, info.value.param) == (
        404,
        "model_not_found",
        "model",
    )


def test_direct_model_still_honours_data_class(config: CompiledConfig) -> None:
    target = select_target(config, request(model="capable"), {})
    with pytest.raises(GatewayError) as info:
        decide(target, request(model="capable"), {"x-switchyard-data-class": "pii"}, None)
    assert info.value.status == 403


def _rules_policy(policy_doc: dict[str, Any], rules: list[dict[str, Any]]) -> CompiledPolicy:
    doc = copy.deepcopy(policy_doc)
    doc["spec"]["strategy"] = {"type": "rules", "rules": rules, "default": "light"}
    return policy_of(compile_docs(doc))


def test_rule_conditions(policy_doc: dict[str, Any]) -> None:
    policy = _rules_policy(
        policy_doc,
        [
            {"name": "sql", "when": {"keywords": ["SELECT"]}, "route": "standard"},
            {"name": "proof", "when": {"regex": r"\bprove\b"}, "route": "capable"},
            {"name": "long", "when": {"minPromptTokens": 1000}, "route": "standard"},
            {
                "name": "hard-code",
                "when": {"category": ["code"], "minDifficulty": 0.5},
                "route": "capable",
            },
        ],
    )
    assert decide(policy, request("please select * from t"), {}, None).reason == "rule: sql"
    assert decide(policy, request("prove it"), {}, None).model.name == "capable"
    assert decide(policy, request("approve it"), {}, None).reason == "default"
    assert decide(policy, request("x " * 3000), {}, None).reason == "rule: long"
    assert decide(policy, request("code"), {}, scores(0.6, "code")).reason == "rule: hard-code"
    assert decide(policy, request("code"), {}, scores(0.4, "code")).reason == "default"
    assert decide(policy, request("code"), {}, None).reason == "default"


def test_rule_falls_back_when_its_model_is_not_allowed(policy_doc: dict[str, Any]) -> None:
    policy = _rules_policy(
        policy_doc, [{"name": "big", "when": {"keywords": ["x"]}, "route": "light"}]
    )
    long_prompt = "x " * 70_000  # ~35k tokens: beyond light (32k), within standard
    decision = decide(policy, request(long_prompt), {}, None)
    assert (decision.model.name, decision.reason) == ("standard", "rule: big, fallback from light")


def test_weighted_split_follows_weights(policy_doc: dict[str, Any]) -> None:
    doc = copy.deepcopy(policy_doc)
    doc["spec"]["strategy"] = {"type": "weighted"}
    for model, weight in zip(doc["spec"]["models"], [3, 1, 0], strict=True):
        model["weight"] = weight
    policy = policy_of(compile_docs(doc))
    counts = Counter(
        decide(policy, request(), {}, None, draw=i / 400).model.name for i in range(400)
    )
    assert counts == {"light": 300, "standard": 100}


def test_header_matched_policy_wins(policy_doc: dict[str, Any]) -> None:
    special = copy.deepcopy(policy_doc)
    special["metadata"]["name"] = "team-a"
    special["spec"]["match"]["headers"] = {"X-Team": "a"}
    special["spec"]["strategy"] = {"type": "rules", "default": "capable"}
    config = compile_docs(policy_doc, special)
    assert policy_of(config, {"x-team": "a"}).key == "default/team-a"
    assert policy_of(config, {"x-team": "b"}).key == "default/default"
    # Short names shared by two policies are ambiguous; qualified names still work.
    with pytest.raises(GatewayError):
        select_target(config, request(model="light"), {})
    assert isinstance(select_target(config, request(model="default/team-a/light"), {}), ModelRoute)


def test_session_view_routes_a_conversation_on_its_first_turn(config: CompiledConfig) -> None:
    policy = policy_of(config)
    assert policy.session_header == "x-session-id"
    body = {
        "model": "auto",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "answer"},
            {"role": "user", "content": "second question"},
        ],
    }
    parsed = parse_request(Endpoint.CHAT, orjson.dumps(body))
    assert parsed.prompt == "second question"
    pinned, draw = session_view(policy, parsed, {"x-session-id": "abc"})
    assert pinned.prompt == "first question"
    assert pinned.prompt_tokens == parsed.prompt_tokens  # constraints still see everything
    _, same_draw = session_view(policy, parsed, {"x-session-id": "abc"})
    _, other_draw = session_view(policy, parsed, {"x-session-id": "xyz"})
    assert draw is not None and 0 <= draw < 1
    assert same_draw == draw and other_draw != draw
    assert session_view(policy, parsed, {}) == (parsed, None)
    light = config.models_by_name["light"]
    assert session_view(light, parsed, {"x-session-id": "abc"}) == (parsed, None)
