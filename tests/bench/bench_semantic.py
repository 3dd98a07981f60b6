"""Semantic rule conditions: separation and per-request cost; not a test (pytest skips it).

Separation (``tests/unit/testdata/semantic/intents.yaml``: 6 intents x 5 examples x 8 held-out
paraphrases, 40 unrelated prompts; then ``validation.yaml``, 4 intents and 30 unrelated prompts
written after the embedding was chosen on the first): for each intent, the similarity of its
paraphrases (positives) against the unrelated prompts and the other intents' paraphrases
(negatives), scoring each prompt by its best example (``max``) or by the examples' centroid.
Reports the mean ROC AUC over intents, the share of paraphrases matched at the thresholds that
let through 1 % and 5 % of negatives, and with one threshold for every intent, the shares of
paraphrases and of negatives matched at 0.4-0.7. ``--reference`` adds the full MiniLM encoder
(``builtin:minilm``'s, 384-d, contextual) for comparison; ``raw`` is the table without the
common-direction removal.

Cost: the scorer at batch 1 on one thread, for 12-, 48- and 400-token prompts: tokenise, score
and decide for a rules policy without semantic rules, and the same with 6 semantic rules of 5
examples each, none matching (every rule checked); and the embedding alone (score with the
embedder, less the first). p50/p99 over interleaved runs, in microseconds.

    python tests/bench/bench_semantic.py [--sections separation,cost] [--runs 2000] [--reference]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import yaml

from switchyard.extproc.config import build_config
from switchyard.extproc.engine import decide
from switchyard.extproc.request import Endpoint, parse_request
from switchyard.extproc.router.bundle import load_bundle
from switchyard.extproc.router.runtime import OnnxRouter
from switchyard.extproc.semantic import Embedder, load_embedder, token_table
from switchyard.operator.compiler import compile_config
from switchyard.operator.policy import parse_policy

TESTDATA = Path(__file__).resolve().parents[1] / "unit" / "testdata" / "semantic"
DATA = TESTDATA / "intents.yaml"
VALIDATION = TESTDATA / "validation.yaml"
"""Written after the embedding was chosen on DATA: the check on data it was not chosen on."""
F32 = npt.NDArray[np.float32]


def _auc(pos: list[float], neg: list[float]) -> float:
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def separation(embed: Callable[[list[str]], F32], label: str, data: Path = DATA) -> None:
    doc = yaml.safe_load(data.read_text())
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


def _policy(intents: dict[str, dict[str, list[str]]]) -> dict[str, Any]:
    """A rules policy with one semantic rule per intent, at a threshold no prompt reaches (so
    every rule is checked)."""
    rules = [
        {"name": k, "when": {"semantic": {"examples": v["examples"], "threshold": 1}}, "route": "m"}
        for k, v in intents.items()
    ]
    return {
        "apiVersion": "switchyard.dev/v1alpha1",
        "kind": "RoutePolicy",
        "metadata": {"name": "bench"},
        "spec": {
            "match": {"models": ["auto"]},
            "models": [
                {
                    "name": "m",
                    "backend": {"url": "http://127.0.0.1:1"},
                    "upstreamModel": "m",
                    "pricing": {"inputPer1M": 1, "outputPer1M": 1},
                }
            ],
            "strategy": {"type": "rules", "default": "m", "rules": rules},
        },
    }


def cost(runs: int) -> None:
    router = OnnxRouter(load_bundle("builtin:default"))
    doc = yaml.safe_load(DATA.read_text())
    with_rules = _policy(doc["intents"])
    without = copy.deepcopy(with_rules)
    without["spec"]["strategy"]["rules"] = []
    config = build_config(compile_config([parse_policy(with_rules)], ""))
    semantic = config.policies_by_alias["auto"][0]
    plain = build_config(compile_config([parse_policy(without)], "")).policies_by_alias["auto"][0]
    embedder = semantic.embedder
    assert embedder is not None and plain.embedder is None
    base = "explain why the following sql query returns duplicate rows and how to fix it "
    words = base.split()
    print(
        "tokens  plain: score+decide p50/p99 (us)  semantic: score+embed+decide p50/p99"
        "  added p50 (embedding alone)"
    )
    for n_words in (12, 48, 400):
        text = " ".join(words[i % len(words)] for i in range(n_words))
        n_tokens = router.tokenizer.encode_array(text).shape[0]
        body = {"model": "auto", "messages": [{"role": "user", "content": text}]}
        request = parse_request(Endpoint.CHAT, orjson.dumps(body))
        times: dict[str, list[float]] = {"plain": [], "embed": [], "semantic": []}
        for _ in range(50):  # warm up
            decide(semantic, request, {}, router.score_batch([text], embedder)[0])
        for _ in range(runs):
            t0 = time.perf_counter()
            a = decide(plain, request, {}, router.score_batch([text])[0])
            t1 = time.perf_counter()
            b = decide(semantic, request, {}, router.score_batch([text], embedder)[0])
            t2 = time.perf_counter()
            router.score_batch([text], embedder)
            t3 = time.perf_counter()
            times["plain"].append((t1 - t0) * 1e6)
            times["semantic"].append((t2 - t1) * 1e6)
            times["embed"].append((t3 - t2) * 1e6)
        assert a.reason == b.reason == "default"

        def p(name: str, q: float = 50, times: dict[str, list[float]] = times) -> float:
            return float(np.percentile(times[name], q))

        print(
            f"{n_tokens:>6}  {p('plain'):7.1f} / {p('plain', 99):7.1f}"
            f"  {p('semantic'):7.1f} / {p('semantic', 99):7.1f}"
            f"  {p('semantic') - p('plain'):+6.1f} ({p('embed') - p('plain'):+.1f})"
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
        minilm = _minilm() if args.reference else None
        for data in (DATA, VALIDATION):
            print(f"-- {data.name}")
            separation(_raw(embedder).embed_texts, "static-128 raw", data)
            separation(embedder.embed_texts, "static-128", data)
            if minilm is not None:
                separation(minilm, "minilm-384", data)
    if "cost" in sections:
        cost(args.runs)


if __name__ == "__main__":
    main()
