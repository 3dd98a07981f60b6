"""``switchyard.training.data``: the loaders, labels, categories and splits."""

from __future__ import annotations

import random
import string
from pathlib import Path

import pytest
from routing_data import HARD

from switchyard.training import data


@pytest.fixture(scope="module")
def examples(routing_root: Path) -> list[data.Example]:
    return data.load_all(routing_root)


def test_every_source_is_read(examples: list[data.Example]) -> None:
    counts = {s: sum(e.source == s for e in examples) for s in data.LOADERS}
    assert counts == {"mmlu_pro": 400, "llmrouter": 400, "open7b": 400, "routellm": 400}


def test_prompts_look_like_what_users_send(examples: list[data.Example]) -> None:
    mmlu_pro = next(e for e in examples if e.source == "mmlu_pro")
    assert mmlu_pro.text.endswith("\nA. yes\nB. no\nC. maybe")
    routellm = [e for e in examples if e.source == "routellm"]
    assert not any(e.text.endswith("Answer:") for e in routellm)
    assert all(e.text.startswith("Question ") for e in examples)


def test_outcomes_cover_the_sources_pairs_and_the_label_is_their_mean(
    examples: list[data.Example],
) -> None:
    pairs = {
        "mmlu_pro": data.MMLU_PRO_PAIRS,
        "llmrouter": data.LLMROUTER_PAIRS,
        "open7b": data.OPEN7B_PAIRS,
        "routellm": data.ROUTELLM_PAIRS,
    }
    for e in examples:
        assert set(e.outcomes) == set(pairs[e.source])
        expected = sum(s * (1 - w) for w, s in e.outcomes.values()) / len(e.outcomes)
        assert e.label == pytest.approx(expected)
        assert 0.0 <= e.label <= 1.0


def test_categories_follow_the_documented_mapping(examples: list[data.Example]) -> None:
    by_family = {e.family: e.category for e in examples if e.source != "routellm"}
    assert by_family == {
        "mmlu_pro/math": "math",
        "mmlu_pro/history": "knowledge",
        "llmrouter/gsm8k": "math",
        "llmrouter/trivia_qa": "knowledge",
        "open7b/gsm8k": "math",
        "open7b/mmlu": "knowledge",
    }
    # RouteLLM's MMLU subjects: college_mathematics -> math, world_religions -> knowledge
    routellm = [e for e in examples if e.source == "routellm"]
    hard = [any(w in e.text for w in HARD) for e in routellm]
    assert {e.category for e, h in zip(routellm, hard, strict=True) if h} == {"math"}
    assert {e.category for e, h in zip(routellm, hard, strict=True) if not h} == {"knowledge"}


def test_split_ignores_case_and_whitespace() -> None:
    assert data.split_of("What is  2+2?\n") == data.split_of("what is 2+2?")


def test_split_fractions() -> None:
    rng = random.Random(0)
    texts = ["".join(rng.choices(string.ascii_letters, k=20)) for _ in range(20_000)]
    splits = [data.split_of(t) for t in texts]
    assert splits.count("dev") / len(texts) == pytest.approx(data.DEV_FRACTION, abs=0.01)
    assert splits.count("cal") / len(texts) == pytest.approx(data.CAL_FRACTION, abs=0.01)
    train = [t for t, s in zip(texts, splits, strict=True) if s == "train"]
    share = sum(map(data.in_validation, train)) / len(train)
    assert share == pytest.approx(data.VALIDATION_FRACTION, abs=0.015)


def test_missing_data_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="SWITCHYARD_DATA"):
        data.load_all(tmp_path / "nowhere")


def test_prices(routing_root: Path) -> None:
    assert data.price("gpt4_1106") == 10.0
    assert data.price("llama-3.1-8b-instruct", routing_root) == 0.2
    assert data.price("some-unknown-7b", routing_root) == 0.20
