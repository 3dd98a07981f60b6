"""Router latency benchmark (``make bench-router``); not a test, pytest does not collect it.

For each bundle: p50/p99 per prompt at batch 1 for 64-, 512- and 2048-token prompts on one CPU
thread (end to end: tokenisation + padding + onnxruntime + result objects; onnxruntime alone;
tokenisation alone, word cache warm), and
throughput at batch 32 (512-token prompts). Then the ``router fit`` sections
(``bench_router_fit.py``: quality on the shared dev pairs against length and TF-IDF + ridge,
the learning curve, fit time, scoring latency for 2/4/8 models).

    python tests/bench/bench_router.py [--bundles builtin:default,builtin:minilm] [--runs 500]
        [--fit-sections latency,time,quality,curve] [--seeds 2]
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import numpy as np

from switchyard.extproc.router.bundle import BundleError, load_bundle
from switchyard.extproc.router.runtime import OnnxRouter

WORDS = [
    "the",
    "model",
    "answer",
    "question",
    "integral",
    "python",
    "function",
    "returns",
    "list",
    "value",
    "because",
    "system",
    "design",
    "latency",
    "42",
    "3.14",
    "matrix",
    "(x",
    "+",
    "y)",
    "=",
    "z;",
    "proof",
    "theorem",
    "compute",
    "explain",
    "why",
    "which",
    "following",
    "statement",
    "true",
    "false",
    "analysis",
    "data",
    "structure",
    "algorithm",
    "complexity",
]


def prompt_of(tokens: int, router: OnnxRouter, seed: int) -> str:
    rng = random.Random(seed)
    words: list[str] = []
    while len(router.tokenizer.raw_ids(" ".join(words))) < tokens:
        words.extend(rng.choice(WORDS) for _ in range(8))
    while len(router.tokenizer.raw_ids(" ".join(words))) > tokens:
        words.pop()
    return " ".join(words)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1e3, q))


def bench(ref: str, runs: int) -> None:
    try:
        router = OnnxRouter(load_bundle(ref), intra_op_threads=1, inter_op_threads=1)
    except BundleError as exc:
        print(f"{ref}: skipped ({exc})")
        return
    max_tokens = router.bundle.truncation.max_tokens
    print(f"\n{ref} (kind {router.bundle.kind}, max_tokens {max_tokens}, 1 thread)")
    print(
        f"{'tokens':>7} {'e2e p50 ms':>11} {'e2e p99 ms':>11} {'onnx p50 ms':>12} {'onnx p99':>9}"
        f" {'tokenise p50':>13}"
    )
    n = runs if router.bundle.kind == "static" else max(20, runs // 20)
    for tokens in (64, 512, 2048):
        texts = [prompt_of(tokens, router, s) for s in range(8)]
        for t in texts:
            router.score_batch([t])  # warm the word cache and the session
        e2e: list[float] = []
        for i in range(n):
            t = texts[i % len(texts)]
            t0 = time.perf_counter()
            router.score_batch([t])
            e2e.append(time.perf_counter() - t0)
        tok: list[float] = []
        for i in range(n):
            t = texts[i % len(texts)]
            t0 = time.perf_counter()
            router.tokenizer.encode_array(t)
            tok.append(time.perf_counter() - t0)
        onnx: list[float] = []
        if router.bundle.kind == "static":
            ids, mask = router._pad([texts[0]])
            feeds = {"input_ids": ids, "attention_mask": mask}
            for _ in range(n):
                t0 = time.perf_counter()
                router._session.run(None, feeds)
                onnx.append(time.perf_counter() - t0)
        onnx_txt = f"{pct(onnx, 50):12.3f} {pct(onnx, 99):9.3f}" if onnx else f"{'-':>12} {'-':>9}"
        print(
            f"{tokens:7d} {pct(e2e, 50):11.3f} {pct(e2e, 99):11.3f} {onnx_txt} {pct(tok, 50):13.3f}"
        )
    batch = [prompt_of(512, router, 100 + s) for s in range(32)]
    router.score_batch(batch)
    reps = max(3, n // 50)
    t0 = time.perf_counter()
    for _ in range(reps):
        router.score_batch(batch)
    elapsed = time.perf_counter() - t0
    print(f"batch 32 x 512 tokens: {32 * reps / elapsed:,.0f} prompts/s")
    router.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundles", default="builtin:default,builtin:minilm")
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument(
        "--fit-sections",
        default="latency,time,quality,curve",
        help="router fit sections (bench_router_fit.py); empty: none",
    )
    parser.add_argument("--seeds", type=int, default=2, help="random splits / draws per figure")
    args = parser.parse_args()
    print(f"median of {args.runs} runs; prompts are synthetic words, exact token counts")
    for ref in args.bundles.split(","):
        if ref:
            bench(ref, args.runs)
    if args.fit_sections:
        import bench_router_fit

        bench_router_fit.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
