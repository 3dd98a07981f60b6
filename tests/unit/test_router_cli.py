"""`switchyard router score|eval` on the committed default bundle."""

from __future__ import annotations

import io

import orjson
import pytest

from switchyard.extproc.router.cli import main
from switchyard.extproc.scoring import CATEGORIES


def test_score_round_trip() -> None:
    lines = [
        {"id": 1, "prompt": "What is 7 * 8?"},
        {"id": "two", "prompt": "Write a SQL query that returns the top 5 customers by revenue."},
    ]
    stdin = io.StringIO("".join(orjson.dumps(x).decode() + "\n" for x in lines) + "\n")
    stdout = io.StringIO()
    assert main(["score"], stdin=stdin, stdout=stdout) == 0
    out = [orjson.loads(line) for line in stdout.getvalue().splitlines()]
    assert [o["id"] for o in out] == [1, "two"]
    for o in out:
        assert 0.0 <= o["difficulty"] <= 1.0
        assert set(o["categories"]) == set(CATEGORIES)
        assert o["category"] in CATEGORIES
    assert out[1]["category"] == "code"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("not json", "line 2: not valid JSON"),
        ('{"id": 3}', "line 2: needs a 'prompt' or a 'messages' field"),
        ('{"prompt": "p"}', "line 2: missing field 'id'"),
        ('{"id": 3, "prompt": 5}', "line 2: field 'prompt' must be a string"),
        ('{"id": 3, "messages": []}', "line 2: field 'messages' must be a non-empty array"),
    ],
)
def test_bad_input_line_is_named(
    bad: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    stdin = io.StringIO('{"id": 1, "prompt": "ok"}\n' + bad + "\n")
    stdout = io.StringIO()
    assert main(["score"], stdin=stdin, stdout=stdout) != 0
    assert message in capsys.readouterr().err
    assert stdout.getvalue() == ""


def test_unknown_bundle_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["score", "--bundle", "builtin:missing"], stdin=io.StringIO(""), stdout=io.StringIO())
    assert rc == 1
    assert "builtin:missing" in capsys.readouterr().err


def test_eval_on_a_small_subset() -> None:
    stdout = io.StringIO()
    assert main(["eval", "--limit", "150", "--json"], stdin=io.StringIO(), stdout=stdout) == 0
    report = orjson.loads(stdout.getvalue())
    assert report["n_prompts"] == 600
    assert len(report["pairs"]) >= 4
    for entry in report["pairs"].values():
        assert entry["random"]["apgr"] == pytest.approx(0.5, abs=1e-6)
        assert 0.0 <= entry["router"]["strong_calls_at_95"] <= 1.0
        assert -1.0 <= entry["router"]["apgr"] <= 3.0
