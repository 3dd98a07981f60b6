"""``make train-router`` end to end on a small data set in the real formats: both bundles are
written, load in the gateway's runtime, and score the dev split exactly as training did."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import yaml
from routing_data import HARD

from switchyard.extproc.router import metrics
from switchyard.extproc.router.bundle import load_bundle, sha256_file
from switchyard.extproc.router.cli import evaluate_bundle
from switchyard.extproc.router.cli import main as router_cli
from switchyard.training import data, train


@pytest.fixture(scope="module")
def bundles(routing_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("bundles")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SWITCHYARD_DATA", str(routing_root))
        # 8 dims: the PCA basis needs fewer train prompts than components
        assert train.main(["--out", str(out), "--dim", "8"]) == 0
    return {"default": out / "default", "minilm": out / "minilm"}


def _doc(bundle: Path) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((bundle / "router.yaml").read_text())
    return doc


@pytest.mark.parametrize("name", ["default", "minilm"])
def test_bundle_records_its_provenance(
    bundles: dict[str, Path], routing_root: Path, name: str
) -> None:
    bundle = load_bundle(str(bundles[name]))
    assert bundle.name == name
    doc = _doc(bundles[name])
    hashes = doc["training"]["data"]
    assert hashes == {p.name: sha256_file(p) for p in sorted(routing_root.iterdir())}
    assert doc["training"]["command"].endswith("--dim 8")
    assert set(doc["evaluation"]["leave_one_source_out_apgr"]) == set(doc["evaluation"]["dev_apgr"])


@pytest.fixture(scope="module")
def oracle_apgr(routing_root: Path) -> dict[str, float]:
    """Per pair, the dev APGR of ranking by the hidden truth (a hard word in the prompt)."""
    examples = [e for e in data.load_all(routing_root) if e.split == "dev"]
    out = {}
    for source, pairs in data.EVAL_PAIRS.items():
        for pair in pairs:
            rows = [e for e in examples if e.source == source]
            hard = np.array([any(w in e.text for w in HARD) for e in rows], dtype=np.float64)
            o = np.array([e.outcomes[pair] for e in rows])
            out[f"{source}: {pair[0]} -> {pair[1]}"] = metrics.evaluate(hard, o[:, 0], o[:, 1]).apgr
    return out


@pytest.mark.parametrize("name", ["default", "minilm"])
def test_router_learns_the_words_not_the_length(
    bundles: dict[str, Path], oracle_apgr: dict[str, float], name: str
) -> None:
    """Hard and easy prompts have the same lengths; only the words tell them apart."""
    pairs = _doc(bundles[name])["evaluation"]["dev_apgr"]
    assert set(pairs) == set(oracle_apgr)
    for key, row in pairs.items():
        assert row["router"] > 0.5 + 0.7 * (oracle_apgr[key] - 0.5), key
        assert row["router"] > row["length"] + 0.1, key


@pytest.mark.parametrize("name", ["default", "minilm"])
def test_runtime_scores_the_dev_split_as_training_did(
    bundles: dict[str, Path], routing_root: Path, name: str
) -> None:
    """The gateway's tokeniser + graph reproduce the trainer's figures (folded
    standardisation, truncation and the token table included)."""
    recorded = _doc(bundles[name])["evaluation"]["dev_apgr"]
    report = evaluate_bundle(str(bundles[name]), data_root=routing_root)
    assert set(report["pairs"]) == set(recorded)
    for key, row in report["pairs"].items():
        assert row["router"]["apgr"] == pytest.approx(recorded[key]["router"], abs=2e-3), key
        assert row["length"]["apgr"] == pytest.approx(recorded[key]["length"], abs=2e-3), key


def test_eval_writes_a_plot(bundles: dict[str, Path], routing_root: Path, tmp_path: Path) -> None:
    png = tmp_path / "curves.png"
    stdout = io.StringIO()
    args = ["eval", "--bundle", str(bundles["default"]), "--data", str(routing_root)]
    assert router_cli([*args, "--plot", str(png), "--json"], stdout=stdout) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000
    assert len(orjson.loads(stdout.getvalue())["pairs"]) == 6


def test_score_with_a_trained_bundle(bundles: dict[str, Path]) -> None:
    lines = [
        {"id": "hard", "prompt": "Question 1: explain the eigenvalue integral tensor manifold?"},
        {"id": "easy", "prompt": "Question 2: explain the coffee garden river summer?"},
    ]
    stdin = io.StringIO("".join(orjson.dumps(x).decode() + "\n" for x in lines))
    stdout = io.StringIO()
    assert router_cli(["score", "--bundle", str(bundles["default"])], stdin, stdout) == 0
    out = {o["id"]: o for o in map(orjson.loads, stdout.getvalue().splitlines())}
    assert out["hard"]["difficulty"] > out["easy"]["difficulty"]
    assert out["hard"]["category"] == "math"
    assert out["easy"]["category"] == "knowledge"


def test_leave_one_family_out_report(
    routing_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SWITCHYARD_DATA", str(routing_root))
    assert train.main(["--families", "--dim", "8"]) == 0
    report = yaml.safe_load(capsys.readouterr().out)
    families = {e.family for e in data.load_all(routing_root)}
    present = {g for g, members in train.FAMILY_GROUPS.items() if members & families}
    assert set(report) == {"default", "minilm"}
    for rows in report.values():
        assert set(rows) == present
        for group, row in rows.items():
            held = [
                e for e in data.load_all(routing_root) if e.family in train.FAMILY_GROUPS[group]
            ]
            assert row["n"] == len(held)
            assert row["pairs"] >= 1
            assert 0.0 <= row["router"] <= 2.0 and 0.0 <= row["length"] <= 2.0
