"""``switchyard router calibrate``: the value it picks meets the target, and what it predicts
for that value is what ``switchyard simulate`` measures when it replays the calibrated policy
(the same prompts through the same compiler, scorer and engine: equal to within 1e-9, float
summation order). Bad input is a clear error with exit status 2."""

from __future__ import annotations

import asyncio
import io
import random
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from switchyard.extproc.router import cli as router_cli
from switchyard.training import calibrate, outcomes, replay, simulate, traffic

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "policy.yaml"
OUTCOMES = ROOT / "examples" / "outcomes.jsonl"
TOLERANCE = 1e-9


def _calibrate(args: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    code = router_cli.main(["calibrate", *args], stdout=out)
    return code, out.getvalue()


def _replay(candidate: Path, current: Path) -> simulate.Simulation:
    outs = outcomes.load([OUTCOMES])
    lines = traffic.read_traffic([OUTCOMES], "auto")
    return asyncio.run(
        simulate.simulate(
            replay.load_routing([str(candidate)]),
            lines,
            replay.load_routing([str(current)]),
            outs,
        )
    )


def _per_1k(side: simulate.Side) -> float:
    return 1000 * side.cost / side.routed


def _check_replay(cal: calibrate.Calibration, sim: simulate.Simulation) -> None:
    assert cal.chosen is not None and cal.current is not None
    assert sim.candidate.routed == sim.current.routed == cal.n_prompts
    assert sim.candidate.from_outcomes == cal.n_prompts  # every quality is a realized one
    for point, side in ((cal.chosen, sim.candidate), (cal.current, sim.current)):
        assert abs(_per_1k(side) - point.cost) < TOLERANCE
        assert side.mean_quality is not None
        assert abs(side.mean_quality - point.quality) < TOLERANCE
        shares = side.shares()
        assert all(abs(shares.get(m, 0.0) - s) < TOLERANCE for m, s in point.shares.items())


def _run(routing: replay.Routing, **target: float) -> calibrate.Calibration:
    return asyncio.run(calibrate.calibrate(routing, outcomes.load([OUTCOMES]), **target))


def test_classifier_thresholds_for_a_target_quality_match_a_replay(tmp_path: Path) -> None:
    written = tmp_path / "candidate.yaml"
    args = ["--outcomes", str(OUTCOMES), "-f", str(EXAMPLE), "--target-quality", "0.95"]
    code, out = _calibrate([*args, "--write", str(written)])
    assert code == 0, out
    cal = _run(replay.load_routing([str(EXAMPLE)]), target_quality=0.95)
    assert cal.chosen is not None
    assert cal.chosen.quality >= 0.95 * cal.best_quality
    # the cheapest such value: no value that meets the target costs less
    assert all(
        p.cost >= cal.chosen.cost for p in cal.points if p.quality >= 0.95 * cal.best_quality
    )
    assert f"chosen: {cal.chosen.label}: expected ${cal.chosen.cost:.4f}" in out
    assert calibrate.snippet(cal.chosen) in out
    tiers = yaml.safe_load(written.read_text())["spec"]["strategy"]["tiers"]
    assert [t.get("maxDifficulty") for t in tiers[:-1]] == [
        t["maxDifficulty"] for t in cal.chosen.knob["tiers"][:-1]
    ]
    _check_replay(cal, _replay(written, EXAMPLE))


def test_a_strong_share_caps_the_most_expensive_model(tmp_path: Path) -> None:
    cal = _run(replay.load_routing([str(EXAMPLE)]), strong_share=0.1)
    assert cal.strong_model == "capable"
    assert cal.chosen is not None and cal.chosen.shares["capable"] <= 0.1
    better = [
        p for p in cal.points if p.shares["capable"] <= 0.1 and p.quality > cal.chosen.quality
    ]
    assert better == []
    candidate = tmp_path / "c.yaml"
    doc = replay.with_changes(
        replay.load_routing([str(EXAMPLE)]).document("default/default"),
        {"strategy": cal.chosen.knob},
    )
    candidate.write_text(yaml.safe_dump(replay.policy_document(doc)))
    _check_replay(cal, _replay(candidate, EXAMPLE))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle fitted by `switchyard router fit` on the example outcomes."""
    out = tmp_path_factory.mktemp("fit") / "bundle"
    argv = ["fit", "--outcomes", str(OUTCOMES), "--out", str(out), "--force", "--folds", "3"]
    assert router_cli.main(argv, stdout=io.StringIO()) == 0
    return out


def _predictive(tmp_path: Path, bundle: Path, knob: dict[str, float]) -> Path:
    doc: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["strategy"] = {
        "type": "predictive",
        "router": {"bundle": str(bundle)},
        "predictive": knob,
        "default": "standard",
    }
    path = tmp_path / "predictive.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize(
    ("knob", "target"),
    [
        ({"maxQualityLoss": 0.02}, {"target_quality": 0.9}),
        ({"costWeight": 0.01}, {"strong_share": 0.1}),
    ],
)
def test_predictive_knobs_match_a_replay(
    tmp_path: Path, fitted: Path, knob: dict[str, float], target: dict[str, float]
) -> None:
    policy = _predictive(tmp_path, fitted, knob)
    cal = _run(replay.load_routing([str(policy)]), **target)
    assert cal.chosen is not None
    assert list(cal.chosen.knob["predictive"]) == list(knob)  # the knob the policy sets
    assert cal.in_sample == [str(OUTCOMES)]  # the bundle learned from these outcomes
    assert "optimistic" in calibrate.report(cal)
    assert len({round(p.cost, 6) for p in cal.points}) > 5  # the knob moves the decisions
    written = tmp_path / "written.yaml"
    code, out = _calibrate(
        ["--outcomes", str(OUTCOMES), "-f", str(policy), "--write", str(written)]
        + [f"--{k.replace('_', '-')}={v}" for k, v in target.items()]
    )
    assert code == 0 and calibrate.snippet(cal.chosen) in out
    _check_replay(cal, _replay(written, policy))
    # Without outcomes, simulate's quality is the bundle's prediction, and it says so.
    sim = asyncio.run(
        simulate.simulate(
            replay.load_routing([str(written)]),
            traffic.read_traffic([OUTCOMES], "auto"),
            replay.load_routing([str(policy)]),
        )
    )
    assert sim.candidate.predicted == sim.current.predicted == cal.n_prompts
    assert sim.candidate.from_outcomes == 0
    assert f"({cal.n_prompts} from outcomes" not in simulate.report(sim)
    assert f"0 from outcomes, {cal.n_prompts} predicted by the bundle" in simulate.report(sim)


def _outcomes(path: Path, n: int, models: tuple[str, ...]) -> Path:
    rng = random.Random(0)
    rows = [
        {"id": i, "prompt": f"question {i} about rivers", "model": m, "score": rng.random()}
        for i in range(n)
        for m in models
    ]
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def _raw(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("make", "extra", "message"),
    [
        (
            lambda d: _outcomes(d / "o.jsonl", 10, ("light", "standard", "capable")),
            [],
            "too few outcomes: 10 prompt(s) have an outcome for every model",
        ),
        (
            lambda d: _outcomes(d / "o.jsonl", 50, ("light", "standard")),
            [],
            "no outcomes for model(s) capable of policy default/default",
        ),
        (
            lambda d: _outcomes(d / "o.jsonl", 50, ("light", "standard", "capable")),
            ["--policy", "default/other"],
            "unknown policy 'default/other' (policies: default/default)",
        ),
        (lambda d: d / "missing.jsonl", [], "outcome file(s) not found"),
        (
            lambda d: _raw(d / "o.jsonl", b'{"id": 1}\n'),
            [],
            "o.jsonl:1: needs a 'prompt' or a 'messages' field",
        ),
        (
            lambda d: _outcomes(d / "o.jsonl", 50, ("light", "standard", "capable")),
            ["--target-quality", "1.5"],
            "--target-quality 1.5: expected (0, 1]",
        ),
    ],
)
def test_bad_input_is_a_clear_error(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make: Any,
    extra: list[str],
    message: str,
) -> None:
    path = make(tmp_path)
    args = ["--outcomes", str(path), "-f", str(EXAMPLE)]
    if "--target-quality" not in extra:
        args += ["--strong-share", "0.3"]
    code, _ = _calibrate(args + extra)
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("switchyard router calibrate: error: ") and message in err


def test_a_strategy_without_a_knob_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["strategy"] = {"type": "rules", "default": "light"}
    policy = tmp_path / "rules.yaml"
    policy.write_text(yaml.safe_dump(doc))
    code, _ = _calibrate(["--outcomes", str(OUTCOMES), "-f", str(policy), "--strong-share", "0.3"])
    assert code == 2
    assert "calibrate works on the predictive and classifier strategies (this one is rules)" in (
        capsys.readouterr().err
    )
