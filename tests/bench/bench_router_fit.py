"""``router fit`` benchmark (a section of ``make bench-router``; not collected by pytest).

* Quality: every shared dev pair (``data.EVAL_PAIRS``) is a workload. Its dev prompts are split
  in random halves; each router is fitted on one half's outcomes and scored on the other (both
  ways, ``--seeds`` splits). Routers: the fitted bundle's head (``router fit``), a TF-IDF
  (word 1-2 grams, sublinear tf) + ridge regression on the quality gap with its penalty chosen by
  generalised CV on the same half (``RidgeCV``), the length router and the default bundle's
  difficulty. Figures: APGR and the strong-call share for 95 % of the strong model's quality.
* Learning curve on the dev split's own outcomes: each pair's dev prompts in 5 folds, every fold
  scored by routers fitted on 100 / 300 / 1,000 / 3,000 outcomes (half as many prompts, two
  models each) drawn from the other folds (3,000 only where the other folds hold 1,500 prompts).
* Fit time vs outcomes and models (timing only: real prompts, random outcomes), and scoring
  latency of fitted bundles for 2 / 4 / 8 models (batch 1, one thread, 512 tokens).
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import RidgeCV

from switchyard.extproc.router import metrics
from switchyard.extproc.router.bundle import load_bundle
from switchyard.extproc.router.runtime import OnnxRouter
from switchyard.training import data, fit, outcomes

ROUTERS = ("fitted", "tfidf_ridge", "length", "default")
CURVE = (100, 300, 1000, 3000)


def _workloads(examples: list[data.Example], split: str) -> dict[str, tuple[list[str], Any]]:
    out = {}
    for source, pairs in data.EVAL_PAIRS.items():
        for weak, strong in pairs:
            seen: dict[str, tuple[float, float]] = {}
            for e in examples:
                if e.source == source and e.split == split and (weak, strong) in e.outcomes:
                    seen.setdefault(e.text, e.outcomes[(weak, strong)])
            texts = list(seen)
            out[f"{source}: {weak} -> {strong}"] = (texts, np.array([seen[t] for t in texts]))
    return out


def _outs(texts: list[str], o: np.ndarray) -> outcomes.Outcomes:
    return outcomes.Outcomes(
        list(texts), list(range(len(texts))), ["weak", "strong"], o, 2 * len(texts)
    )


def _tfidf_ridge(fit_texts: list[str], gap: np.ndarray, test_texts: list[str]) -> np.ndarray:
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    x = vec.fit_transform(fit_texts)
    model = RidgeCV(alphas=np.logspace(-2, 3, 11)).fit(x, gap)
    return np.asarray(model.predict(vec.transform(test_texts)))


def _scores(
    feat: fit.Featurizer, fit_texts: list[str], fit_o: np.ndarray, test_texts: list[str]
) -> dict[str, np.ndarray]:
    res = fit.fit(_outs(fit_texts, fit_o), feat)
    pred = fit.predict_texts(res, feat, test_texts)
    dense, _ = feat(test_texts)
    return {
        "fitted": pred[:, 1] - pred[:, 0],
        "tfidf_ridge": _tfidf_ridge(fit_texts, fit_o[:, 1] - fit_o[:, 0], test_texts),
        "length": np.array([len(t) for t in test_texts], dtype=np.float64),
        "default": dense[:, -8],
    }


def _evaluate(scores: dict[str, np.ndarray], o: np.ndarray) -> dict[str, tuple[float, float]]:
    out = {}
    for name, s in scores.items():
        r = metrics.evaluate(s, o[:, 0], o[:, 1])
        out[name] = (r.apgr, r.calls_at_95)
    return out


def _table(rows: dict[str, dict[str, list[tuple[float, float]]]]) -> None:
    print(f"{'workload':70} " + " ".join(f"{r:>17}" for r in ROUTERS))
    means: dict[str, list[tuple[float, float]]] = {r: [] for r in ROUTERS}
    for key, per in rows.items():
        cells = []
        for r in ROUTERS:
            a = float(np.mean([v[0] for v in per[r]]))
            c = float(np.mean([v[1] for v in per[r]]))
            means[r].append((a, c))
            cells.append(f"{a:8.3f} / {c:5.2f}")
        print(f"{key[:70]:70} " + " ".join(f"{x:>17}" for x in cells))
    print(
        f"{'mean (APGR / strong calls @95)':70} "
        + " ".join(
            f"{np.mean([v[0] for v in means[r]]):8.3f} / {np.mean([v[1] for v in means[r]]):5.2f}"
            for r in ROUTERS
        )
    )


def quality(examples: list[data.Example], feat: fit.Featurizer, seeds: int) -> None:
    print(
        "\nquality: fit on one half of each dev pair's outcomes, score the other half "
        f"(both ways, {seeds} random splits); APGR / strong-call share for 95 % quality"
    )
    rows: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for key, (texts, o) in _workloads(examples, "dev").items():
        per: dict[str, list[tuple[float, float]]] = {r: [] for r in ROUTERS}
        for seed in range(seeds):
            perm = np.random.default_rng(seed).permutation(len(texts))
            halves = perm[: len(perm) // 2], perm[len(perm) // 2 :]
            for a, b in (halves, halves[::-1]):
                s = _scores(feat, [texts[i] for i in a], o[a], [texts[i] for i in b])
                for name, v in _evaluate(s, o[b]).items():
                    per[name].append(v)
        rows[f"{key} (n={len(texts)})"] = per
    _table(rows)


def learning_curve(examples: list[data.Example], feat: fit.Featurizer, folds: int = 5) -> None:
    print(
        "\nlearning curve on the dev split's own outcomes: each pair's dev prompts in "
        f"{folds} folds; every fold scored by routers fitted on N outcomes (N/2 prompts x 2 "
        "models) drawn from the other folds; mean over the pairs with enough prompts "
        "(APGR / calls@95)"
    )
    dev = _workloads(examples, "dev")
    print(
        f"{'outcomes':>9} {'pairs':>5} "
        + " ".join(f"{r:>17}" for r in ROUTERS)
        + "   fitted beats (pairs): length, default, tfidf"
    )
    for n in CURVE:
        per_pair: dict[str, dict[str, list[tuple[float, float]]]] = {}
        for key, (texts, o) in dev.items():
            fold_of = np.random.default_rng(7).permutation(len(texts)) % folds
            if (len(texts) - np.sum(fold_of == 0)) < n // 2:
                continue
            per: dict[str, list[tuple[float, float]]] = {r: [] for r in ROUTERS}
            for k in range(folds):
                pool = np.flatnonzero(fold_of != k)
                test = np.flatnonzero(fold_of == k)
                pick = np.random.default_rng(100 + k).permutation(pool)[: n // 2]
                s = _scores(feat, [texts[i] for i in pick], o[pick], [texts[i] for i in test])
                for name, v in _evaluate(s, o[test]).items():
                    per[name].append(v)
            per_pair[key] = per
        mean = {
            r: (
                np.mean([np.mean([v[0] for v in p[r]]) for p in per_pair.values()]),
                np.mean([np.mean([v[1] for v in p[r]]) for p in per_pair.values()]),
            )
            for r in ROUTERS
        }
        wins = [
            sum(
                np.mean([v[0] for v in p["fitted"]]) > np.mean([v[0] for v in p[other]])
                for p in per_pair.values()
            )
            for other in ("length", "default", "tfidf_ridge")
        ]
        print(
            f"{n:9d} {len(per_pair):5d} "
            + " ".join(f"{mean[r][0]:8.3f} / {mean[r][1]:5.2f}" for r in ROUTERS)
            + f"   {wins[0]}, {wins[1]}, {wins[2]}",
            flush=True,
        )


def fit_time(
    examples: list[data.Example], feat: fit.Featurizer, sizes: list[tuple[int, int]]
) -> None:
    print("\nfit time (real prompts, random outcomes: timing only; features, CV, total seconds)")
    texts_all = [e.text for e in examples]
    for n_out, m in sizes:
        n = n_out // m
        texts = [
            texts_all[i % len(texts_all)] + ("" if i < len(texts_all) else f" (#{i})")
            for i in range(n)
        ]
        rng = np.random.default_rng(0)
        rates = np.linspace(0.3, 0.8, m)
        o = (rng.random((n, m)) < rates).astype(np.float64)
        outs = outcomes.Outcomes(texts, list(range(n)), [f"m{j}" for j in range(m)], o, n * m)
        t0 = time.perf_counter()
        res = fit.fit(outs, feat)
        print(
            f"{n_out:>9,} outcomes, {m} models ({n:,} prompts): features "
            f"{res.seconds['features']:.1f} s, CV {res.seconds['cv']:.1f} s, total "
            f"{time.perf_counter() - t0:.1f} s"
        )


def latency(examples: list[data.Example], feat: fit.Featurizer, runs: int) -> None:
    from bench_router import pct, prompt_of

    print("\nscoring latency of fitted bundles (batch 1, one thread, 512-token prompts, ms)")
    texts = [e.text for e in examples[:600]]
    rng = np.random.default_rng(0)
    for m in (2, 4, 8):
        o = (rng.random((len(texts), m)) < np.linspace(0.3, 0.8, m)).astype(np.float64)
        outs = outcomes.Outcomes(
            texts, list(range(len(texts))), [f"m{j}" for j in range(m)], o, o.size
        )
        res = fit.fit(outs, feat, betas=(10.0,), alphas=(10.0,))  # a token bag, as worst case
        with tempfile.TemporaryDirectory() as tmp:
            fit.write_bundle(Path(tmp), res, outs, feat, f"bench{m}", "bench")
            router = OnnxRouter(load_bundle(tmp), intra_op_threads=1, inter_op_threads=1)
            prompts = [prompt_of(512, router, s) for s in range(8)]
            for p in prompts:
                router.score_batch([p])
            e2e = []
            for i in range(runs):
                t0 = time.perf_counter()
                router.score_batch([prompts[i % 8]])
                e2e.append(time.perf_counter() - t0)
            router.close()
        print(f"{m} models: e2e p50 {pct(e2e, 50):.3f} ms, p99 {pct(e2e, 99):.3f} ms")


def run(args: Any) -> None:
    random.seed(0)
    examples = data.load_all()
    feat = fit.Featurizer()
    sections = set(args.fit_sections.split(","))
    if "latency" in sections:
        latency(examples, feat, args.runs)
    if "time" in sections:
        fit_time(examples, feat, [(10_000, 2), (100_000, 8), (1_000_000, 8)])
    if "quality" in sections:
        quality(examples, feat, args.seeds)
    if "curve" in sections:
        learning_curve(examples, feat)
