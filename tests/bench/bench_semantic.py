"""Semantic rule conditions: separation and per-request cost; not a test (pytest skips it).

Separation (``tests/unit/testdata/semantic/intents.yaml``: 6 intents x 5 examples x 8 held-out
paraphrases, 40 unrelated prompts): for each intent, the similarity of its paraphrases
(positives) against the unrelated prompts and the other intents' paraphrases (negatives),
scoring each prompt by its best example (``max``) or by the examples' centroid. Reports the
mean ROC AUC over intents, and with one threshold for every intent: the share of paraphrases
matched and of negatives matched (false matches) at thresholds 0.5-0.8. ``--reference``
adds the full MiniLM encoder (``builtin:minilm``'s, 384-d, contextual) for comparison.

Cost: the scorer at batch 1 on one thread, for 16-, 64- and 512-token prompts: ``score`` as a
policy without a semantic rule calls it, and with the embedding (``embed=True``), plus the
rule check (6 rules x 5 examples); p50/p99 over interleaved runs.

    python tests/bench/bench_semantic.py [--sections separation,cost] [--runs 2000] [--reference]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import yaml

from switchyard.extproc.router.bundle import load_bundle
from switchyard.extproc.router.runtime import OnnxRouter
from switchyard.extproc.semantic import Embedder, SemanticCondition, load_embedder, token_table

DATA = Path(__file__).resolve().parents[1] / "unit" / "testdata" / "semantic" / "intents.yaml"
F32 = npt.NDArray[np.float32]


def _auc(pos: list[float], neg: list[float]) -> float:
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def separation(embed: Callable[[list[str]], F32], label: str) -> None:
    doc = yaml.safe_load(DATA.read_text())
    intents: dict[str, dict[str, list[str]]] = doc["intents"]
    vec = {k: (embed(v["examples"]), embed(v["paraphrases"])) for k, v in intents.items()}
    other = embed(doc["unrelated"])
    for method in ("max", "centroid"):
        aucs, pos_all, neg_all = [], [], []
        for name, (ex, par) in vec.items():
            if method == "centroid":
                c = ex.mean(axis=0)
                ex = (c / np.linalg.norm(c))[None, :]
            negatives = np.concatenate([other] + [p for k, (_, p) in vec.items() if k != name])
            pos = (par @ ex.T).max(axis=1).tolist()
            neg = (negatives @ ex.T).max(axis=1).tolist()
            aucs.append(_auc(pos, neg))
            pos_all += pos
            neg_all += neg
        pos_a, neg_a = np.array(pos_all), np.array(neg_all)
        at = []
        for fpr in (0.01, 0.05):
            t = float(np.quantile(neg_a, 1 - fpr))
            at.append(f"at {fpr:.0%} false: threshold {t:.2f} matches {np.mean(pos_a > t):.2f}")
        print(
            f"{label:>18} {method:>8}  AUC mean {statistics.mean(aucs):.3f} "
            f"(min {min(aucs):.3f}); paraphrases p10 {np.percentile(pos_a, 10):.2f} "
            f"median {np.median(pos_a):.2f}; negatives median {np.median(neg_a):.2f} "
            f"p99 {np.percentile(neg_a, 99):.2f}; " + "; ".join(at)
        )
        cells = [
            f"{t:.2f}: {np.mean(pos_a >= t):.2f}/{np.mean(neg_a >= t):.3f}"
            for t in (0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)
        ]
        print(f"{'':>28}threshold: matched/false  " + "  ".join(cells))


def _raw(embedder: Embedder) -> Embedder:
    """The same table without the common-direction removal (for comparison)."""
    table = token_table(embedder.bundle.model_path)[:, : embedder.dim]
    return Embedder(embedder.bundle, table)


def _minilm() -> Callable[[list[str]], F32]:
    router = OnnxRouter(load_bundle("builtin:minilm"))
    enc = router._encoder
    assert enc is not None

    def run(texts: list[str]) -> F32:
        rows = []
        for t in texts:
            ids = router.tokenizer.encode_array(t)[None, :]
            mask = np.ones_like(ids)
            hidden = enc.run(
                ["last_hidden_state"],
                {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)},
            )[0]
            v = hidden[0].mean(axis=0)
            rows.append(v / np.linalg.norm(v))
        return np.stack(rows).astype(np.float32)

    return run


def cost(runs: int) -> None:
    router = OnnxRouter(load_bundle("builtin:default"))
    embedder = router.embedder
    assert embedder is not None
    doc = yaml.safe_load(DATA.read_text())
    rules = [
        SemanticCondition(embedder.embed_texts(v["examples"]), 0.6) for v in doc["intents"].values()
    ]
    base = "explain why the following sql query returns duplicate rows and how to fix it "
    words = base.split()
    print("tokens  plain p50/p99 (us)  embed p50/p99  embed+6 rules p50/p99  added p50")
    for n_words in (12, 48, 400):
        text = " ".join(words[i % len(words)] for i in range(n_words))
        n_tokens = router.tokenizer.encode_array(text).shape[0]
        times: dict[str, list[float]] = {"plain": [], "embed": [], "rules": []}
        for _ in range(50):  # warm up
            router.score_batch([text])
            router.score_batch([text], embed=True)
        for _ in range(runs):
            t0 = time.perf_counter()
            router.score_batch([text])
            t1 = time.perf_counter()
            router.score_batch([text], embed=True)
            t2 = time.perf_counter()
            scores = router.score_batch([text], embed=True)[0]
            assert scores.embedding is not None
            for rule in rules:
                rule.similarity(scores.embedding)
            t3 = time.perf_counter()
            times["plain"].append((t1 - t0) * 1e6)
            times["embed"].append((t2 - t1) * 1e6)
            times["rules"].append((t3 - t2) * 1e6)

        def p(xs: list[float], q: float) -> float:
            return float(np.percentile(xs, q))

        print(
            f"{n_tokens:>6}  {p(times['plain'], 50):7.1f} / {p(times['plain'], 99):6.1f}"
            f"  {p(times['embed'], 50):7.1f} / {p(times['embed'], 99):6.1f}"
            f"  {p(times['rules'], 50):7.1f} / {p(times['rules'], 99):6.1f}"
            f"  {p(times['rules'], 50) - p(times['plain'], 50):+6.1f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sections", default="separation,cost")
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--reference", action="store_true", help="also the full MiniLM encoder")
    args = ap.parse_args()
    sections = args.sections.split(",")
    if "separation" in sections:
        embedder = load_embedder("builtin:default")
        separation(_raw(embedder).embed_texts, "static-128 raw")
        separation(embedder.embed_texts, "static-128")
        if args.reference:
            separation(_minilm(), "minilm-384")
    if "cost" in sections:
        cost(args.runs)


if __name__ == "__main__":
    main()
