"""OnnxRouter: scores, micro-batching, execution providers, tokenisation."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Sequence

import numpy as np
import pytest
from tokenizers import Tokenizer

from switchyard.extproc.router import runtime
from switchyard.extproc.router.bundle import load_bundle
from switchyard.extproc.router.runtime import OnnxRouter, load_scorer, select_providers
from switchyard.extproc.router.tokens import FastTokenizer
from switchyard.extproc.scoring import CATEGORIES, RouterScores

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that merges two sorted lists in O(n).",
    "Prove that the square root of 2 is irrational.",
    "Solve for x: 3x + 7 = 22.",
    "Über café naïve — 中文 テスト ¥125 foo_bar(x) {y: 1}; <tag>",
    "",
]


@pytest.fixture(scope="module")
def router() -> Iterator[OnnxRouter]:
    r = OnnxRouter(load_bundle("builtin:default"), max_wait_ms=1.0, max_batch=8)
    yield r
    r.close()


def _check(s: RouterScores) -> None:
    assert 0.0 <= s.difficulty <= 1.0
    assert set(s.categories) == set(CATEGORIES)
    assert sum(s.categories.values()) == pytest.approx(1.0, abs=1e-4)
    assert s.category == max(s.categories, key=lambda c: s.categories[c])


def test_score_batch_shapes_and_ranges(router: OnnxRouter) -> None:
    out = router.score_batch(PROMPTS)
    assert len(out) == len(PROMPTS)
    for s in out:
        _check(s)
    assert out[1].category == "code"
    assert out[3].category == "math"


def test_batching_does_not_change_scores(router: OnnxRouter) -> None:
    together = router.score_batch(PROMPTS)
    alone = [router.score_batch([p])[0] for p in PROMPTS]
    for a, b in zip(together, alone, strict=True):
        assert a.difficulty == pytest.approx(b.difficulty, abs=1e-5)


async def test_concurrent_score_calls_get_their_own_results(
    router: OnnxRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = [f"{PROMPTS[i % 5]} (variant {i})" + " extra" * i for i in range(40)]
    expected = router.score_batch(texts)
    batches: list[int] = []
    real = router.score_batch

    def counting(chunk: Sequence[str]) -> list[RouterScores]:
        batches.append(len(chunk))
        return real(chunk)

    monkeypatch.setattr(router, "score_batch", counting)
    got = await asyncio.gather(*(router.score(t) for t in texts))
    for g, e in zip(got, expected, strict=True):
        assert g.difficulty == pytest.approx(e.difficulty, abs=1e-5)
        assert g.category == e.category
    assert sum(batches) == len(texts)
    assert max(batches) <= router.max_batch
    assert len(batches) < len(texts)  # calls were grouped


async def test_inference_failure_reaches_every_caller(
    router: OnnxRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(chunk: Sequence[str]) -> list[RouterScores]:
        raise RuntimeError("inference failed")

    monkeypatch.setattr(router, "score_batch", boom)
    results = await asyncio.gather(*(router.score(p) for p in PROMPTS[:3]), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)


async def test_zero_wait_still_groups_same_tick_calls() -> None:
    r = OnnxRouter(load_bundle("builtin:default"), max_wait_ms=0.0)
    try:
        got = await asyncio.gather(*(r.score(p) for p in PROMPTS))
        assert [g.category for g in got] == [s.category for s in r.score_batch(PROMPTS)]
    finally:
        r.close()


def test_cuda_requested_but_absent_falls_back_to_cpu_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger=runtime.__name__):
        chosen = select_providers(["cuda"], ["CPUExecutionProvider"])
    assert chosen == ["CPUExecutionProvider"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "CUDAExecutionProvider" in warnings[0].getMessage()


def test_available_providers_are_kept_in_order_with_cpu_last(
    caplog: pytest.LogCaptureFixture,
) -> None:
    have = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    with caplog.at_level(logging.WARNING, logger=runtime.__name__):
        assert select_providers(["tensorrt", "cuda"], have) == have
        assert select_providers(["cpu", "cuda"], have) == [
            "CUDAExecutionProvider",
            "CPUExecutionProvider",
        ]
        assert select_providers(None, have) == ["CPUExecutionProvider"]
    assert not caplog.records


def test_router_session_runs_on_cpu_when_cuda_is_missing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with caplog.at_level(logging.WARNING, logger=runtime.__name__):
        scorer = load_scorer("builtin:default", providers=["cuda"])
    assert isinstance(scorer, OnnxRouter)
    assert scorer._session.get_providers() == ["CPUExecutionProvider"]
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    _check(scorer.score_batch(["hello"])[0])
    scorer.close()


def _fast_and_reference() -> tuple[FastTokenizer, Tokenizer]:
    """The router's tokenizer without truncation, and the ``tokenizers`` reference."""
    b = load_bundle("builtin:default")
    fast = FastTokenizer(b.tokenizer_path, max_tokens=10_000, head=7_500, tail=2_500)
    ref = Tokenizer.from_file(str(b.tokenizer_path))
    ref.no_truncation()
    ref.no_padding()
    return fast, ref


def test_fast_tokenizer_matches_tokenizers_exactly() -> None:
    fast, ref = _fast_and_reference()
    for text in PROMPTS:
        assert fast.raw_ids(text) == ref.encode(text, add_special_tokens=False).ids


def test_fast_tokenizer_handles_whitespace_that_bert_deletes() -> None:
    """``str.split`` splits on \\v \\f \\x1c-\\x1f \\x85; BERT deletes them (joins the words)."""
    fast, ref = _fast_and_reference()
    texts = [f"hello{c}world {c} x{c}" for c in "\v\f\x1c\x1d\x1e\x1f\x85\u3000\xa0\t"]
    texts += ["[PAD] x[CLS]y", "a" * 150, "  ", "caf\u00e9\u2028na\u00efve"]
    for text in texts:
        want = ref.encode(text, add_special_tokens=False).ids
        assert fast.raw_ids(text) == want
        assert fast.raw_ids(text) == want  # second time from the word cache
        assert fast.encode_array(text).dtype == np.int64


def test_head_tail_truncation() -> None:
    b = load_bundle("builtin:default")
    tok = FastTokenizer(b.tokenizer_path, max_tokens=8, head=6, tail=2)
    ids = tok.encode("one two three four five six seven eight nine ten eleven twelve")
    ref = tok.raw_ids("one two three four five six seven eight nine ten eleven twelve")
    assert ids == ref[:6] + ref[-2:]
    special = FastTokenizer(b.tokenizer_path, max_tokens=8, head=6, tail=2, special_tokens=True)
    sids = special.encode("one two three four five six seven eight nine ten")
    assert len(sids) == 8 and sids[0] == 101 and sids[-1] == 102


async def test_static_bundle_on_cpu_scores_inline_with_the_same_result() -> None:
    scorer = load_scorer("builtin:default")
    assert isinstance(scorer, OnnxRouter) and scorer.inline
    prompt = "Prove that the square root of two is irrational."
    inline = await scorer.score(prompt)
    assert inline == scorer.score_batch([prompt])[0]
    assert scorer._flush_handle is None and not scorer._pending
