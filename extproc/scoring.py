"""The router-score interface the routing engine consumes, and the placeholder scorer.

A scorer turns prompt text into ``RouterScores``: ``difficulty`` in [0, 1] (the probability that
a small model fails where a large one succeeds) and a category distribution over the task
taxonomy. The trained ONNX router (``switchyard.extproc.router``) implements the same protocol.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from switchyard.extproc.semantic import Embedder

CATEGORIES: tuple[str, ...] = (
    "math",
    "code",
    "reasoning",
    "knowledge",
    "writing",
    "extraction",
    "chat",
)


@dataclass(frozen=True, slots=True)
class RouterScores:
    """What the router says about one prompt."""

    difficulty: float
    category: str
    categories: Mapping[str, float] = field(default_factory=dict)
    predicted: Mapping[str, float] | None = None
    """Each model's expected score in [0, 1] (bundles fitted by ``switchyard router fit``)."""
    embedding: npt.NDArray[np.float32] | None = field(default=None, compare=False)
    """The prompt's unit embedding, only when ``score`` was given an ``embedder``."""


class Scorer(Protocol):
    """Anything that scores prompts; must never block the event loop."""

    name: str

    async def score(self, text: str, embedder: Embedder | None = None) -> RouterScores:
        """Score one prompt; with ``embedder`` (the same bundle's), also its embedding, from
        the token ids made for scoring (a scorer that cannot leaves ``embedding`` None)."""
        ...


_CUES: dict[str, re.Pattern[str]] = {
    "math": re.compile(
        r"\b(integral|derivative|prove|theorem|equation|solve|probability|matrix|"
        r"eigen\w*|polynomial|lemma|\d+\s*[\^*/+-]\s*\d+)\b",
        re.IGNORECASE,
    ),
    "code": re.compile(
        r"(```|\bdef |\bclass |\bfunction\b|\bimplement\w*|\bpython\b|\brust\b|\bjavascript\b|"
        r"\bsql\b|\balgorithm\b|\bcompile\w*|\bdebug\w*|\bregex\b)",
        re.IGNORECASE,
    ),
    "reasoning": re.compile(
        r"\b(step by step|explain why|trade-?offs?|analy[sz]e|compare|design|optimi[sz]e|"
        r"architecture|concurren\w*|distributed|rigorous\w*|edge cases?)\b",
        re.IGNORECASE,
    ),
    "writing": re.compile(r"\b(write|essay|poem|story|draft|rewrite|email)\b", re.IGNORECASE),
    "extraction": re.compile(r"\b(summari[sz]e|extract|tl;?dr|list the|classify)\b", re.IGNORECASE),
    "knowledge": re.compile(r"\b(what is|who was|when did|define|capital of)\b", re.IGNORECASE),
}
_HARD_WEIGHT = {"math": 0.3, "code": 0.25, "reasoning": 0.3}


class HeuristicScorer:
    """Placeholder scorer: keyword cues plus prompt length. Cheap, deterministic, documented.

    difficulty = min(1, 0.1 + 0.3 * min(1, words / 400) + sum of hard-cue weights present).
    Used when no router bundle is loaded; the trained router replaces it behind ``Scorer``.
    """

    name = "heuristic"

    def score_sync(self, text: str) -> RouterScores:
        hits = {name: len(pattern.findall(text)) for name, pattern in _CUES.items()}
        words = text.count(" ") + 1
        difficulty = 0.1 + 0.3 * min(1.0, words / 400)
        difficulty += sum(w for cat, w in _HARD_WEIGHT.items() if hits[cat])
        difficulty = min(1.0, difficulty)
        total = sum(hits.values())
        if total == 0:
            categories = {c: (1.0 if c == "chat" else 0.0) for c in CATEGORIES}
        else:
            categories = {c: hits.get(c, 0) / total for c in CATEGORIES}
        category = max(categories, key=lambda c: categories[c])
        return RouterScores(difficulty=difficulty, category=category, categories=categories)

    async def score(self, text: str, embedder: Embedder | None = None) -> RouterScores:
        return self.score_sync(text)  # no token ids: the processor embeds (semantic rules)
