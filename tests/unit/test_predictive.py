"""The predictive strategy: schema, compile-time checks, and the engine's choice."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from conftest import compile_docs

from switchyard.api.v1 import routing_pb2 as pb
from switchyard.extproc.config import CompiledConfig, CompiledPolicy, build_config
from switchyard.extproc.engine import decide, select_target
from switchyard.extproc.errors import GatewayError
from switchyard.extproc.metrics import decision_kind
from switchyard.extproc.request import Endpoint, ParsedRequest, parse_request
from switchyard.extproc.scoring import HeuristicScorer, RouterScores
from switchyard.extproc.state import RuntimeState
from switchyard.operator.compiler import CompileError, compile_config
from switchyard.operator.policy import PolicyError, parse_policy

# The example policy's prices, blended 3 input : 1 output (USD per 1M tokens).
BLENDED = {"light": 0.0575, "standard": 1.6, "capable": 10.0}


def fake_bundle(root: Path, models: list[str]) -> str:
    """A bundle directory whose router.yaml predicts ``models`` (what the compiler reads)."""
    root.mkdir(parents=True, exist_ok=True)
    doc = {"format": "switchyard-router/v1", "labels": {"models": models}}
    (root / "router.yaml").write_text(yaml.safe_dump(doc))
    return str(root)


@pytest.fixture
def bundle(tmp_path: Path) -> str:
    return fake_bundle(tmp_path / "fitted", ["light", "standard", "capable", "other"])


def predictive_doc(doc: dict[str, Any], bundle: str, **knob: Any) -> dict[str, Any]:
    doc["spec"]["strategy"] = {
        "type": "predictive",
        "router": {"bundle": bundle},
        "predictive": knob or {"maxQualityLoss": 0.02},
        "default": "standard",
    }
    return doc


def policy(config: CompiledConfig) -> CompiledPolicy:
    target = select_target(config, request(), {})
    assert isinstance(target, CompiledPolicy)
    return target


def request(prompt: str = "hello", **fields: Any) -> ParsedRequest:
    body = {"model": "auto", "messages": [{"role": "user", "content": prompt}], **fields}
    return parse_request(Endpoint.CHAT, orjson.dumps(body))


def predicted(**scores: float) -> RouterScores:
    return RouterScores(difficulty=0.5, category="chat", predicted=scores)


# --- schema ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"predictive": {}}, "set exactly one of maxQualityLoss or costWeight"),
        (
            {"predictive": {"maxQualityLoss": 0.1, "costWeight": 0.01}},
            "set exactly one of maxQualityLoss or costWeight",
        ),
        ({"predictive": {"maxQualityLoss": 1.5}}, "maxQualityLoss: Input should be less than"),
        ({"predictive": {"costWeight": -1}}, "costWeight: Input should be greater than"),
        ({"predictive": None}, "strategy.predictive: required by the predictive strategy"),
        ({"default": None}, "strategy.default: the predictive strategy needs a default"),
        (
            {"predictive": {"maxQualityLoss": 0.02, "modelMap": {"nope": "x"}}},
            "strategy.predictive.modelMap.nope: unknown model 'nope'",
        ),
        (
            {"router": {"bundle": "builtin:default"}},
            "router bundle 'builtin:default' gives no per-model predictions",
        ),
        (
            {"router": {"bundle": "builtin:heuristic"}},
            "router bundle 'builtin:heuristic' gives no per-model predictions",
        ),
        (
            {"type": "classifier", "tiers": [{"model": "light"}]},
            "strategy.predictive: only the predictive strategy reads it",
        ),
    ],
)
def test_schema_rejects_bad_predictive_settings(
    policy_doc: dict[str, Any], bundle: str, change: dict[str, Any], message: str
) -> None:
    doc = predictive_doc(policy_doc, bundle)
    strategy = doc["spec"]["strategy"]
    for key, value in change.items():
        if value is None:
            del strategy[key]
        else:
            strategy[key] = value
    with pytest.raises(PolicyError, match=re.escape(message)):
        parse_policy(doc)


def test_compile_names_the_models_a_bundle_does_not_predict(
    policy_doc: dict[str, Any], tmp_path: Path
) -> None:
    partial = fake_bundle(tmp_path / "partial", ["light", "big"])
    doc = predictive_doc(policy_doc, partial)
    with pytest.raises(CompileError) as info:
        compile_config([parse_policy(doc)])
    assert str(info.value) == (
        f"RoutePolicy default/default: spec.strategy.router.bundle: router bundle {partial!r} "
        "has no prediction for model(s) standard, capable (it predicts: light, big); map "
        "policy models to its labels with strategy.predictive.modelMap"
    )
    doc["spec"]["strategy"]["predictive"]["modelMap"] = {"standard": "big", "capable": "huge"}
    with pytest.raises(CompileError, match=re.escape("model(s) capable (as huge)")):
        compile_config([parse_policy(doc)])
    doc["spec"]["strategy"]["predictive"]["modelMap"]["capable"] = "big"
    compiled = compile_config([parse_policy(doc)]).policies[0].strategy
    assert compiled.type == pb.Strategy.PREDICTIVE
    assert dict(compiled.predictive.labels) == {
        "light": "light",
        "standard": "big",
        "capable": "big",
    }
    assert compiled.predictive.WhichOneof("knob") == "max_quality_loss"


def test_a_bundle_only_the_pods_have_is_checked_when_they_load_it(
    policy_doc: dict[str, Any], tmp_path: Path
) -> None:
    """A path the compiler cannot read compiles; the ext_proc leaves the policy out if the
    bundle it loads lacks a prediction."""
    elsewhere = str(tmp_path / "on-the-pods")
    proto = compile_config([parse_policy(predictive_doc(policy_doc, elsewhere))])

    class Partial(HeuristicScorer):
        models = ("light", "standard")

    config, _ = RuntimeState(scorer_loader=lambda _: Partial()).prepare(proto)
    assert config.policy_errors == {
        "default/default": f"spec.strategy.router.bundle: router bundle {elsewhere!r} has no "
        "prediction for capable (it predicts: light, standard)"
    }
    served, _ = RuntimeState(scorer_loader=lambda _: HeuristicScorer()).prepare(proto)
    assert served.policy_errors == {}  # no predictions at all: served on the default model


# --- engine ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("loss", "model", "reason"),
    [
        (0.02, "standard", "predictive: standard 0.830 >= best 0.840 - 0.02"),
        (0.05, "light", "predictive: light 0.810 >= best 0.840 - 0.05"),
        (0.0, "capable", "predictive: capable 0.840 >= best 0.840 - 0"),
        (0.01, "standard", "predictive: standard 0.830 >= best 0.840 - 0.01"),  # exactly at it
    ],
)
def test_max_quality_loss_picks_the_cheapest_model_within_the_target(
    policy_doc: dict[str, Any], bundle: str, loss: float, model: str, reason: str
) -> None:
    config = compile_docs(predictive_doc(policy_doc, bundle, maxQualityLoss=loss))
    scores = predicted(light=0.81, standard=0.83, capable=0.84, other=0.99)
    decision = decide(policy(config), request(), {}, scores)
    assert (decision.model.name, decision.reason) == (model, reason)
    assert decision_kind(decision.reason) == "predictive"


@pytest.mark.parametrize(
    ("weight", "model"),
    [(0.0, "capable"), (0.01, "capable"), (0.02, "standard"), (0.2, "light"), (1000, "light")],
)
def test_cost_weight_maximises_score_minus_lambda_price(
    policy_doc: dict[str, Any], bundle: str, weight: float, model: str
) -> None:
    config = compile_docs(predictive_doc(policy_doc, bundle, costWeight=weight))
    scores = {"light": 0.6, "standard": 0.8, "capable": 0.9}
    decision = decide(policy(config), request(), {}, predicted(**scores))
    assert decision.model.name == model
    value = scores[model] - weight * BLENDED[model]
    assert decision.reason == (
        f"predictive: {model} {scores[model]:.3f} - {weight:g} x {BLENDED[model]:g}/1M "
        f"= {value:.3f} best"
    )
    assert decision_kind(decision.reason) == "predictive"


@pytest.mark.parametrize("knob", [{"costWeight": 0.0}, {"maxQualityLoss": 0.0}])
def test_ties_go_to_the_cheaper_model(
    policy_doc: dict[str, Any], bundle: str, knob: dict[str, float]
) -> None:
    config = compile_docs(predictive_doc(policy_doc, bundle, **knob))
    scores = predicted(light=0.7, standard=0.9, capable=0.9)
    assert decide(policy(config), request(), {}, scores).model.name == "standard"


def test_a_model_the_constraints_exclude_is_never_chosen(
    policy_doc: dict[str, Any], bundle: str
) -> None:
    policy_doc["spec"]["models"][2]["dataClasses"] = ["public"]  # capable: not internal
    config = compile_docs(predictive_doc(policy_doc, bundle, maxQualityLoss=0.05))
    scores = predicted(light=0.5, standard=0.8, capable=0.99)
    target = policy(config)
    assert decide(target, request(), {}, scores).model.name == "capable"
    internal = decide(target, request(), {"x-switchyard-data-class": "internal"}, scores)
    # the best among the allowed (standard), not the excluded capable, sets the target
    assert internal.model.name == "standard"
    assert internal.reason == "predictive: standard 0.800 >= best 0.800 - 0.05"
    pii = decide(target, request(), {"x-switchyard-data-class": "pii"}, scores)
    assert pii.model.name == "light"  # the only model allowed personal data
    with pytest.raises(GatewayError) as info:  # only capable takes images, and not internal
        decide(target, _image_request(), {"x-switchyard-data-class": "internal"}, scores)
    assert info.value.status == 400


def test_without_predictions_the_default_model_serves(
    policy_doc: dict[str, Any], bundle: str
) -> None:
    config = compile_docs(predictive_doc(policy_doc, bundle))
    target = policy(config)
    heuristic = HeuristicScorer().score_sync("hello")
    for scores in (None, heuristic):
        decision = decide(target, request(), {}, scores)
        assert (decision.model.name, decision.reason) == (
            "standard",
            "predictive: no prediction, default",
        )
        assert decision_kind(decision.reason) == "predictive"
    # the default's own fallbacks apply when the constraints exclude it (only capable: images)
    images = _image_request()
    decision = decide(target, images, {}, None)
    assert (decision.model.name, decision.reason) == (
        "capable",
        "predictive: no prediction, default, fallback from standard",
    )
    # neither standard nor capable may see pii: the cheapest model allowed to
    pii = decide(target, request(), {"x-switchyard-data-class": "pii"}, None)
    assert (pii.model.name, pii.reason) == ("light", "predictive: no prediction, cheapest allowed")
    with pytest.raises(GatewayError) as info:
        decide(target, request(), {"x-switchyard-data-class": "secret"}, None)
    assert info.value.status == 403


def _image_request() -> ParsedRequest:
    image = {"type": "image_url", "image_url": {"url": "u"}}
    body = {"model": "auto", "messages": [{"role": "user", "content": [image]}]}
    return parse_request(Endpoint.CHAT, orjson.dumps(body))


def test_rules_still_run_first(policy_doc: dict[str, Any], bundle: str) -> None:
    doc = predictive_doc(policy_doc, bundle)
    doc["spec"]["strategy"]["rules"] = [
        {"name": "low", "when": {"headers": {"x-p": "low"}}, "route": "light"}
    ]
    config = compile_docs(doc)
    scores = predicted(light=0.1, standard=0.2, capable=0.9)
    assert decide(policy(config), request(), {"x-p": "low"}, scores).reason == "rule: low"


def test_config_precomputes_blended_prices_cheapest_first(
    policy_doc: dict[str, Any], bundle: str
) -> None:
    doc = predictive_doc(policy_doc, bundle, costWeight=0.5)
    doc["spec"]["strategy"]["predictive"]["modelMap"] = {"capable": "other"}
    rule = policy(compile_docs(doc)).predictive
    assert rule is not None
    assert [(m.name, label, price) for m, label, price in rule.candidates] == [
        ("light", "light", pytest.approx(BLENDED["light"])),
        ("standard", "standard", pytest.approx(BLENDED["standard"])),
        ("capable", "other", pytest.approx(BLENDED["capable"])),
    ]
    assert (rule.cost_weight, rule.max_quality_loss) == (0.5, None)
    assert policy(compile_docs(doc)).needs_scores


def test_a_proto_without_labels_is_left_out(policy_doc: dict[str, Any], bundle: str) -> None:
    proto = compile_config([parse_policy(predictive_doc(policy_doc, bundle))])
    del proto.policies[0].strategy.predictive.labels["capable"]
    config = build_config(proto)
    assert config.policy_errors == {
        "default/default": "strategy.predictive: no prediction label for model(s) capable"
    }


def test_the_compiler_sees_a_bundle_refitted_in_place(
    policy_doc: dict[str, Any], tmp_path: Path
) -> None:
    path = fake_bundle(tmp_path / "refit", ["light"])
    doc = predictive_doc(policy_doc, path)
    with pytest.raises(CompileError, match=re.escape("model(s) standard, capable")):
        compile_config([parse_policy(doc)])
    fake_bundle(tmp_path / "refit", ["light", "standard", "capable"])
    assert compile_config([parse_policy(doc)]).policies[0].strategy.predictive.labels
