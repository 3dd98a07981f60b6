"""``switchyard router calibrate``: the knob value that meets a quality or strong-share target.

The prompts that have an outcome for every model of the policy are routed once through the
gateway's path (``replay``: parse, screen, score) and then decided by the real engine under
each knob value of a grid, each variant compiled from the policy file by the real compiler:

* predictive: ``maxQualityLoss`` (0 to 0.5 by 0.005) or ``costWeight`` (0, then 1e-5 to 7 in
  1-1.5-2-3-5-7 steps), whichever the policy sets;
* classifier: every tier's ``maxDifficulty`` but the last, at the prompts' difficulty
  quantiles (every 5 % for up to two thresholds, 10 % for three, 20 % beyond), each threshold
  the shortest decimal that puts exactly that share of these prompts at or below it.

At each value: expected cost (the chosen model's prices x the request's tokens, with
``output_tokens`` completion tokens), expected quality (the mean realized score of the chosen
model on each prompt) and each model's share. ``--target-quality q`` keeps the values whose
quality is at least q x the best single model's mean score and picks the cheapest;
``--strong-share s`` keeps those sending at most a share s to the most expensive model and picks
the best quality.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from switchyard.api.v1.routing_pb2 import Strategy
from switchyard.extproc.config import CompiledPolicy, blended_per_1m
from switchyard.extproc.errors import GatewayError
from switchyard.extproc.request import Endpoint
from switchyard.operator.policy import RoutePolicy
from switchyard.training.outcomes import Outcomes
from switchyard.training.replay import (
    OUTPUT_TOKENS,
    Prepared,
    ReplayError,
    Routing,
    chat_body,
    choose,
    compile_one,
    fitted_on,
    in_sample_note,
    labels_of,
    prepare,
    request_cost,
    with_changes,
)

MIN_PROMPTS = 20
LOSSES = tuple(round(0.005 * i, 3) for i in range(101))
WEIGHTS = (0.0, *(m * 10.0**e for e in range(-5, 1) for m in (1, 1.5, 2, 3, 5, 7)))


@dataclass(slots=True)
class Point:
    """One knob value and what the policy does with it on the outcomes' prompts."""

    knob: dict[str, Any]
    """The spec.strategy change, e.g. {"predictive": {"maxQualityLoss": 0.02}}."""
    label: str
    cost: float
    """Expected USD per 1,000 requests."""
    quality: float
    shares: dict[str, float]
    rejected: int = 0


@dataclass(slots=True)
class Calibration:
    policy: str
    knob_name: str
    n_prompts: int
    n_dropped: int
    """Prompts of the outcome files without an outcome for every model of the policy."""
    n_rejected: int
    """Prompts the gateway answers itself (a 4xx before any knob applies)."""
    best_model: str
    best_quality: float
    strong_model: str
    target: str
    output_tokens: int
    points: list[Point] = field(default_factory=list)
    chosen: Point | None = None
    current: Point | None = None
    in_sample: list[str] = field(default_factory=list)
    """Outcome files the policy's bundle was fitted on."""
    meets: list[Point] = field(default_factory=list)
    """The values that meet the target."""


def _model_columns(policy: CompiledPolicy, outs: Outcomes, source: str) -> dict[str, int]:
    """Policy model → its column in the outcomes (by name, else by the bundle label)."""
    labels = labels_of(policy)
    cols: dict[str, int] = {}
    missing = []
    for name in policy.models:
        for key in (name, labels.get(name, name)):
            if key in outs.models:
                cols[name] = outs.models.index(key)
                break
        else:
            missing.append(name)
    if missing:
        raise ReplayError(
            f"{source}: no outcomes for model(s) {', '.join(missing)} of policy {policy.key} "
            f"(the outcomes have: {', '.join(outs.models)}); calibrate needs every model's "
            "outcome on the same prompts"
        )
    return cols


def _shortest_between(lo: float, hi: float) -> float:
    """The shortest decimal t with lo <= t < hi (a threshold that keeps lo in, hi out)."""
    for digits in range(2, 10):
        t = math.ceil(lo * 10**digits - 1e-9) / 10**digits
        if lo <= t < hi:
            return float(t)
    return float(lo)


def _thresholds(difficulties: Sequence[float], step: float) -> list[float]:
    d = sorted(float(x) for x in difficulties)
    n = len(d)
    out = {0.0, 1.0}
    for i in range(1, round(1 / step)):
        k = round(i * step * n)  # this many prompts at or below the threshold
        if 0 < k < n and d[k - 1] < d[k]:
            out.add(_shortest_between(d[k - 1], d[k]))
    return sorted(out)


def _grid(
    policy: CompiledPolicy, doc: RoutePolicy, prepared: list[Prepared]
) -> list[dict[str, Any]]:
    if policy.strategy == Strategy.PREDICTIVE:
        assert policy.predictive is not None
        if policy.predictive.max_quality_loss is not None:
            return [{"predictive": {"maxQualityLoss": v}} for v in LOSSES]
        return [{"predictive": {"costWeight": float(f"{v:.3g}")}} for v in WEIGHTS]
    tiers = doc.spec.strategy.tiers
    if len(tiers) < 2:
        raise ReplayError(f"policy {policy.key}: one tier has no threshold to calibrate")
    free = len(tiers) - 1
    step = 0.05 if free <= 2 else 0.1 if free == 3 else 0.2
    diffs = [p.scores.difficulty for p in prepared if p.scores is not None]
    values = _thresholds(diffs, step)
    grid = []
    for combo in itertools.combinations_with_replacement(values, free):
        grid.append(
            {
                "tiers": [
                    {"model": t.model, "maxDifficulty": combo[i]}
                    if i < free
                    else {"model": t.model}
                    for i, t in enumerate(tiers)
                ]
            }
        )
    return grid


def _label(knob: dict[str, Any]) -> str:
    if "predictive" in knob:
        ((name, value),) = knob["predictive"].items()
        return f"{name} {value:g}"
    return "maxDifficulty " + " / ".join(f"{t['maxDifficulty']:g}" for t in knob["tiers"][:-1])


def _current_knob(doc: RoutePolicy) -> dict[str, Any]:
    s = doc.spec.strategy
    if s.predictive is not None:
        if s.predictive.max_quality_loss is not None:
            return {"predictive": {"maxQualityLoss": s.predictive.max_quality_loss}}
        return {"predictive": {"costWeight": s.predictive.cost_weight}}
    return {
        "tiers": [
            {"model": t.model, "maxDifficulty": t.max_difficulty}
            if t.max_difficulty is not None
            else {"model": t.model}
            for t in s.tiers
        ]
    }


def _evaluate(
    variant: CompiledPolicy,
    knob: dict[str, Any],
    prepared: list[Prepared],
    realized: np.ndarray,
    cols: dict[str, int],
    output_tokens: int,
) -> Point:
    cost = quality = 0.0
    counts = dict.fromkeys(variant.models, 0)
    rejected = 0
    for i, p in enumerate(prepared):
        routed = choose(p, 0.0, variant)
        if routed.model is None:
            rejected += 1
            continue
        name = routed.model.name
        counts[name] += 1
        cost += request_cost(routed.model, p.request, output_tokens)
        quality += float(realized[i, cols[name]])
    n = max(len(prepared) - rejected, 1)
    return Point(
        knob,
        _label(knob),
        1000.0 * cost / n,
        quality / n,
        {m: c / n for m, c in counts.items()},
        rejected,
    )


async def calibrate(
    routing: Routing,
    outs: Outcomes,
    *,
    policy_key: str | None = None,
    target_quality: float | None = None,
    strong_share: float | None = None,
    output_tokens: int = OUTPUT_TOKENS,
    source: str = "outcomes",
) -> Calibration:
    """Sweep the policy's knob on ``outs``; exactly one of the two targets must be given."""
    if (target_quality is None) == (strong_share is None):
        raise ReplayError("give exactly one of --target-quality or --strong-share")
    policy = routing.policy(policy_key)
    if policy.strategy not in (Strategy.PREDICTIVE, Strategy.CLASSIFIER):
        raise ReplayError(
            f"policy {policy.key}: calibrate works on the predictive and classifier strategies "
            f"(this one is {Strategy.Type.Name(policy.strategy).lower()})"
        )
    doc = routing.document(policy.key)
    cols = _model_columns(policy, outs, source)
    idx = list(cols.values())
    complete = np.flatnonzero(np.isfinite(outs.scores[:, idx]).all(axis=1))
    if len(complete) < MIN_PROMPTS:
        raise ReplayError(
            f"{source}: too few outcomes: {len(complete)} prompt(s) have an outcome for every "
            f"model of policy {policy.key} ({', '.join(policy.models)}); calibrate needs at "
            f"least {MIN_PROMPTS}, and a few hundred for figures that hold on new traffic"
        )
    alias = sorted(policy.aliases)[0]
    headers = dict(policy.match_headers)
    prepared: list[Prepared] = []
    rows: list[int] = []
    rejected = 0
    for row in complete:
        body = chat_body(alias, outs.texts[row])
        try:
            p = await prepare(routing, Endpoint.CHAT, headers, body)
        except GatewayError:
            rejected += 1
            continue
        if p.target is not policy:
            raise ReplayError(f"policy {policy.key}: another policy answers alias {alias!r}")
        prepared.append(p)
        rows.append(int(row))
    realized = outs.scores[rows]
    means = {m: float(realized[:, c].mean()) for m, c in cols.items()}
    best = max(means, key=lambda m: (means[m], -blended_per_1m(policy.models[m])))
    strong = max(policy.models.values(), key=lambda m: (blended_per_1m(m), m.name)).name
    target = (
        f"quality >= {target_quality:g} x {best}'s {means[best]:.3f} = "
        f"{target_quality * means[best]:.3f}"
        if target_quality is not None
        else f"at most {strong_share:.0%} of requests on {strong}"
    )
    cal = Calibration(
        policy.key,
        "predictive" if policy.strategy == Strategy.PREDICTIVE else "tiers",
        len(prepared),
        len(outs.texts) - len(complete),
        rejected,
        best,
        means[best],
        strong,
        target,
        output_tokens,
    )

    def point(knob: dict[str, Any]) -> Point:
        variant = compile_one(with_changes(doc, {"strategy": knob}))
        return _evaluate(variant, knob, prepared, realized, cols, output_tokens)

    cal.points = [point(k) for k in _grid(policy, doc, prepared)]
    knob = _current_knob(doc)
    cal.current = next((p for p in cal.points if p.knob == knob), None) or point(knob)
    cal.in_sample = fitted_on(routing, outs.files)
    if target_quality is not None:
        floor = target_quality * means[best] - 1e-12
        cal.meets = [p for p in cal.points if p.quality >= floor]
        cal.chosen = min(cal.meets, key=lambda p: (p.cost, -p.quality), default=None)
    else:
        assert strong_share is not None
        cal.meets = [p for p in cal.points if p.shares[strong] <= strong_share + 1e-12]
        cal.chosen = min(cal.meets, key=lambda p: (-p.quality, p.cost), default=None)
    return cal


def frontier(points: Sequence[Point]) -> list[Point]:
    """The points no other point beats on both cost and quality, cheapest first."""
    out: list[Point] = []
    for p in sorted(points, key=lambda p: (p.cost, -p.quality)):
        if not out or p.quality > out[-1].quality + 1e-12:
            out.append(p)
    return out


def _thin(points: list[Point], keep: Sequence[Point | None], rows: int) -> list[Point]:
    if len(points) > rows:
        step = (len(points) - 1) / (rows - 1)
        points = [points[round(i * step)] for i in range(rows)]
    extra = [k for k in keep if k is not None and all(k is not p for p in points)]
    return sorted([*points, *extra], key=lambda p: (p.cost, -p.quality))


def report(cal: Calibration, rows: int = 15) -> str:
    """The table and the YAML snippet, as the CLI prints them."""
    models = list(cal.points[0].shares) if cal.points else []
    lines = [
        f"policy {cal.policy}: {cal.n_prompts} prompts with an outcome for every model"
        + (f" ({cal.n_dropped} prompts without were left out)" if cal.n_dropped else "")
        + (f"; {cal.n_rejected} rejected by the gateway before routing" if cal.n_rejected else ""),
        f"best single model: {cal.best_model} (mean score {cal.best_quality:.3f}); "
        f"cost assumes {cal.output_tokens} completion tokens per request (max_tokens caps it)",
        f"target: {cal.target}",
    ]
    if cal.in_sample:
        lines.append(in_sample_note(cal.in_sample))
    if cal.n_prompts < 200:
        se = 0.5 / math.sqrt(cal.n_prompts)
        lines.append(
            f"note: {cal.n_prompts} prompts: expected quality is uncertain by about "
            f"+/-{se:.3f} (one standard error at most); collect more outcomes for a firmer value"
        )
    width = max([len(p.label) for p in cal.points] + [len("value")])
    lines.append(
        f"{len(cal.meets)} of {len(cal.points)} values meet the target (*); the table shows "
        "those no other value beats on both cost and quality"
    )
    head = f"  {'value':{width}}  {'$/1k req':>9}  {'quality':>7}  " + "  ".join(
        f"{m[:10]:>10}" for m in models
    )
    lines += ["", head]
    for p in _thin(frontier(cal.points), [cal.chosen, cal.current], rows):
        mark = []
        if p is cal.chosen:
            mark.append("<- chosen")
        if p is cal.current:
            mark.append("<- current")
        shares = "  ".join(f"{p.shares[m]:>10.1%}" for m in models)
        ok = "*" if any(p is m for m in cal.meets) else " "
        figures = f"{p.cost:>9.4f}  {p.quality:>7.3f}  {shares}"
        lines.append(f"{ok} {p.label:{width}}  {figures}  {' '.join(mark)}".rstrip())
    lines.append("")
    if cal.chosen is None:
        closest = (
            max(cal.points, key=lambda p: p.quality)
            if "quality" in cal.target
            else min(cal.points, key=lambda p: p.shares[cal.strong_model])
        )
        lines.append(
            f"no value meets the target ({cal.target}); the closest is {closest.label}: "
            f"quality {closest.quality:.3f}, {closest.shares[cal.strong_model]:.1%} on "
            f"{cal.strong_model}"
        )
        return "\n".join(lines) + "\n"
    c = cal.chosen
    lines.append(
        f"chosen: {c.label}: expected ${c.cost:.4f} per 1k requests, quality {c.quality:.3f}"
        + (
            f" (current {cal.current.label}: ${cal.current.cost:.4f}, {cal.current.quality:.3f})"
            if cal.current is not None
            else ""
        )
    )
    lines += ["paste into the policy's spec.strategy:", "", snippet(c)]
    return "\n".join(lines) + "\n"


def snippet(point: Point) -> str:
    """The knob as YAML under spec.strategy."""
    knob = point.knob
    if "predictive" in knob:
        ((name, value),) = knob["predictive"].items()
        return f"    predictive:\n      {name}: {value:g}\n"
    out = ["    tiers:"]
    for t in knob["tiers"]:
        bound = f", maxDifficulty: {t['maxDifficulty']:g}" if "maxDifficulty" in t else ""
        out.append(f"    - {{model: {t['model']}{bound}}}")
    return "\n".join(out) + "\n"
