"""Personal-data detection cost against the router's, on the same 2,000-token prompts; not a
test, pytest does not collect it.

For each prompt, sent as one user message: p50/p99 of ``screen`` (what the processor runs per
request under the default ``route`` action: every message's text, one scan), p50 of
``Scanner.redact`` (the ``redact`` action), and p50/p99 of the ``builtin:default`` router
scoring the same text (it reads the first 512 tokens), one thread.

    python tests/bench/bench_pii.py [--runs 2000]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

import orjson
from bench_router import prompt_of

from switchyard.extproc.pii import Scanner
from switchyard.extproc.request import Endpoint, parse_request, screen
from switchyard.extproc.router.bundle import load_bundle
from switchyard.extproc.router.runtime import OnnxRouter

TOKENS = 2000
PII = {
    "email": "Please reply to maria.lopez@example.com before Friday.",
    "iban": "Wire it to DE89 3704 0044 0532 0130 00 today.",
    "phone": "Call me back on +44 20 7946 0958 after six.",
}


def log_prompt(router: OnnxRouter, seed: int) -> str:
    """Application logs: timestamps, IPs, versions, durations, ids (numbers everywhere)."""
    rng = random.Random(seed)
    lines: list[str] = []
    while len(router.tokenizer.raw_ids("\n".join(lines))) < TOKENS:
        lines.append(
            f"2026-11-{rng.randint(1, 30):02d}T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"
            f":{rng.randint(0, 59):02d}.{rng.randint(0, 999):03d}Z INFO 10.{rng.randint(0, 255)}"
            f".{rng.randint(0, 255)}.{rng.randint(0, 255)} GET /api/v2/orders/"
            f"{rng.randint(1, 10**6)}"
            f" 200 {rng.random():.3f}s build 4.{rng.randint(0, 20)}.{rng.randint(0, 99)} "
            f"req={rng.getrandbits(64):016x}"
        )
    return "\n".join(lines)


def timed(call: Callable[[], object], runs: int) -> tuple[float, float]:
    """p50 and p99 in ms."""
    call()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    values = np.asarray(samples) * 1e3
    return float(np.percentile(values, 50)), float(np.percentile(values, 99))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=2000)
    args = parser.parse_args()
    router = OnnxRouter(load_bundle("builtin:default"), intra_op_threads=1, inter_op_threads=1)
    scanner = Scanner()
    prose = prompt_of(TOKENS, router, 7)
    prompts = {
        "prose, no PII": prose,
        "logs, no PII": log_prompt(router, 7),
        **{f"prose + {name} at the end": f"{prose} {text}" for name, text in PII.items()},
    }
    print(f"{TOKENS}-token prompts, {args.runs} runs each, one thread; ms")
    print(f"{'prompt':28} {'chars':>6} {'found':>8} {'detect p50':>11} {'p99':>7}"
          f" {'redact p50':>11} {'router p50':>11} {'p99':>7}")  # fmt: skip
    for name, text in prompts.items():
        body = {"model": "auto", "messages": [{"role": "user", "content": text}]}
        request = parse_request(Endpoint.CHAT, orjson.dumps(body))
        screen(request, scanner, redact=False)
        found = request.personal_data or "-"
        detect = timed(lambda r=request: screen(r, scanner, redact=False), args.runs)
        redact = timed(lambda t=text: scanner.redact(t), args.runs)
        score = timed(lambda t=text: router.score_batch([t]), max(200, args.runs // 4))
        print(
            f"{name:28} {len(text):6d} {found:>8} {detect[0]:11.3f} {detect[1]:7.3f}"
            f" {redact[0]:11.3f} {score[0]:11.3f} {score[1]:7.3f}"
        )
    router.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
