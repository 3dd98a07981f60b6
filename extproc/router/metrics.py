"""Cost/quality metrics of a two-model router (RouteLLM's evaluation, numpy only).

A router scores each prompt; with a threshold, the prompts scoring highest go to the strong
model and the rest to the weak one. Sweeping the share of strong calls from 0 to 1 gives the
cost/quality curve. Ties in the score are resolved in expectation (as a random tie-break would
on average), so a constant score is exactly the random router.

* ``PGR(c)`` (performance gap recovered) = (quality(c) - quality_weak) /
  (quality_strong - quality_weak), at strong-call share ``c``.
* ``APGR`` = the area under PGR(c) for c in [0, 1] (RouteLLM). Random = 0.5. An oracle that
  sends exactly the prompts the strong model gains on gets ``1 - g / 2`` where ``g`` is the share
  of such prompts (it needs ``g`` of the calls to reach PGR 1), so it tends to 1 as ``g`` shrinks.
* ``calls_at_95``: the smallest strong-call share whose quality reaches 95 % of the strong
  model's quality (0 when the weak model alone already does).
* ``saving_at_95``: the cost saving against sending every prompt to the strong model at that
  share, for a weak/strong price ratio ``cost_ratio`` = price_weak / price_strong.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

GRID = 1001


@dataclass(frozen=True, slots=True)
class Curve:
    calls: FloatArray  # strong-call share, GRID points from 0 to 1
    quality: FloatArray  # mean quality at that share
    quality_weak: float
    quality_strong: float

    @property
    def pgr(self) -> FloatArray:
        gap = self.quality_strong - self.quality_weak
        if abs(gap) < 1e-12:
            return np.zeros_like(self.quality)
        return (self.quality - self.quality_weak) / gap


def curve(scores: npt.ArrayLike, weak: npt.ArrayLike, strong: npt.ArrayLike) -> Curve:
    """The expected quality at each strong-call share when the highest scores go strong."""
    s = np.asarray(scores, dtype=np.float64)
    w = np.asarray(weak, dtype=np.float64)
    g = np.asarray(strong, dtype=np.float64)
    if not (s.shape == w.shape == g.shape) or s.ndim != 1 or s.size == 0:
        raise ValueError("scores, weak and strong must be 1-d arrays of the same, non-zero length")
    n = s.size
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    gain = (g - w)[order]
    # boundaries of tie groups: expected cumulative gain is linear inside a group
    boundaries = np.flatnonzero(np.diff(s_sorted) != 0) + 1
    knots_k = np.concatenate(([0], boundaries, [n])).astype(np.float64)
    cum = np.concatenate(([0.0], np.cumsum(gain)))
    knots_gain = cum[knots_k.astype(np.int64)]
    calls = np.linspace(0.0, 1.0, GRID)
    cum_at = np.interp(calls * n, knots_k, knots_gain)
    quality = (w.sum() + cum_at) / n
    return Curve(calls, quality, float(w.mean()), float(g.mean()))


def apgr(c: Curve) -> float:
    """Area under the PGR curve (trapezoid rule over the share of strong calls)."""
    pgr = c.pgr
    return float(np.sum((pgr[1:] + pgr[:-1]) * 0.5 * np.diff(c.calls)))


def calls_at_quality(c: Curve, target: float = 0.95) -> float:
    """Smallest strong-call share whose quality reaches ``target`` x the strong model's."""
    goal = target * c.quality_strong
    hit = np.flatnonzero(c.quality >= goal - 1e-12)
    return float(c.calls[hit[0]]) if hit.size else 1.0


def cost_saving(calls: float, cost_ratio: float) -> float:
    """Saving against all-strong when ``calls`` of prompts go strong (price ratio weak/strong)."""
    return float(1.0 - (calls + (1.0 - calls) * cost_ratio))


@dataclass(frozen=True, slots=True)
class PairReport:
    apgr: float
    calls_at_95: float
    saving_at_95: float
    curve: Curve


def evaluate(
    scores: npt.ArrayLike,
    weak: npt.ArrayLike,
    strong: npt.ArrayLike,
    cost_ratio: float = 0.1,
) -> PairReport:
    c = curve(scores, weak, strong)
    calls = calls_at_quality(c, 0.95)
    return PairReport(apgr(c), calls, cost_saving(calls, cost_ratio), c)
