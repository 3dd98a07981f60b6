"""``switchyard simulate``: what a candidate policy would have done with logged traffic.

Every line goes through the gateway's path (``replay``) for the candidate policy files and for
the policy in force: the ``--current`` files, or else what the log recorded. Per side: cost (the
chosen model's prices x the request's tokens, ``output_tokens`` completion tokens), expected
quality (the chosen model's outcome for the prompt when the outcome files have one, else the
bundle's prediction when it predicts that model, else unknown; counts say which), and model
shares; then the requests that change model.

A weighted choice the gateway drew at random (no session header) cannot be reproduced: it is
replayed with a draw from the request id (so shares and cost are a fair sample) and counted as
non-reproducible instead of being listed as a change.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from switchyard.extproc.config import ModelRoute
from switchyard.extproc.errors import GatewayError
from switchyard.extproc.request import ParsedRequest, parse_request
from switchyard.training.outcomes import Outcomes
from switchyard.training.replay import (
    OUTPUT_TOKENS,
    Prepared,
    Routed,
    Routing,
    choose,
    fitted_on,
    id_draw,
    in_sample_note,
    labels_of,
    prepare,
    rejected,
    request_cost,
)
from switchyard.training.traffic import Line, Traffic


@dataclass(slots=True)
class Side:
    """One policy's decisions over the traffic."""

    label: str
    routed: int = 0
    rejected: int = 0
    cost: float = 0.0
    unpriced: int = 0
    quality: float = 0.0
    from_outcomes: int = 0
    predicted: int = 0
    unknown: int = 0
    random: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def mean_quality(self) -> float | None:
        known = self.from_outcomes + self.predicted
        return self.quality / known if known else None

    def shares(self) -> dict[str, float]:
        return {m: c / self.routed for m, c in self.counts.items()} if self.routed else {}


@dataclass(frozen=True, slots=True)
class Change:
    id: Any
    where: str
    before: str
    after: str
    before_reason: str
    after_reason: str


@dataclass(slots=True)
class Simulation:
    traffic: Traffic
    current: Side
    candidate: Side
    output_tokens: int
    changes: list[Change] = field(default_factory=list)
    non_reproducible: int = 0
    identical: int = 0
    """Lines whose model and reason are the same on both sides."""
    in_sample: list[str] = field(default_factory=list)
    """Outcome files a policy's bundle was fitted on."""

    @property
    def recorded(self) -> bool:
        """The policy in force is what the log recorded (no --current)."""
        return self.current.label.endswith("(recorded)")


@dataclass(frozen=True, slots=True)
class _Choice:
    name: str | None
    model: ModelRoute | None
    reason: str
    random: bool


def _outcome_table(outs: Outcomes | None) -> dict[str, dict[str, float]]:
    if outs is None:
        return {}
    table: dict[str, dict[str, float]] = {}
    for row, text in enumerate(outs.texts):
        cells = outs.scores[row]
        table[text] = {
            m: float(v) for m, v in zip(outs.models, cells, strict=True) if np.isfinite(v)
        }
    return table


async def _route(routing: Routing, line: Line) -> tuple[_Choice, Prepared | None]:
    try:
        prepared = await prepare(routing, line.endpoint, line.headers, line.body)
    except GatewayError as error:
        return _Choice(None, None, rejected(error).reason, False), None
    except Exception as exc:  # the processor answers 500 for what it did not foresee
        return _Choice(None, None, f"rejected 500 internal_error ({exc!r})", False), None
    r: Routed = choose(prepared, id_draw(line.id))
    return _Choice(r.model.name if r.model else None, r.model, r.reason, r.random), prepared


def _recorded(routing: Routing, line: Line, prepared: Prepared | None) -> _Choice:
    models = routing.config.models_by_name
    model = models.get(f"{line.policy}/{line.model}") or models.get(line.model or "")
    random = line.reason.startswith("weighted") and (
        prepared is None or prepared.session_draw is None
    )
    return _Choice(line.model, model, line.reason, random)


def _account(
    side: Side,
    choice: _Choice,
    request: ParsedRequest | None,
    outcomes: Mapping[str, float],
    predicted: Mapping[str, float] | None,
    labels: Mapping[str, str],
    output_tokens: int,
) -> None:
    if choice.name is None:
        side.rejected += 1
        return
    side.routed += 1
    side.counts[choice.name] = side.counts.get(choice.name, 0) + 1
    side.random += choice.random
    if choice.model is None or request is None:
        side.unpriced += 1
    else:
        side.cost += request_cost(choice.model, request, output_tokens)
    label = labels.get(choice.name, choice.name)
    score = outcomes.get(choice.name, outcomes.get(label))
    if score is not None:
        side.quality += score
        side.from_outcomes += 1
    elif predicted is not None and label in predicted:
        side.quality += predicted[label]
        side.predicted += 1
    else:
        side.unknown += 1


async def simulate(
    candidate: Routing,
    traffic: Traffic,
    current: Routing | None = None,
    outs: Outcomes | None = None,
    output_tokens: int = OUTPUT_TOKENS,
) -> Simulation:
    """Replay ``traffic`` for ``candidate`` and the policy in force (``current``, or the log)."""
    sim = Simulation(
        traffic,
        Side("current" if current is not None else "current (recorded)"),
        Side("candidate"),
        output_tokens,
    )
    table = _outcome_table(outs)
    if outs is not None:
        for routing in (candidate, current):
            if routing is not None:
                sim.in_sample += [
                    f for f in fitted_on(routing, outs.files) if f not in sim.in_sample
                ]
    for line in traffic.lines:
        after, p_after = await _route(candidate, line)
        if current is not None:
            before, p_before = await _route(current, line)
        else:
            before, p_before = _recorded(candidate, line, p_after), None
        try:
            request: ParsedRequest | None = parse_request(line.endpoint, line.body)
        except GatewayError:
            request = None
        found = table.get(request.prompt, {}) if request is not None else {}
        # One predictor for both sides, so their qualities compare: the candidate's bundle
        # when it predicts, else the current policy's.
        predicted, labels = None, {}
        for p in (p_after, p_before):
            if p is not None and p.scores is not None and p.scores.predicted is not None:
                predicted, labels = p.scores.predicted, labels_of(p.target)
                break
        for side, choice in ((sim.current, before), (sim.candidate, after)):
            _account(side, choice, request, found, predicted, labels, output_tokens)
        if before.random or after.random:
            sim.non_reproducible += 1
        elif before.name != after.name:
            sim.changes.append(
                Change(
                    line.id,
                    line.where,
                    before.name or before.reason,
                    after.name or after.reason,
                    before.reason,
                    after.reason,
                )
            )
        elif before.reason == after.reason:
            sim.identical += 1
    return sim


def _quality(side: Side) -> str:
    mean = side.mean_quality
    if mean is None:
        return f"unknown (no outcome or prediction for {side.unknown} requests)"
    parts = [f"{side.from_outcomes} from outcomes", f"{side.predicted} predicted by the bundle"]
    if side.unknown:
        parts.append(f"{side.unknown} unknown, left out")
    return f"{mean:.3f} ({', '.join(parts)})"


def report(sim: Simulation, show: int = 50) -> str:
    """What the CLI prints."""
    t = sim.traffic
    n = len(t.lines)
    lines = [
        f"traffic: {n} requests from {len(t.files)} file(s)"
        + (f"; {t.without_body} recorded without a body were skipped" if t.without_body else ""),
        f"cost assumes {sim.output_tokens} completion tokens per request (max_tokens caps it)"
        + ("; the recorded side is priced with the candidate's prices" if sim.recorded else ""),
    ]
    if sim.in_sample:
        lines.append(in_sample_note(sim.in_sample))
    if sim.non_reproducible:
        lines.append(
            f"{sim.non_reproducible} request(s) routed by a weighted draw the gateway takes at "
            "random (no session header): replayed with a draw from the request id, not listed "
            "as changes"
        )
    lines.append("")
    for side in (sim.current, sim.candidate):
        cost = f"${side.cost:.4f}" + (
            f" ({side.unpriced} requests on models without a known price left out)"
            if side.unpriced
            else ""
        )
        per_1k = 1000 * side.cost / max(side.routed - side.unpriced, 1)
        lines += [
            f"{side.label}: {side.routed} routed, {side.rejected} rejected",
            f"  cost {cost}, ${per_1k:.4f} per 1k requests",
            f"  expected quality {_quality(side)}",
        ]
    models = sorted(set(sim.current.counts) | set(sim.candidate.counts))
    if models:
        width = max(len(m) for m in models)
        lines += ["", f"  {'model':{width}}  {'current':>8}  {'candidate':>9}"]
        cur, cand = sim.current.shares(), sim.candidate.shares()
        for m in models:
            lines.append(f"  {m:{width}}  {cur.get(m, 0.0):>8.1%}  {cand.get(m, 0.0):>9.1%}")
    lines += [
        "",
        f"decisions: {sim.identical} of {n} identical (model and reason), "
        f"{len(sim.changes)} change model",
    ]
    listed = sim.changes if show <= 0 else sim.changes[:show]
    for c in listed:
        lines.append(f"  {c.id}: {c.before} -> {c.after}  ({c.before_reason} | {c.after_reason})")
    if len(listed) < len(sim.changes):
        lines.append(f"  ... and {len(sim.changes) - len(listed)} more (--show 0 lists all)")
    return "\n".join(lines) + "\n"
