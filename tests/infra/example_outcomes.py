"""Write ``examples/outcomes.jsonl``: real outcomes of three LLMRouter models, named after the
example policy's models, on held-out (dev split) prompts of ``../shared/data/routing``.

    python tests/infra/example_outcomes.py [--data DIR] [--n 300] [--out examples/outcomes.jsonl]

light = mistral-7b-instruct-v0.3, standard = llama-3.1-8b-instruct, capable =
llama-3.1-nemotron-51b-instruct (mean scores 0.39 / 0.56 / 0.62 on the whole file): a real
quality ladder for `switchyard router calibrate` and `switchyard simulate` examples. Prompts
over 1,000 characters are skipped to keep the file small.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from switchyard.training import data

MODELS = {
    "light": "mistral-7b-instruct-v0.3",
    "standard": "llama-3.1-8b-instruct",
    "capable": "llama-3.1-nemotron-51b-instruct",
}
MAX_CHARS = 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=data.data_dir())
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("examples/outcomes.jsonl"))
    args = parser.parse_args()
    rows = json.loads((args.data / "llmrouter_scores_train.json").read_text(encoding="utf-8"))
    picked = [
        r
        for r in rows
        if data.split_of(r["question"]) == "dev"
        and len(r["question"]) <= MAX_CHARS
        and all(m in r["scores"] for m in MODELS.values())
    ]
    picked.sort(key=lambda r: hashlib.sha1(r["question"].encode()).hexdigest())
    seen: set[str] = set()
    lines = []
    for r in picked:
        if r["question"] in seen:
            continue
        seen.add(r["question"])
        rid = "lr-" + hashlib.sha1(r["question"].encode()).hexdigest()[:10]
        for name, source in MODELS.items():
            score = round(float(r["scores"][source]), 4)
            lines.append(
                json.dumps({"id": rid, "prompt": r["question"], "model": name, "score": score})
            )
        if len(seen) == args.n:
            break
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{len(seen)} prompts, {len(lines)} outcomes -> {args.out}")


if __name__ == "__main__":
    main()
