"""Semantic rule conditions: the embedding, the schema, the compiled config, the engine and
the processor, with the real default bundle (no stand-in embeddings)."""

from __future__ import annotations

import asyncio
import copy
import re
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import yaml
from conftest import compile_docs

from switchyard.api.v1 import routing_pb2 as pb
from switchyard.extproc.batching import BATCH
from switchyard.extproc.config import CompiledPolicy, build_config
from switchyard.extproc.engine import decide, select_target
from switchyard.extproc.request import Endpoint, ParsedRequest, parse_request
from switchyard.extproc.router.bundle import BUNDLES_DIR, load_bundle
from switchyard.extproc.router.runtime import OnnxRouter
from switchyard.extproc.scoring import HeuristicScorer, RouterScores
from switchyard.extproc.semantic import (
    Embedder,
    EmbedderError,
    load_embedder,
    token_table,
)
from switchyard.extproc.state import RuntimeState
from switchyard.operator.compiler import compile_config
from switchyard.operator.policy import PolicyError, parse_policy

REPO = Path(__file__).resolve().parents[2]
INTENTS = yaml.safe_load((Path(__file__).parent / "testdata/semantic/intents.yaml").read_text())
SQL = INTENTS["intents"]["sql"]
CONTRACT = INTENTS["intents"]["contract-review"]
REASON = re.compile(r"^rule: (?P<rule>[\w-]+), semantic (?P<sim>\d\.\d{3}) >= (?P<t>[\d.]+)$")


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return load_embedder("builtin:default")


@pytest.fixture(scope="module")
def router() -> OnnxRouter:
    return OnnxRouter(load_bundle("builtin:default"), max_wait_ms=1.0, max_batch=8)


def semantic_doc(
    rules: list[dict[str, Any]] | None = None, bundle: str = "builtin:default"
) -> dict[str, Any]:
    """A rules policy over three demo models: `sql` -> standard, `contract` -> capable."""
    if rules is None:
        rules = [
            {
                "name": "sql",
                "when": {"semantic": {"examples": SQL["examples"], "threshold": 0.5}},
                "route": "standard",
            },
            {
                "name": "contract",
                "when": {"semantic": {"examples": CONTRACT["examples"], "threshold": 0.5}},
                "route": "capable",
            },
        ]
    models = [
        {
            "name": name,
            "backend": {"url": f"http://127.0.0.1:{18001 + i}"},
            "upstreamModel": f"{name}-v1",
            "pricing": {"inputPer1M": 0.1 * (i + 1), "outputPer1M": 0.2 * (i + 1)},
        }
        for i, name in enumerate(("light", "standard", "capable"))
    ]
    return {
        "apiVersion": "switchyard.dev/v1alpha1",
        "kind": "RoutePolicy",
        "metadata": {"name": "semantic", "namespace": "team"},
        "spec": {
            "match": {"models": ["auto"]},
            "models": models,
            "strategy": {
                "type": "rules",
                "router": {"bundle": bundle},
                "rules": rules,
                "default": "light",
            },
        },
    }


def request(prompt: str, model: str = "auto") -> ParsedRequest:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    return parse_request(Endpoint.CHAT, orjson.dumps(body))


def policy_of(doc: dict[str, Any]) -> CompiledPolicy:
    config = compile_docs(doc)
    assert not config.policy_errors
    target = select_target(config, request("x", doc["spec"]["match"]["models"][0]), {})
    assert isinstance(target, CompiledPolicy)
    return target


def route(policy: CompiledPolicy, router: OnnxRouter, prompt: str) -> tuple[str, str]:
    scores = router.score_batch([prompt], policy.embedder)[0]
    decision = decide(policy, request(prompt), {}, scores)
    return decision.model.name, decision.reason


# -- the embedding ---------------------------------------------------------------------------


def test_the_table_is_the_graphs_token_table() -> None:
    table = token_table(BUNDLES_DIR / "default" / "model.onnx")
    assert table.shape == (30522, 128 + 1 + 5)  # [w e (128), 1, five token classes]
    assert np.all(table[:, 128] == 1.0)  # the count column: the right tensor, decoded right
    assert np.isin(table[:, 129:], (0.0, 1.0)).all()  # class indicators


def test_embeddings_are_unit_vectors_from_the_routers_own_ids(
    embedder: Embedder, router: OnnxRouter
) -> None:
    prompts = ["How do I join two tables in SQL?", "hi", "", "Über café — 中文 ¥125"]
    scored = router.score_batch(prompts, embedder)  # one padded batch
    for prompt, scores in zip(prompts, scored, strict=True):
        assert scores.embedding is not None
        assert scores.embedding.shape == (128,)
        assert np.linalg.norm(scores.embedding) == pytest.approx(1.0, abs=1e-5)
        alone = router.score_batch([prompt], embedder)[0].embedding
        assert alone is not None
        np.testing.assert_allclose(scores.embedding, alone, atol=1e-5)
        np.testing.assert_allclose(embedder.embed_text(prompt), alone, atol=1e-6)
    assert all(s.embedding is None for s in router.score_batch(prompts))  # not asked: none


def test_the_common_direction_is_removed(embedder: Embedder) -> None:
    """Without it any two prompts score about 0.7; with it unrelated prompts score low."""
    unrelated = embedder.embed_texts(INTENTS["unrelated"])
    sims = unrelated @ unrelated.T
    off_diagonal = sims[~np.eye(len(sims), dtype=bool)]
    assert float(np.median(off_diagonal)) < 0.3
    raw = token_table(embedder.bundle.model_path)[:, :128]
    raw_sims = Embedder(embedder.bundle, raw).embed_texts(INTENTS["unrelated"])
    raw_off = (raw_sims @ raw_sims.T)[~np.eye(len(sims), dtype=bool)]
    assert float(np.median(raw_off)) > 0.45


@pytest.mark.parametrize(
    ("data", "least_matched", "most_false"),
    [("intents.yaml", 0.75, 0.05), ("validation.yaml", 0.6, 0.02)],
)
def test_paraphrases_separate_from_unrelated_prompts(
    embedder: Embedder, data: str, least_matched: float, most_false: float
) -> None:
    """The measured separation (docs/router-model.md) at threshold 0.5, max over examples:
    81% / 69% of held-out paraphrases match their intent, 3.7% / 0.5% of other prompts."""
    doc = yaml.safe_load((Path(__file__).parent / "testdata/semantic" / data).read_text())
    intents = doc["intents"]
    unrelated = embedder.embed_texts(doc["unrelated"])
    matched = false = positives = negatives = 0
    for name, intent in intents.items():
        examples = embedder.embed_texts(intent["examples"])
        own = (embedder.embed_texts(intent["paraphrases"]) @ examples.T).max(axis=1)
        others = [embedder.embed_texts(v["paraphrases"]) for k, v in intents.items() if k != name]
        rest = (np.concatenate([unrelated, *others]) @ examples.T).max(axis=1)
        matched += int((own >= 0.5).sum())
        false += int((rest >= 0.5).sum())
        positives, negatives = positives + len(own), negatives + len(rest)
    assert matched / positives >= least_matched
    assert false / negatives <= most_false


def test_bundles_without_a_token_table_give_no_embedder() -> None:
    with pytest.raises(EmbedderError, match="semantic conditions need a static-embedding"):
        load_embedder("builtin:minilm")
    with pytest.raises(EmbedderError, match="unknown builtin bundle"):
        load_embedder("builtin:heuristic")
    with pytest.raises(EmbedderError, match="no such directory"):
        load_embedder("/nonexistent/bundle")


def test_the_embedder_is_loaded_once_per_bundle(embedder: Embedder) -> None:
    assert load_embedder("builtin:default") is embedder
    assert load_embedder(str(BUNDLES_DIR / "default")) is embedder


# -- schema ----------------------------------------------------------------------------------


def _semantic_error(semantic: Any, bundle: str = "builtin:default") -> str:
    rules = [{"name": "r", "when": {"semantic": semantic}, "route": "standard"}]
    with pytest.raises(PolicyError) as info:
        parse_policy(semantic_doc(rules, bundle))
    return str(info.value)


@pytest.mark.parametrize(
    ("semantic", "field", "why"),
    [
        ({"examples": [], "threshold": 0.5}, "semantic.examples", "at least 1 item"),
        ({"examples": ["x"] * 33, "threshold": 0.5}, "semantic.examples", "at most 32 items"),
        ({"examples": ["x" * 1001], "threshold": 0.5}, "semantic.examples[0]", "at most 1000"),
        ({"examples": ["ok", "  "], "threshold": 0.5}, "semantic.examples", "examples[1]: blank"),
        ({"examples": [""], "threshold": 0.5}, "semantic.examples[0]", "at least 1 character"),
        ({"examples": ["x"], "threshold": 1.5}, "semantic.threshold", "less than or equal to 1"),
        ({"examples": ["x"], "threshold": -0.1}, "semantic.threshold", "greater than or equal"),
        ({"examples": ["x"]}, "semantic.threshold", "Field required"),
        ({"threshold": 0.5}, "semantic.examples", "Field required"),
        ({"examples": ["x"], "threshold": 0.5, "k": 3}, "semantic.k", "Extra inputs"),
    ],
)
def test_invalid_semantic_conditions_name_the_field(semantic: Any, field: str, why: str) -> None:
    error = _semantic_error(semantic)
    assert f"spec.strategy.rules[0].when.{field}:" in error, error
    assert why in error


@pytest.mark.parametrize("bundle", ["builtin:minilm", "builtin:heuristic"])
def test_semantic_conditions_need_a_static_bundle(bundle: str) -> None:
    error = _semantic_error({"examples": ["x"], "threshold": 0.5}, bundle)
    assert "strategy.rules[0].when.semantic: needs a static-embedding router bundle" in error
    assert repr(bundle) in error


def test_the_compiler_carries_examples_and_threshold() -> None:
    proto = compile_config([parse_policy(semantic_doc())], "")
    when = proto.policies[0].strategy.rules[0].when
    assert when.HasField("semantic")
    assert list(when.semantic.examples) == SQL["examples"]
    assert when.semantic.threshold == 0.5
    plain = compile_config([parse_policy(semantic_doc([]))], "")
    assert not any(r.when.HasField("semantic") for r in plain.policies[0].strategy.rules)


# -- compiled config -------------------------------------------------------------------------


def test_examples_are_embedded_once_at_config_time(embedder: Embedder) -> None:
    policy = policy_of(semantic_doc())
    assert policy.embedder is embedder
    assert policy.needs_scores
    assert policy.semantic_examples is not None
    assert policy.semantic_examples.shape == (10, 128)
    sql, contract = (r.semantic for r in policy.rules)
    assert sql is not None and contract is not None
    assert (sql.start, sql.end, contract.start, contract.end) == (0, 5, 5, 10)
    np.testing.assert_allclose(sql.examples, embedder.embed_texts(SQL["examples"]), atol=1e-6)
    np.testing.assert_allclose(policy.semantic_examples[5:], contract.examples)


def test_a_policy_without_semantic_rules_has_no_embedder(policy_doc: dict[str, Any]) -> None:
    config = compile_docs(policy_doc)
    policy = config.policies_by_alias["auto"][0]
    assert policy.embedder is None and policy.semantic_examples is None
    assert all(r.semantic is None for r in policy.rules)
    # a rules policy whose only score-based condition is semantic still loads its bundle
    config = compile_docs(semantic_doc())
    assert config.router_bundles == {"builtin:default"}


def test_a_bundle_without_embeddings_leaves_only_that_policy_out(
    policy_doc: dict[str, Any],
) -> None:
    minilm = str(BUNDLES_DIR / "minilm")  # a path: only the ext_proc can check it
    doc = semantic_doc(bundle=minilm)
    doc["spec"]["match"]["models"] = ["semantic"]
    proto = compile_config([parse_policy(doc), parse_policy(policy_doc)])
    config = build_config(proto)
    assert set(config.policy_errors) == {"team/semantic"}
    assert config.policy_errors["team/semantic"].startswith(
        "strategy.rules[0].when.semantic: router bundle"
    )
    assert "static-embedding" in config.policy_errors["team/semantic"]
    assert "default/default" in {p.key for g in config.policies_by_alias.values() for p in g}


def test_the_data_plane_checks_what_it_is_sent() -> None:
    proto = compile_config([parse_policy(semantic_doc())], "")
    proto.policies[0].strategy.rules[0].when.semantic.threshold = 2.0
    assert build_config(proto).policy_errors["team/semantic"] == (
        "strategy.rules[0].when.semantic.threshold: must be between 0 and 1, got 2.0"
    )
    del proto.policies[0].strategy.rules[0].when.semantic.examples[:]
    proto.policies[0].strategy.rules[0].when.semantic.threshold = 0.5
    assert build_config(proto).policy_errors["team/semantic"] == (
        "strategy.rules[0].when.semantic.examples: at least one example is needed"
    )


# -- engine ----------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", SQL["paraphrases"][:4])
def test_sql_paraphrases_route_to_the_rules_model(router: OnnxRouter, prompt: str) -> None:
    model, reason = route(policy_of(semantic_doc()), router, prompt)
    assert model == "standard", reason
    found = REASON.match(reason)
    assert found is not None, reason
    assert found["rule"] == "sql" and float(found["sim"]) >= 0.5 and found["t"] == "0.5"


@pytest.mark.parametrize("prompt", CONTRACT["paraphrases"][:4])
def test_contract_paraphrases_route_to_the_rules_model(router: OnnxRouter, prompt: str) -> None:
    model, reason = route(policy_of(semantic_doc()), router, prompt)
    assert (model, reason.split(",")[0]) == ("capable", "rule: contract")


@pytest.mark.parametrize("prompt", INTENTS["unrelated"][:10])
def test_unrelated_prompts_fall_through(router: OnnxRouter, prompt: str) -> None:
    assert route(policy_of(semantic_doc()), router, prompt) == ("light", "default")


def test_the_threshold_is_inclusive_and_decides(router: OnnxRouter, embedder: Embedder) -> None:
    prompt = SQL["paraphrases"][1]
    similarity = float((embedder.embed_texts(SQL["examples"]) @ embedder.embed_text(prompt)).max())
    assert 0.3 < similarity < 0.95

    def with_threshold(threshold: float) -> str:
        rules = [
            {
                "name": "sql",
                "when": {"semantic": {"examples": SQL["examples"], "threshold": threshold}},
                "route": "standard",
            }
        ]
        return route(policy_of(semantic_doc(rules)), router, prompt)[0]

    assert with_threshold(round(similarity - 0.01, 4)) == "standard"
    assert with_threshold(round(similarity + 0.01, 4)) == "light"
    assert with_threshold(0.0) == "standard"
    assert with_threshold(1.0) == "light"


def test_the_reason_names_the_rule_and_figures_never_the_prompt(router: OnnxRouter) -> None:
    prompt = "Write SQL to compute a running total of sales by month."
    _, reason = route(policy_of(semantic_doc()), router, prompt)
    assert REASON.match(reason), reason
    assert not any(word in reason for word in ("SQL", "running", "sales", "month"))


def test_all_conditions_of_a_rule_must_hold(router: OnnxRouter) -> None:
    rules = [
        {
            "name": "sql-for-ops",
            "when": {
                "headers": {"x-team": "ops"},
                "semantic": {"examples": SQL["examples"], "threshold": 0.5},
            },
            "route": "standard",
        }
    ]
    policy = policy_of(semantic_doc(rules))
    prompt = SQL["paraphrases"][0]
    scores = router.score_batch([prompt], policy.embedder)[0]
    assert decide(policy, request(prompt), {}, scores).model.name == "light"
    decision = decide(policy, request(prompt), {"x-team": "ops"}, scores)
    assert decision.model.name == "standard"


def test_without_an_embedding_a_semantic_rule_never_matches(router: OnnxRouter) -> None:
    policy = policy_of(semantic_doc())
    prompt = SQL["examples"][0]  # similarity 1 with an embedding
    scores = router.score_batch([prompt])[0]
    assert scores.embedding is None
    assert decide(policy, request(prompt), {}, scores).reason == "default"
    assert decide(policy, request(prompt), {}, None).reason == "default"


def test_the_first_matching_rule_wins_and_later_ones_are_not_needed(router: OnnxRouter) -> None:
    rules = [
        {"name": "always", "when": {"minPromptTokens": 0}, "route": "capable"},
        {
            "name": "sql",
            "when": {"semantic": {"examples": SQL["examples"], "threshold": 0.5}},
            "route": "standard",
        },
    ]
    policy = policy_of(semantic_doc(rules))
    prompt = SQL["paraphrases"][0]
    scores = RouterScores(difficulty=0.1, category="code")  # no embedding: none is needed
    assert decide(policy, request(prompt), {}, scores).reason == "rule: always"


# -- scorer and processor --------------------------------------------------------------------


async def test_micro_batched_scores_carry_embeddings(embedder: Embedder) -> None:
    router = OnnxRouter(load_bundle("builtin:default"), max_wait_ms=1.0, max_batch=4)
    prompts = [*SQL["paraphrases"], "hi", ""]
    try:
        got = await asyncio.gather(*(router.score(p, embedder) for p in prompts))
    finally:
        router.close()
    for prompt, scores in zip(prompts, got, strict=True):
        assert scores.embedding is not None
        np.testing.assert_allclose(scores.embedding, embedder.embed_text(prompt), atol=1e-5)


async def test_inline_batches_keep_embedded_and_plain_calls_apart(embedder: Embedder) -> None:
    router = OnnxRouter(load_bundle("builtin:default"), inline=True)
    BATCH.open()
    try:
        calls = [router.score("hi", embedder), router.score("hi"), router.score("x", embedder)]
        pending = [c.send(None) for c in calls]  # each yields its Deferred
    finally:
        BATCH.close()
    assert all(d.value is not None for d in pending)  # settled by the batch
    results = []
    for call in calls:
        with pytest.raises(StopIteration) as done:
            call.send(None)
        results.append(done.value.value)
    assert [r.embedding is not None for r in results] == [True, False, True]
    assert results[1].difficulty == pytest.approx(results[0].difficulty, abs=1e-6)


def _state(doc: dict[str, Any], heuristic: bool = False) -> RuntimeState:
    from switchyard.extproc.state import default_scorer_loader

    loader = (lambda _b: HeuristicScorer()) if heuristic else default_scorer_loader
    state = RuntimeState(scorer_loader=loader)
    state.swap(state.prepare(compile_config([parse_policy(doc)], "")))
    return state


@pytest.mark.parametrize("heuristic", [False, True])
async def test_the_processor_routes_on_semantic_rules(heuristic: bool) -> None:
    """With the real router (embedding from its ids) and with the heuristic placeholder (no
    ids: the embedder tokenises the prompt itself)."""
    from switchyard.extproc.processor import Processor

    state = _state(semantic_doc(), heuristic)
    processor = Processor(state)
    for prompt, model, kind in [
        (CONTRACT["paraphrases"][0], "capable", "rule: contract, semantic "),
        (INTENTS["unrelated"][0], "light", "default"),
    ]:
        body = orjson.dumps({"model": "auto", "messages": [{"role": "user", "content": prompt}]})
        headers = {":path": "/v1/chat/completions", ":method": "POST"}
        response = await processor.route(Endpoint.CHAT, headers, body)
        meta = response.dynamic_metadata.fields["switchyard"].struct_value.fields
        assert meta["model"].string_value == model
        assert meta["reason"].string_value.startswith(kind)


def test_examples_directory_loads_with_both_policies() -> None:
    """`switchyard up -f examples/` serves the example policy and the semantic one."""
    docs = [
        yaml.safe_load((REPO / "examples" / n).read_text())
        for n in ("policy.yaml", "semantic.yaml")
    ]
    config = compile_docs(*docs)
    assert not config.policy_errors
    assert {"auto", "assistant", "light", "standard", "capable"} <= set(config.served_names)
    policy = config.policies_by_alias["assistant"][0]
    assert [r.name for r in policy.rules] == ["chat", "extraction", "contract-review"]
    assert policy.embedder is not None
    assert config.policies_by_alias["auto"][0].embedder is None


@pytest.mark.parametrize(
    ("prompt", "rule", "model"),
    [
        ("hey, how's it going?", "chat", "assistant-light"),
        ("thank you, you're great", "chat", "assistant-light"),
        (
            "Get the invoice number, total and due date from the document below and output JSON.",
            "extraction",
            "assistant-standard",
        ),
        (
            "Extract the key fields (customer, amount, currency) from this payment notice.",
            "extraction",
            "assistant-standard",
        ),
        (
            "Is the limitation of liability in this master services agreement standard?",
            "contract-review",
            "assistant-capable",
        ),
    ],
)
def test_the_example_routes_chat_and_extraction(
    router: OnnxRouter, prompt: str, rule: str, model: str
) -> None:
    doc = copy.deepcopy(yaml.safe_load((REPO / "examples" / "semantic.yaml").read_text()))
    got_model, reason = route(policy_of(doc), router, prompt)
    assert (got_model, reason.split(",")[0]) == (model, f"rule: {rule}")


@pytest.mark.parametrize("prompt", INTENTS["unrelated"][:12])
def test_the_example_leaves_other_prompts_to_the_classifier(
    router: OnnxRouter, prompt: str
) -> None:
    doc = yaml.safe_load((REPO / "examples" / "semantic.yaml").read_text())
    assert route(policy_of(doc), router, prompt)[1].startswith("classifier: ")


def test_a_semantic_match_proto_field_is_number_10() -> None:
    assert pb.RuleMatch.DESCRIPTOR.fields_by_name["semantic"].number == 10
