"""What the refit Job's ``router fit`` adds: ``--summary`` (its termination message, whatever
the result), ``--min-outcomes`` and ``--keep`` (the rollback history it prunes to)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from routing_data import write_topic_outcomes

from switchyard.extproc.router import cli


def _workload(path: Path, n: int = 160) -> Path:
    """The right model depends on the topic (HARD vs EASY words), not the length."""
    return write_topic_outcomes(path, n, seed=1)


def _bundle_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "router.yaml").write_text("name: old\n")
    return path


def test_a_fit_reports_its_bundle_and_figures_and_prunes_to_the_kept_ones(tmp_path: Path) -> None:
    outcomes = _workload(tmp_path / "outcomes.jsonl")
    root = tmp_path / "bundles" / "default.assistant"
    kept, stale = _bundle_dir(root / "20261101T000000Z"), _bundle_dir(root / "20261001T000000Z")
    other = root / "notes"  # not a bundle: never deleted
    other.mkdir()
    out, summary = root / "20261130T000000Z", tmp_path / "summary.json"
    args = ["fit", "--outcomes", str(outcomes), "--out", str(out), "--summary", str(summary)]
    stdout = io.StringIO()
    rc = cli.main([*args, "--min-outcomes", "300", "--keep", str(kept)], stdout=stdout)
    assert rc == 0, stdout.getvalue()
    report = json.loads(summary.read_text())
    assert report["result"] == "fitted"
    assert report["bundle"] == str(out)
    assert (report["outcomes"], report["prompts"]) == (320, 160)
    assert report["models"] == ["generalist", "specialist"]
    cv = report["crossValidatedAPGR"]
    assert cv["fitted"] > cv["length"]
    assert len(summary.read_bytes()) <= 4096
    assert sorted(p.name for p in root.iterdir()) == ["20261101T000000Z", out.name, "notes"]
    assert f"deleted bundle {stale}" in stdout.getvalue()


def test_too_few_outcomes_are_reported_and_nothing_is_touched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outcomes = _workload(tmp_path / "outcomes.jsonl", n=40)
    root = tmp_path / "bundles"
    old = _bundle_dir(root / "20261001T000000Z")
    out, summary = root / "new", tmp_path / "summary.json"
    args = ["fit", "--outcomes", str(outcomes), "--out", str(out), "--summary", str(summary)]
    assert cli.main([*args, "--min-outcomes", "300"], stdout=io.StringIO()) == 1
    report = json.loads(summary.read_text())
    assert report["result"] == "too-few"
    assert "80 outcomes, fewer than the 300 asked for" in report["message"]
    assert report["outcomes"] == 80
    assert "too few" not in capsys.readouterr().out
    assert not out.exists() and old.exists()

    missing = tmp_path / "none.jsonl"
    args[2] = str(missing)
    assert cli.main(args, stdout=io.StringIO()) == 1
    report = json.loads(summary.read_text())
    assert report["result"] == "error"
    assert str(missing) in report["message"]
