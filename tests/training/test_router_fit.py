"""``switchyard router fit`` / ``score`` on small synthetic outcome files in the real format."""

from __future__ import annotations

import io
import random
import re
from pathlib import Path

import numpy as np
import orjson
import pytest
import scipy.sparse as sp
import yaml
from routing_data import EASY, HARD

from switchyard.extproc.router import cli
from switchyard.extproc.router.bundle import load_bundle
from switchyard.extproc.router.runtime import OnnxRouter, load_scorer
from switchyard.extproc.semantic import load_embedder
from switchyard.training import fit, outcomes


def _write(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return path


# --- outcome records ---------------------------------------------------------------------------
def test_outcome_records_parse_prompts_and_messages(tmp_path: Path) -> None:
    f = _write(
        tmp_path / "o.jsonl",
        [
            {"id": 1, "prompt": "what is 2+2", "model": "a", "score": 1},
            {"id": 1, "prompt": "what is 2+2", "model": "b", "score": 0.25, "cost_usd": 0.01},
            {"id": 1, "prompt": "what is 2+2", "model": "b", "score": 0.75, "ts": "2026-11-30"},
            {
                "id": "c",
                "messages": [
                    {"role": "user", "content": "first"},
                    {"role": "assistant", "content": "ok"},
                    {"role": "user", "content": [{"type": "text", "text": "last"}]},
                ],
                "model": "a",
                "score": 0.0,
                "latency_ms": 12,
            },
        ],
    )
    outs = outcomes.load([f])
    assert outs.texts == ["what is 2+2", "last"]  # the last user message, as the gateway scores
    assert outs.models == ["a", "b"]
    assert outs.n_records == 4
    np.testing.assert_array_equal(outs.scores[0], [1.0, 0.5])  # repeated (prompt, model): mean
    assert outs.scores[1, 0] == 0.0 and np.isnan(outs.scores[1, 1])
    assert outs.n_outcomes == 3
    assert len(outs.files[str(f)]) == 64
    assert outcomes.load([f], ["b"]).models == ["b"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"{not json", "o.jsonl:2: not valid JSON"),
        (b'{"prompt": "p", "model": "a", "score": 1}', "o.jsonl:2: missing field 'id'"),
        (b'{"id": 1, "model": "a", "score": 1}', "o.jsonl:2: needs a 'prompt' or a 'messages'"),
        (b'{"id": 1, "prompt": "p", "score": 1}', "o.jsonl:2: missing field 'model'"),
        (b'{"id": 1, "prompt": "p", "model": "", "score": 1}', "field 'model' must be"),
        (b'{"id": 1, "prompt": "p", "model": "a"}', "o.jsonl:2: missing field 'score'"),
        (b'{"id": 1, "prompt": "p", "model": "a", "score": 1.5}', "field 'score' must be a number"),
        (b'{"id": 1, "prompt": "p", "model": "a", "score": true}', "field 'score'"),
        (b'{"id": 1, "prompt": 3, "model": "a", "score": 1}', "field 'prompt' must be a string"),
        (
            b'{"id": 1, "messages": [{"role": "system", "content": "x"}], "model": "a", '
            b'"score": 1}',
            "field 'messages' has no 'user' message",
        ),
        (
            b'{"id": 1, "messages": [{"content": "x"}], "model": "a", "score": 1}',
            "field 'messages[0].role' must be a string",
        ),
        (
            b'{"id": 1, "prompt": "p", "model": "a", "score": 1, "cost_usd": -1}',
            "field 'cost_usd' must be a non-negative number",
        ),
    ],
)
def test_bad_outcome_records_name_the_line_and_field(
    tmp_path: Path, line: bytes, message: str
) -> None:
    f = tmp_path / "o.jsonl"
    f.write_bytes(b'{"id": 0, "prompt": "ok", "model": "a", "score": 0}\n' + line + b"\n")
    with pytest.raises(outcomes.OutcomeError, match=re.escape(message)):
        outcomes.load([f])


def test_unknown_models_and_missing_files_are_named(tmp_path: Path) -> None:
    f = _write(tmp_path / "o.jsonl", [{"id": 0, "prompt": "p", "model": "a", "score": 1}])
    with pytest.raises(outcomes.OutcomeError, match=r"no outcomes for model\(s\) zz"):
        outcomes.load([f], ["a", "zz"])
    with pytest.raises(outcomes.OutcomeError, match=r"not found: .*nope\.jsonl"):
        outcomes.load([tmp_path / "nope.jsonl"])


# --- a workload whose right model depends on the topic, not the length -----------------------
def _topic_workload(n: int, seed: int = 0) -> list[dict[str, object]]:
    """Two models. On prompts made of ``HARD`` (math-looking) words the cheap ``specialist``
    beats the ``generalist``; on ``EASY`` words it is the other way round. Both word lists have
    the same word lengths, so the length router learns nothing, and the default bundle (which
    calls math words hard) ranks them the wrong way round."""
    rng = random.Random(seed)
    rows: list[dict[str, object]] = []
    for i in range(n):
        math = rng.random() < 0.5
        words = rng.choices(HARD if math else EASY, k=rng.randint(5, 30))
        prompt = f"Q{i}: tell me about the " + " ".join(words)
        p_spec, p_gen = (0.8, 0.4) if math else (0.1, 0.95)
        for model, p in (("specialist", p_spec), ("generalist", p_gen)):
            score = float(rng.random() < p)
            rows.append({"id": i, "prompt": prompt, "model": model, "score": score})
    return rows


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fit")
    f = _write(root / "outcomes.jsonl", _topic_workload(500))
    out = root / "bundle"
    stdout = io.StringIO()
    rc = cli.main(["fit", "--outcomes", str(f), "--out", str(out)], stdout=stdout)
    assert rc == 0, stdout.getvalue()
    assert "bundle written" in stdout.getvalue()
    return f, out


def test_fit_learns_the_topic_and_beats_length_and_default(fitted: tuple[Path, Path]) -> None:
    _, out = fitted
    doc = yaml.safe_load((out / "router.yaml").read_text())
    held = doc["evaluation"]["held_out"]
    assert held["prompts"] >= 50
    mean = held["mean"]
    assert mean["fitted"]["apgr"] > 0.8
    assert mean["fitted"]["apgr"] > mean["length"]["apgr"] + 0.2
    assert mean["fitted"]["apgr"] > mean["default"]["apgr"] + 0.2
    assert mean["fitted"]["calls_at_95"] < mean["length"]["calls_at_95"]
    assert doc["evaluation"]["cross_validated"]["beats_length"] is True
    # provenance: outcome file hashes, counts, the CV choice
    assert doc["labels"]["models"] == ["generalist", "specialist"]
    assert doc["training"]["outcomes"]["outcomes"] == 1000
    assert doc["training"]["outcomes"]["prompts"] == 500
    assert len(next(iter(doc["training"]["outcomes"]["files"].values()))) == 64
    assert doc["fit"]["cv"]["alpha"] in fit.ALPHAS and doc["fit"]["cv"]["beta"] in fit.BETAS
    # the topic is in the words, not in the default's difficulty: the blend trusts the ridge
    blend = doc["fit"]["blend"]
    assert blend["specialist"]["ridge"] > 0.5 and blend["generalist"]["ridge"] > 0.5
    assert doc["evaluation"]["cross_validated"]["verdict"].startswith("enough outcomes")


def _design(n: int, seed: int) -> fit.Design:
    rng = np.random.default_rng(seed)
    dense = rng.standard_normal((n, 143))
    bag = sp.csr_matrix((n, 0))
    return fit.Design(dense, bag, np.zeros(143), np.ones(143), np.zeros(0, np.int64), np.zeros(0))


def test_blend_falls_back_to_the_prior_when_the_fitted_part_is_noise() -> None:
    """Outcomes that follow the base bundle's difficulty: an out-of-fold ridge prediction that
    is noise gets (almost) no weight, and the difficulty logit carries the ranking."""
    n = 2000
    d = _design(n, 0)
    rng = np.random.default_rng(1)
    prior = d.dense[:, fit.PRIOR]
    p_strong = 1 / (1 + np.exp(-(0.5 + 1.5 * prior)))
    scores = np.column_stack(
        [(rng.random(n) < 0.4).astype(float), (rng.random(n) < p_strong).astype(float)]
    )
    noise = rng.random((n, 2))
    coef = fit.fit_stack(d, np.arange(n), scores, noise)
    assert abs(coef[3, 1]) < 0.1 and abs(coef[3, 0]) < 0.1
    assert coef[1, 1] > 0.15 and abs(coef[1, 0]) < 0.06
    # and when the ridge predicts the outcomes, it gets weight near one
    signal = np.clip(np.column_stack([np.full(n, 0.4), p_strong]), 0, 1)
    coef = fit.fit_stack(d, np.arange(n), scores, signal + 0.01 * noise)
    assert coef[3, 1] > 0.6
    # the blended head is one linear head: applying it equals the blend of its parts
    ridge = fit.Head(rng.standard_normal((144, 2)) * 0.01, np.zeros((0, 2)))
    raw = ridge.wd[0] + d.dense @ ridge.wd[1:]
    got = fit.apply_stack(ridge, coef)
    want = coef[0] + np.outer(prior, coef[1]) + np.outer(d.dense[:, fit.LENGTH], coef[2])
    np.testing.assert_allclose(got.wd[0] + d.dense @ got.wd[1:], want + raw * coef[3])


def test_bundle_scores_through_the_gateway_loader_as_the_fitting_code_does(
    fitted: tuple[Path, Path],
) -> None:
    f, out = fitted
    outs = outcomes.load([f])
    featurizer = fit.Featurizer()
    res = fit.fit(outs, featurizer)
    bundle = load_bundle(str(out))
    assert bundle.models == ("generalist", "specialist")
    texts = [*outs.texts[:40], "", "x " * 3000]  # empty and over-long (truncated) prompts too
    dense, counts = featurizer(texts)
    d = res.design
    z = (dense - d.mean) / d.scale
    bag = counts[:, d.vocab].multiply(1.0 / np.maximum(counts.sum(axis=1), 1.0)) @ np.diag(d.weight)
    want = np.clip(res.head.wd[0] + z @ res.head.wd[1:] + bag @ res.head.wb, 0, 1)
    router = OnnxRouter(bundle)
    got = router.score_batch(texts)
    got_one = [router.score_batch([t])[0] for t in texts[:5]]  # batch of one: no padding
    router.close()
    pred = np.array([[s.predicted[m] for m in outs.models] for s in got])  # type: ignore[index]
    np.testing.assert_allclose(pred, want, atol=2e-5)
    for a, b in zip(got_one, got[:5], strict=True):
        assert a.predicted == pytest.approx(b.predicted, abs=1e-6)
    # the base bundle's difficulty and categories are unchanged
    base = OnnxRouter(load_bundle("builtin:default")).score_batch(texts[:5])
    for a, b in zip(got[:5], base, strict=True):
        assert a.difficulty == pytest.approx(b.difficulty, abs=1e-6)
        assert a.categories == pytest.approx(b.categories, abs=1e-6)
    # what the gateway loads (state.py -> load_scorer): inline static scorer with predictions
    scorer = load_scorer(str(out))
    assert getattr(scorer, "inline", False) is True


def test_router_score_prints_predicted_per_model(fitted: tuple[Path, Path]) -> None:
    _, out = fitted
    stdin = io.StringIO(
        '{"id": "a", "prompt": "tell me about the eigenvalue integral theorem"}\n'
        '{"id": 7, "messages": [{"role": "user", "content": "tell me about the kitchen river"}]}\n'
    )
    stdout = io.StringIO()
    assert cli.main(["score", "--bundle", str(out)], stdin=stdin, stdout=stdout) == 0
    lines = [orjson.loads(x) for x in stdout.getvalue().splitlines()]
    assert [x["id"] for x in lines] == ["a", 7]
    assert set(lines[0]) == {"id", "predicted", "difficulty"}
    math, easy = lines[0]["predicted"], lines[1]["predicted"]
    assert math["specialist"] > math["generalist"]
    assert easy["generalist"] > easy["specialist"]


def test_fit_says_plainly_when_outcomes_are_too_few(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(3)
    noise = [  # 40 prompts, outcomes unrelated to the text
        {
            "id": i,
            "prompt": f"question {i} " + "word " * rng.randint(1, 40),
            "model": m,
            "score": float(rng.random() < p),
        }
        for i in range(40)
        for m, p in (("small", 0.3), ("large", 0.7))
    ]
    f = _write(tmp_path / "few.jsonl", noise)
    out = tmp_path / "bundle"
    rc = cli.main(["fit", "--outcomes", str(f), "--out", str(out)], stdout=io.StringIO())
    err = capsys.readouterr().err
    assert rc == 1
    assert "too few outcomes to beat the length router" in err
    assert "nothing written" in err
    assert not out.exists()
    # --force writes it anyway, with the verdict in the bundle
    rc = cli.main(["fit", "--outcomes", str(f), "--out", str(out), "--force"], stdout=io.StringIO())
    assert rc == 0
    doc = yaml.safe_load((out / "router.yaml").read_text())
    assert doc["evaluation"]["cross_validated"]["beats_length"] is False
    verdict = doc["evaluation"]["cross_validated"]["verdict"]
    assert verdict.startswith("too few outcomes to beat the length router")

    tiny = _write(tmp_path / "tiny.jsonl", noise[:10])
    rc = cli.main(["fit", "--outcomes", str(tiny), "--out", str(out)], stdout=io.StringIO())
    assert rc == 1
    assert "at least 20 are needed" in capsys.readouterr().err


def test_a_fitted_bundle_gives_its_bases_semantic_embeddings(fitted: tuple[Path, Path]) -> None:
    """Semantic rule conditions work with a fitted bundle: its graph gathers the base's token
    table first (the fit head's own table comes after), and the embeddings are the base's."""
    _, bundle = fitted
    mine, base = load_embedder(str(bundle)), load_embedder("builtin:default")
    assert mine is not base
    np.testing.assert_array_equal(mine.vectors, base.vectors)
