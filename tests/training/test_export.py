"""The exported ONNX graphs compute exactly the features and heads the trainer fitted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from switchyard.training import export

DIM, N_EXTRA, VOCAB, N_CAT, HIDDEN = 6, 5, 40, 7, 4


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture
def heads() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    n_in = DIM + 2 + N_EXTRA
    return {
        "mean": rng.normal(size=n_in).astype(np.float32),
        "scale": rng.uniform(0.5, 2.0, size=n_in).astype(np.float32),
        "w": rng.normal(size=n_in).astype(np.float32),
        "w1": rng.normal(size=(n_in, HIDDEN)).astype(np.float32),
        "b1": rng.normal(size=HIDDEN).astype(np.float32),
        "w2": rng.normal(size=HIDDEN).astype(np.float32),
        "wc": rng.normal(size=(n_in, N_CAT)).astype(np.float32),
        "bc": rng.normal(size=N_CAT).astype(np.float32),
    }


def _reference(x: np.ndarray, h: dict[str, np.ndarray], b: float) -> tuple[np.ndarray, ...]:
    xs = (x - h["mean"]) / h["scale"]
    z = xs @ h["w"] + b + np.maximum(xs @ h["w1"] + h["b1"], 0) @ h["w2"]
    return _sigmoid(z), _softmax(xs @ h["wc"] + h["bc"])


def test_static_graph_matches_the_training_features(
    tmp_path: Path, heads: dict[str, np.ndarray]
) -> None:
    rng = np.random.default_rng(1)
    table = np.hstack(
        [
            rng.normal(size=(VOCAB, DIM)),
            np.ones((VOCAB, 1)),
            rng.integers(0, 2, size=(VOCAB, N_EXTRA)),
        ]
    ).astype(np.float16)
    path = tmp_path / "model.onnx"
    export.static_graph(
        path,
        table,
        DIM,
        N_EXTRA,
        heads["mean"],
        heads["scale"],
        (heads["w"], 0.3),
        (heads["wc"], heads["bc"]),
        (heads["w1"], heads["b1"], heads["w2"]),
    )
    prompts = [rng.integers(0, VOCAB, size=n) for n in (1, 7, 20)]
    ids = np.zeros((3, 20), dtype=np.int64)
    mask = np.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, : len(p)] = p
        mask[r, : len(p)] = 1
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diff, cats = sess.run(["difficulty", "categories"], {"input_ids": ids, "attention_mask": mask})

    # the trainer's features (train.Features): SIF-weighted sum, L2-normalised; log length
    # over 6 and its square; token-class fractions
    t = table.astype(np.float32)
    sums = np.stack([t[p].sum(axis=0) for p in prompts])
    vec = sums[:, :DIM] / np.linalg.norm(sums[:, :DIM], axis=1, keepdims=True)
    n = np.array([len(p) for p in prompts], dtype=np.float32)[:, None]
    ln = np.log(n + 1) / 6
    x = np.hstack([vec, ln, ln * ln, sums[:, DIM + 1 :] / n])
    want_diff, want_cats = _reference(x, heads, 0.3)
    np.testing.assert_allclose(diff, want_diff, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cats, want_cats, rtol=1e-4, atol=1e-5)


def test_head_graph_matches_the_training_features(
    tmp_path: Path, heads: dict[str, np.ndarray]
) -> None:
    rng = np.random.default_rng(2)
    n_in = 384 + 2
    h = {
        **heads,
        "mean": rng.normal(size=n_in).astype(np.float32),
        "scale": rng.uniform(0.5, 2.0, size=n_in).astype(np.float32),
        "w": rng.normal(size=n_in).astype(np.float32),
        "w1": rng.normal(size=(n_in, HIDDEN)).astype(np.float32),
        "wc": rng.normal(size=(n_in, N_CAT)).astype(np.float32),
    }
    path = tmp_path / "head.onnx"
    export.head_graph(
        path,
        h["mean"],
        h["scale"],
        (h["w"], -0.2),
        (h["wc"], h["bc"]),
        (h["w1"], h["b1"], h["w2"]),
    )
    emb = rng.normal(size=(4, 384)).astype(np.float32)
    ntok = np.array([[1], [10], [100], [126]], dtype=np.float32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diff, cats = sess.run(["difficulty", "categories"], {"embedding": emb, "n_tokens": ntok})

    # train.build_minilm: L2-normalised embedding, log(n+1)/6 and its square
    ln = np.log(ntok + 1) / 6
    x = np.hstack([emb / np.linalg.norm(emb, axis=1, keepdims=True), ln, ln * ln])
    want_diff, want_cats = _reference(x, h, -0.2)
    np.testing.assert_allclose(diff, want_diff, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cats, want_cats, rtol=1e-4, atol=1e-5)
