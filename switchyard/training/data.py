"""Load the routing data sets into one list of examples with labels and per-model outcomes.

Only ``../shared/data/routing/`` (or ``$SWITCHYARD_DATA``) is read. Every example carries:

* ``text``: the prompt as a user would send it (question plus options for multiple choice);
* ``source`` and ``family``: the data set and task family (for leave-one-out evaluation);
* ``category``: the task family mapped onto the router taxonomy (see ``CATEGORY_MAP`` notes);
* ``outcomes``: ``{(weak, strong): (weak_score, strong_score)}`` for the evaluation pairs;
* ``label``: the soft difficulty target, the mean over the source's label pairs of
  ``strong * (1 - weak)`` = P(small model fails and large model succeeds) for 0/1 outcomes.

The dev split is chosen by a hash of the normalised prompt, so it is stable across runs and
machines and the same prompt never lands in two splits, whatever data set it comes from.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

Pair = tuple[str, str]

#: Fractions of the hash space: dev (held out, never trained on) and calibration.
DEV_FRACTION = 0.15
CAL_FRACTION = 0.15


def data_dir() -> Path:
    """``$SWITCHYARD_DATA`` or ``../shared/data/routing/`` relative to the repository root."""
    env = os.environ.get("SWITCHYARD_DATA")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    return (repo / ".." / "shared" / "data" / "routing").resolve()


@dataclass(slots=True)
class Example:
    text: str
    source: str
    family: str
    category: str
    label: float | None
    outcomes: dict[Pair, tuple[float, float]] = field(default_factory=dict)

    @property
    def split(self) -> str:
        return split_of(self.text)


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def split_of(text: str) -> str:
    """``dev``, ``cal`` or ``train`` from a stable hash of the normalised prompt."""
    h = int.from_bytes(hashlib.sha1(_norm(text).encode()).digest()[:8], "big") / 2**64
    if h < DEV_FRACTION:
        return "dev"
    if h < DEV_FRACTION + CAL_FRACTION:
        return "cal"
    return "train"


#: Share of the train prompts held out for model selection (``in_validation``).
VALIDATION_FRACTION = 0.2


def in_validation(text: str) -> bool:
    """Whether a train prompt is in the inner validation split: 20 % of train by a salted hash
    (independent of ``split_of``). Model choices are made on it and on leave-one-source-out,
    never on dev."""
    h = int.from_bytes(hashlib.sha1(("val:" + _norm(text)).encode()).digest()[:8], "big") / 2**64
    return h < VALIDATION_FRACTION


# --- category mapping ------------------------------------------------------------------------
# MMLU subjects (RouteLLM and open7b `mmlu_*`): quantitative subjects -> math, programming
# subjects -> code, physics/chemistry/engineering/logic problem solving -> reasoning, the
# rest (law, medicine, history, social sciences, ...) -> knowledge.
_MMLU_MATH = {
    "abstract_algebra",
    "college_mathematics",
    "elementary_mathematics",
    "high_school_mathematics",
    "high_school_statistics",
    "econometrics",
}
_MMLU_CODE = {"college_computer_science", "high_school_computer_science", "machine_learning"}
_MMLU_REASONING = {
    "college_physics",
    "high_school_physics",
    "conceptual_physics",
    "college_chemistry",
    "high_school_chemistry",
    "electrical_engineering",
    "formal_logic",
    "logical_fallacies",
}

#: MMLU-Pro's 14 subjects.
MMLU_PRO_CATEGORY = {
    "math": "math",
    "computer science": "code",
    "physics": "reasoning",
    "chemistry": "reasoning",
    "engineering": "reasoning",
}

#: LLMRouter's task families.
LLMROUTER_CATEGORY = {
    "math": "math",
    "gsm8k": "math",
    "agentverse-mgsm": "math",
    "mbpp": "code",
    "human_eval": "code",
    "agentverse-logicgrid": "reasoning",
    "commonsense_qa": "reasoning",
    "arc_challenge": "reasoning",
    "gpqa": "reasoning",
    "commongen": "writing",
    "natural_qa": "knowledge",
    "trivia_qa": "knowledge",
    "mmlu": "knowledge",
    "openbook_qa": "knowledge",
}

#: open7b (RouterDC) task families, by the prefix of ``task``.
OPEN7B_CATEGORY = {
    "gsm8k": "math",
    "MATH": "math",
    "mbpp": "code",
    "humaneval": "code",
    "javascript": "code",
    "arc": "reasoning",
    "mmlu": "knowledge",
    "cmmlu": "knowledge",
    "ceval": "knowledge",
}


def mmlu_subject_category(subject: str) -> str:
    if subject in _MMLU_MATH:
        return "math"
    if subject in _MMLU_CODE:
        return "code"
    if subject in _MMLU_REASONING:
        return "reasoning"
    return "knowledge"


# --- label pairs (weak, strong) per source -----------------------------------------------------
MMLU_PRO_PAIRS: list[Pair] = [
    ("Meta-Llama-3_1-8B-Instruct", "Meta-Llama-3_1-70B-Instruct"),
    ("Meta-Llama-3-8B", "Meta-Llama-3-70B"),
    ("Mistral-7B-Instruct-v0.2", "Mixtral-8x7B-Instruct-v0.1"),
    ("Qwen1.5-7B-Chat", "Qwen1.5-72B-Chat"),
    ("Llama-2-7b-hf", "Llama-2-70b-hf"),
    ("gemini-1.5-flash-002", "gemini-1.5-pro-002"),
]
LLMROUTER_PAIRS: list[Pair] = [
    ("llama-3.1-8b-instruct", "llama-3.1-nemotron-51b-instruct"),
    ("qwen2.5-7b-instruct", "llama-3.3-nemotron-super-49b-v1"),
    ("mistral-7b-instruct-v0.3", "llama-3.1-nemotron-51b-instruct"),
]
OPEN7B_PAIRS: list[Pair] = [
    ("mistralai/Mistral-7B-v0.1", "cognitivecomputations/dolphin-2.9-llama3-8b"),
    ("meta-llama/Meta-Llama-3-8B", "meta-math/MetaMath-Mistral-7B"),
    ("itpossible/Chinese-Mistral-7B-v0.1", "HuggingFaceH4/zephyr-7b-beta"),
]
ROUTELLM_PAIRS: list[Pair] = [("mixtral_8x7b", "gpt4_1106")]

#: The weak/strong pairs ``switchyard router eval`` reports, one or two per source.
EVAL_PAIRS: dict[str, list[Pair]] = {
    "mmlu_pro": [MMLU_PRO_PAIRS[0], MMLU_PRO_PAIRS[2]],
    "llmrouter": [LLMROUTER_PAIRS[0], LLMROUTER_PAIRS[1]],
    "open7b": [OPEN7B_PAIRS[0]],
    "routellm": [ROUTELLM_PAIRS[0]],
}


def _label(outcomes: Iterable[tuple[float, float]]) -> float | None:
    vals = [s * (1.0 - w) for w, s in outcomes]
    return sum(vals) / len(vals) if vals else None


def _make(
    text: str,
    source: str,
    family: str,
    category: str,
    scores: dict[str, float],
    pairs: list[Pair],
) -> Example:
    outcomes = {
        (w, s): (float(scores[w]), float(scores[s]))
        for w, s in pairs
        if scores.get(w) is not None and scores.get(s) is not None
    }
    return Example(text, source, family, category, _label(outcomes.values()), outcomes)


def _f(value: str) -> float | None:
    if value in ("", "nan", "NaN", None):
        return None
    return float(value)


def load_mmlu_pro(root: Path) -> list[Example]:
    out = []
    with gzip.open(root / "mmlu_pro_train.csv.gz", "rt", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            try:
                options = json.loads(row["options"])
            except ValueError:
                import ast

                options = ast.literal_eval(row["options"])
            letters = "ABCDEFGHIJKLMNOP"
            text = (
                row["question"].strip()
                + "\n"
                + "\n".join(f"{letters[i]}. {o}" for i, o in enumerate(options))
            )
            scores = {
                m: v for w, s in MMLU_PRO_PAIRS for m in (w, s) if (v := _f(row[m])) is not None
            }
            cat = MMLU_PRO_CATEGORY.get(row["category"], "knowledge")
            out.append(
                _make(text, "mmlu_pro", "mmlu_pro/" + row["category"], cat, scores, MMLU_PRO_PAIRS)
            )
    return out


def load_llmrouter(root: Path) -> list[Example]:
    tasks: dict[str, str] = {}
    with open(root / "llmrouter_tasks_train.jsonl", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            tasks.setdefault(row["query"], row["task_name"])
    out = []
    for row in json.loads((root / "llmrouter_scores_train.json").read_text(encoding="utf-8")):
        task = tasks.get(row["question"], "unknown")
        cat = LLMROUTER_CATEGORY.get(task, "knowledge")
        out.append(
            _make(
                row["question"],
                "llmrouter",
                "llmrouter/" + task,
                cat,
                row["scores"],
                LLMROUTER_PAIRS,
            )
        )
    return out


def load_open7b(root: Path) -> list[Example]:
    out = []
    with gzip.open(root / "open7b_scores.jsonl.gz", "rt", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            task: str = row["task"]
            prefix = task.split("_")[0]
            if prefix == "mmlu":
                cat = mmlu_subject_category(task[len("mmlu_") :])
            else:
                cat = OPEN7B_CATEGORY.get(prefix, "knowledge")
            family = "open7b/" + ("gsm8k" if prefix.startswith("gsm8k") else prefix)
            out.append(_make(row["question"], "open7b", family, cat, row["scores"], OPEN7B_PAIRS))
    return out


def load_routellm(root: Path) -> list[Example]:
    out = []
    with gzip.open(root / "routellm_mmlu_mixtral_gpt4.csv.gz", "rt", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            scores = {
                "mixtral_8x7b": float(row["mixtral_8x7b_correct"] == "True"),
                "gpt4_1106": float(row["gpt4_1106_correct"] == "True"),
            }
            text = row["prompt"].removesuffix("Answer:").strip()
            cat = mmlu_subject_category(row["subject"])
            out.append(_make(text, "routellm", "routellm/mmlu", cat, scores, ROUTELLM_PAIRS))
    return out


LOADERS = {
    "mmlu_pro": load_mmlu_pro,
    "llmrouter": load_llmrouter,
    "open7b": load_open7b,
    "routellm": load_routellm,
}


def load_all(root: Path | None = None, sources: Iterable[str] | None = None) -> list[Example]:
    """Every example of the requested sources (all by default)."""
    root = root or data_dir()
    if not root.is_dir():
        raise FileNotFoundError(
            f"routing data not found at {root}; set SWITCHYARD_DATA to the data/routing folder"
        )
    out: list[Example] = []
    for name in sources or LOADERS:
        out.extend(LOADERS[name](root))
    return [e for e in out if e.text.strip()]


# --- prices (USD per 1M input tokens) ----------------------------------------------------------
# LLMRouter models: the data set's own list prices (llmrouter_models.json). Others: a size
# ladder matching those prices (7-9B 0.20, 49-72B 0.90, Mixtral 8x7B 0.60), Gemini 1.5 and
# GPT-4-1106 public list prices at release. open7b models are all 7-8B: no cost difference.
_PRICE_BY_SIZE = {
    "Meta-Llama-3_1-8B-Instruct": 0.20,
    "Meta-Llama-3-8B": 0.20,
    "Mistral-7B-Instruct-v0.2": 0.20,
    "Qwen1.5-7B-Chat": 0.20,
    "Llama-2-7b-hf": 0.20,
    "Meta-Llama-3_1-70B-Instruct": 0.90,
    "Meta-Llama-3-70B": 0.90,
    "Llama-2-70b-hf": 0.90,
    "Qwen1.5-72B-Chat": 0.90,
    "Mixtral-8x7B-Instruct-v0.1": 0.60,
    "mixtral_8x7b": 0.60,
    "gemini-1.5-flash-002": 0.075,
    "gemini-1.5-pro-002": 1.25,
    "gpt4_1106": 10.0,
}


def price(model: str, root: Path | None = None) -> float:
    """USD per 1M input tokens of ``model`` (0.20 for the 7-8B open models by default)."""
    if model in _PRICE_BY_SIZE:
        return _PRICE_BY_SIZE[model]
    path = (root or data_dir()) / "llmrouter_models.json"
    if path.is_file():
        models = json.loads(path.read_text(encoding="utf-8"))
        if model in models:
            return float(models[model]["input_price"])
    return 0.20
