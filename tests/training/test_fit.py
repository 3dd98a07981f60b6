"""The difficulty head's fitting pieces: the MLP objective, Platt scaling, ECE, weights."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import approx_fprime

from switchyard.training import data, train


def _auc(score: np.ndarray, positive: np.ndarray) -> float:
    pos, neg = score[positive], score[~positive]
    return float((pos[:, None] > neg[None, :]).mean())


def test_mlp_gradient_matches_finite_differences() -> None:
    rng = np.random.default_rng(0)
    n, d, hidden = 40, 5, 4
    x = rng.normal(size=(n, d))
    y = rng.uniform(size=n)
    w = rng.uniform(0.5, 2.0, size=n)
    theta = rng.normal(0, 0.5, size=d * hidden + 2 * hidden + d + 1)
    _, grad = train.mlp_loss(theta, x, y, w, hidden, 0.1)
    numeric = approx_fprime(theta, lambda t: train.mlp_loss(t, x, y, w, hidden, 0.1)[0], 1e-6)
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-4)


def test_mlp_learns_an_interaction_a_linear_model_cannot() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 2))
    gap = (x[:, 0] * x[:, 1]) > 0  # XOR of the signs
    y = np.where(gap, 0.9, 0.1)
    wl, b, w1, b1, w2 = train.fit_mlp(x, y, np.ones(len(y)), hidden=16, l2=1e-4)
    mlp = x @ wl + b + np.maximum(x @ w1 + b1, 0) @ w2
    lr = train.fit_soft_lr(x, y, c=1.0).decision_function(x)
    assert _auc(mlp, gap) > 0.95
    assert abs(_auc(lr, gap) - 0.5) < 0.1


def test_platt_recovers_slope_and_intercept() -> None:
    rng = np.random.default_rng(2)
    z = rng.normal(size=20_000)
    y = (rng.uniform(size=z.size) < 1 / (1 + np.exp(-(2.0 * z - 1.0)))).astype(np.float64)
    a, b = train.platt(z, y)
    assert a == pytest.approx(2.0, abs=0.1)
    assert b == pytest.approx(-1.0, abs=0.1)


def test_ece_is_zero_when_calibrated_and_large_when_not() -> None:
    rng = np.random.default_rng(3)
    p = rng.uniform(size=10_000)
    y = (rng.uniform(size=p.size) < p).astype(np.float64)
    assert train.ece(p, y) < 0.02
    assert train.ece(1 - p, y) > 0.3


def _example(source: str, outcomes: dict[data.Pair, tuple[float, float]]) -> data.Example:
    return data.Example("q", source, source, "knowledge", None, outcomes)


def test_gain_label_counts_weak_wins_against() -> None:
    both = _example("s", {("w1", "s1"): (0.0, 1.0), ("w2", "s2"): (1.0, 0.0)})
    assert train.gain_label(both) == pytest.approx(0.5)
    assert train.gain_label(_example("s", {("w", "s"): (0.0, 1.0)})) == 1.0
    assert train.gain_label(_example("s", {("w", "s"): (1.0, 1.0)})) == 0.5
    assert np.isnan(train.gain_label(_example("s", {})))


def test_source_weights_give_every_source_the_same_total() -> None:
    examples = [_example("big", {}) for _ in range(90)] + [_example("small", {}) for _ in range(10)]
    fit = np.ones(len(examples), dtype=bool)
    fit[:30] = False  # only fitted rows are weighted
    weights = train._source_weights(examples, fit)
    sources = np.array([e.source for e in examples])[fit]
    assert weights.shape == (fit.sum(),)
    assert weights[sources == "big"].sum() == pytest.approx(weights[sources == "small"].sum())
    assert weights.sum() == pytest.approx(fit.sum())
