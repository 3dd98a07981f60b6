"""Router evaluation metrics on synthetic data."""

from __future__ import annotations

import numpy as np
import pytest

from switchyard.extproc.router import metrics


def _synthetic(n: int, gain: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    weak = (rng.random(n) < 0.5).astype(float)
    strong = weak.copy()
    flip = rng.choice(np.flatnonzero(weak == 0), int(gain * n), replace=False)
    strong[flip] = 1.0
    return weak, strong


def test_oracle_apgr_is_one_minus_half_the_gain_share() -> None:
    weak, strong = _synthetic(2000, 0.2)
    r = metrics.evaluate(strong - weak, weak, strong)
    assert r.apgr == pytest.approx(1 - 0.2 / 2, abs=1e-3)


def test_oracle_apgr_tends_to_one_when_few_prompts_need_the_strong_model() -> None:
    weak, strong = _synthetic(10_000, 0.001)
    assert metrics.evaluate(strong - weak, weak, strong).apgr == pytest.approx(1.0, abs=2e-3)


def test_random_router_apgr_is_one_half() -> None:
    weak, strong = _synthetic(5000, 0.2)
    constant = metrics.evaluate(np.zeros(5000), weak, strong)
    assert constant.apgr == pytest.approx(0.5, abs=1e-9)
    noise = metrics.evaluate(np.random.default_rng(1).random(5000), weak, strong)
    assert noise.apgr == pytest.approx(0.5, abs=0.04)


def test_anti_oracle_is_below_random() -> None:
    weak, strong = _synthetic(2000, 0.2)
    assert metrics.evaluate(weak - strong, weak, strong).apgr < 0.2


def test_calls_and_saving_at_95() -> None:
    weak, strong = _synthetic(1000, 0.4)
    r = metrics.evaluate(strong - weak, weak, strong, cost_ratio=0.1)
    # quality_strong = 0.5 + 0.4ish; the oracle reaches 95% of it with fewer calls than the gain
    assert 0.0 < r.calls_at_95 < 0.4
    assert r.saving_at_95 == pytest.approx(1 - (r.calls_at_95 + (1 - r.calls_at_95) * 0.1))
    assert metrics.evaluate(np.zeros(1000), weak, strong).calls_at_95 > r.calls_at_95


def test_curve_endpoints_are_weak_and_strong_quality() -> None:
    weak, strong = _synthetic(500, 0.3)
    c = metrics.curve(np.arange(500.0), weak, strong)
    assert c.quality[0] == pytest.approx(weak.mean())
    assert c.quality[-1] == pytest.approx(strong.mean())


def test_mismatched_lengths_are_rejected() -> None:
    with pytest.raises(ValueError):
        metrics.curve([1.0, 2.0], [0.0], [1.0])
