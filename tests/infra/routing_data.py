"""A small routing data set in the real files' formats (``../shared/data/routing/``).

Prompts are built from two word lists with the same word lengths: a prompt with
``HARD`` words is one the weak model of every pair fails and the strong one answers (with
probability ``signal``), a prompt of ``EASY`` words one both answer. A router trained on it
must learn the words, not the length. Deterministic for a given seed.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
from pathlib import Path

from switchyard.training import data

#: (hard word, easy word of the same length): the length router learns nothing here.
WORD_PAIRS = [
    ("eigenvalue", "restaurant"),
    ("integral", "football"),
    ("derivative", "playground"),
    ("theorem", "kitchen"),
    ("lemma", "river"),
    ("manifold", "sandwich"),
    ("tensor", "garden"),
    ("topology", "kangaroo"),
    ("polynomial", "strawberry"),
    ("asymptotic", "basketball"),
    ("convergence", "grandmother"),
    ("differential", "refrigerator"),
    ("lagrangian", "television"),
    ("entropy", "weather"),
    ("quantum", "holiday"),
    ("stochastic", "volleyball"),
    ("variance", "birthday"),
    ("isomorphism", "butterflies"),
]
HARD = [h for h, _ in WORD_PAIRS]
EASY = [e for _, e in WORD_PAIRS]

#: open7b task and MMLU-Pro / LLMRouter family names per synthetic category.
MMLU_PRO_SUBJECTS = {"math": "math", "knowledge": "history"}
LLMROUTER_TASKS = {"math": "gsm8k", "knowledge": "trivia_qa"}
OPEN7B_TASKS = {"math": "gsm8k_main", "knowledge": "mmlu_world_religions"}


def _prompt(rng: random.Random, hard: bool, serial: int) -> str:
    words = rng.choices(HARD if hard else EASY, k=rng.randint(6, 14))
    return f"Question {serial}: explain the " + " ".join(words) + "?"


def _outcome(rng: random.Random, hard: bool, signal: float) -> tuple[float, float]:
    """(weak, strong): a hard prompt is a strong-only win, an easy one a win for both;
    with probability 1 - signal the other way round."""
    gap = hard if rng.random() < signal else not hard
    return (0.0, 1.0) if gap else (1.0, 1.0)


def _rows(rng: random.Random, n: int, start: int) -> list[tuple[str, bool]]:
    return [(_prompt(rng, i % 2 == 0, start + i), i % 2 == 0) for i in range(n)]


def _scores(rng: random.Random, pairs: list[data.Pair], hard: bool, signal: float) -> dict:
    out: dict[str, float] = {}
    for weak, strong in pairs:
        w, s = _outcome(rng, hard, signal)
        out.setdefault(weak, w)
        out.setdefault(strong, s)
    return out


def write_routing_data(root: Path, per_source: int = 400, signal: float = 0.9) -> Path:
    """Write the five data files (plus the LLMRouter price list) under ``root``."""
    rng = random.Random(1234)
    root.mkdir(parents=True, exist_ok=True)

    models = sorted({m for pair in data.MMLU_PRO_PAIRS for m in pair})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, ["question", "options", "answer", "category", "src", *models])
    writer.writeheader()
    for text, hard in _rows(rng, per_source, 0):
        scores = _scores(rng, data.MMLU_PRO_PAIRS, hard, signal)
        cat = MMLU_PRO_SUBJECTS["math" if hard else "knowledge"]
        row = {"question": text, "options": json.dumps(["yes", "no", "maybe"]), "answer": "A"}
        writer.writerow({**row, "category": cat, "src": "synthetic", **scores})
    (root / "mmlu_pro_train.csv.gz").write_bytes(gzip.compress(buf.getvalue().encode()))

    tasks, llm_scores = [], []
    for text, hard in _rows(rng, per_source, 10_000):
        tasks.append({"task_name": LLMROUTER_TASKS["math" if hard else "knowledge"], "query": text})
        llm_scores.append(
            {"question": text, "scores": _scores(rng, data.LLMROUTER_PAIRS, hard, signal)}
        )
    (root / "llmrouter_tasks_train.jsonl").write_text(
        "".join(json.dumps(t) + "\n" for t in tasks), encoding="utf-8"
    )
    (root / "llmrouter_scores_train.json").write_text(json.dumps(llm_scores), encoding="utf-8")
    prices = {m: {"input_price": 0.2, "output_price": 0.2} for p in data.LLMROUTER_PAIRS for m in p}
    (root / "llmrouter_models.json").write_text(json.dumps(prices), encoding="utf-8")

    lines = []
    for text, hard in _rows(rng, per_source, 20_000):
        task = OPEN7B_TASKS["math" if hard else "knowledge"]
        scores = _scores(rng, data.OPEN7B_PAIRS, hard, signal)
        lines.append(json.dumps({"task": task, "question": text, "scores": scores}) + "\n")
    (root / "open7b_scores.jsonl.gz").write_bytes(gzip.compress("".join(lines).encode()))

    buf = io.StringIO()
    writer = csv.DictWriter(buf, ["prompt", "subject", "mixtral_8x7b_correct", "gpt4_1106_correct"])
    writer.writeheader()
    for text, hard in _rows(rng, per_source, 30_000):
        weak, strong = _outcome(rng, hard, signal)
        writer.writerow(
            {
                "prompt": text + "\nAnswer:",
                "subject": "college_mathematics" if hard else "world_religions",
                "mixtral_8x7b_correct": str(weak == 1.0),
                "gpt4_1106_correct": str(strong == 1.0),
            }
        )
    (root / "routellm_mmlu_mixtral_gpt4.csv.gz").write_bytes(gzip.compress(buf.getvalue().encode()))
    return root


def write_topic_outcomes(
    path: Path,
    n: int = 200,
    *,
    math_model: str = "specialist",
    seed: int = 0,
    on_math: tuple[float, float] = (0.8, 0.4),
    on_easy: tuple[float, float] = (0.1, 0.95),
) -> Path:
    """Outcome records (``router fit``'s JSONL) of a workload whose right model depends on the
    topic, hidden from length: even prompts are made of ``HARD`` words, odd ones of ``EASY``
    words (same word lengths). ``on_math`` / ``on_easy``: the chance that ``math_model`` and the
    other model (``specialist`` / ``generalist``) answer each kind well."""
    other = {"specialist": "generalist", "generalist": "specialist"}[math_model]
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        math = i % 2 == 0
        words = rng.choices(HARD if math else EASY, k=rng.randint(5, 20))
        prompt = f"Q{i}: tell me about the " + " ".join(words)
        for model, p in zip((math_model, other), on_math if math else on_easy, strict=True):
            record = {"id": i, "prompt": prompt, "model": model, "score": float(rng.random() < p)}
            lines.append(json.dumps(record) + "\n")
    path.write_text("".join(lines))
    return path
