"""Outcome records: what a model scored on a prompt, one JSON object per line.

::

    {"id": "req-1", "prompt": "Prove that ...", "model": "llama-8b", "score": 0.0}
    {"id": "req-1", "prompt": "Prove that ...", "model": "llama-70b", "score": 1.0,
     "cost_usd": 0.0021, "latency_ms": 840, "ts": "2026-11-30T08:00:00Z"}
    {"id": "req-2", "messages": [{"role": "user", "content": "hi"}], "model": "m", "score": 1}

* ``id``: a string or integer naming the request (kept for the caller's reference);
* ``prompt`` (a string) or ``messages`` (OpenAI chat messages): the text the router scores is
  the prompt, or the last ``user`` message (string content, or its ``text`` parts joined by a
  newline), exactly what the gateway scores;
* ``model``: a non-empty string; ``score``: a number in [0, 1] (1 = the best outcome);
* optional ``cost_usd``, ``latency_ms`` (non-negative numbers) and ``ts`` (a string).

Records of the same prompt text are one prompt (whatever their ids); several records of the
same (prompt, model) are averaged. ``OutcomeError`` names the file, line and field of the first
bad record.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

OPTIONAL_NUMBERS = ("cost_usd", "latency_ms")


class OutcomeError(ValueError):
    """A record that does not follow the outcome format (the message names file:line: field)."""


@dataclass(frozen=True, slots=True)
class Outcome:
    id: Any
    text: str
    model: str
    score: float


def _where(path: str, lineno: int) -> str:
    return f"{path}:{lineno}"


def _content(content: object, where: str, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise OutcomeError(f"{where}: field 'messages[{i}].content[{j}]' must be an object")
            if part.get("type") == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise OutcomeError(
                        f"{where}: field 'messages[{i}].content[{j}].text' must be a string"
                    )
                parts.append(text)
        return "\n".join(parts)
    raise OutcomeError(
        f"{where}: field 'messages[{i}].content' must be a string or an array of parts"
    )


def prompt_text(doc: dict[str, Any], where: str) -> str:
    """The text the router scores for one record (``prompt``, or the last user message)."""
    if "prompt" in doc:
        prompt = doc["prompt"]
        if not isinstance(prompt, str):
            raise OutcomeError(f"{where}: field 'prompt' must be a string")
        return prompt
    messages = doc.get("messages")
    if messages is None:
        raise OutcomeError(f"{where}: needs a 'prompt' or a 'messages' field")
    if not isinstance(messages, list) or not messages:
        raise OutcomeError(f"{where}: field 'messages' must be a non-empty array")
    last_user: str | None = None
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise OutcomeError(f"{where}: field 'messages[{i}]' must be an object")
        role = message.get("role")
        if not isinstance(role, str):
            raise OutcomeError(f"{where}: field 'messages[{i}].role' must be a string")
        text = _content(message.get("content"), where, i)
        if role == "user":
            last_user = text
    if last_user is None:
        raise OutcomeError(f"{where}: field 'messages' has no 'user' message")
    return last_user


def parse_record(doc: object, where: str, need_model: bool = True) -> Outcome:
    """One decoded line -> ``Outcome`` (``need_model=False``: a prompt to score, no outcome)."""
    if not isinstance(doc, dict):
        raise OutcomeError(f"{where}: expected a JSON object")
    if "id" not in doc:
        raise OutcomeError(f"{where}: missing field 'id'")
    rid = doc["id"]
    if isinstance(rid, bool) or not isinstance(rid, str | int):
        raise OutcomeError(f"{where}: field 'id' must be a string or an integer")
    text = prompt_text(doc, where)
    if not need_model:
        return Outcome(rid, text, "", math.nan)
    model = doc.get("model")
    if "model" not in doc:
        raise OutcomeError(f"{where}: missing field 'model'")
    if not isinstance(model, str) or not model.strip():
        raise OutcomeError(f"{where}: field 'model' must be a non-empty string")
    if "score" not in doc:
        raise OutcomeError(f"{where}: missing field 'score'")
    score = doc["score"]
    if isinstance(score, bool) or not isinstance(score, int | float) or not 0.0 <= score <= 1.0:
        raise OutcomeError(f"{where}: field 'score' must be a number in [0, 1], got {score!r}")
    for name in OPTIONAL_NUMBERS:
        value = doc.get(name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or value < 0
        ):
            raise OutcomeError(f"{where}: field {name!r} must be a non-negative number")
    if doc.get("ts") is not None and not isinstance(doc["ts"], str):
        raise OutcomeError(f"{where}: field 'ts' must be a string")
    return Outcome(rid, text, model, float(score))


def read_records(path: Path, need_model: bool = True) -> Iterable[Outcome]:
    """The records of one JSONL file, in order (blank lines skipped)."""
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = _where(str(path), lineno)
            try:
                doc = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise OutcomeError(f"{where}: not valid JSON ({exc})") from exc
            yield parse_record(doc, where, need_model)


@dataclass(slots=True)
class Outcomes:
    """Outcomes pivoted to prompts x models (``scores`` is NaN where a model has none)."""

    texts: list[str]
    ids: list[Any]
    models: list[str]
    scores: npt.NDArray[np.float64]
    n_records: int
    files: dict[str, str] = field(default_factory=dict)

    @property
    def n_outcomes(self) -> int:
        return int(np.isfinite(self.scores).sum())

    def subset(self, rows: npt.NDArray[np.intp] | npt.NDArray[np.bool_]) -> Outcomes:
        idx = np.arange(len(self.texts))[rows]
        return Outcomes(
            [self.texts[i] for i in idx],
            [self.ids[i] for i in idx],
            list(self.models),
            self.scores[idx],
            int(np.isfinite(self.scores[idx]).sum()),
            dict(self.files),
        )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pivot(records: Iterable[Outcome], models: Sequence[str] | None = None) -> Outcomes:
    """Group records by prompt text; keep ``models`` only (in that order), or every model."""
    keep = set(models) if models else None
    index: dict[str, int] = {}
    texts: list[str] = []
    ids: list[Any] = []
    cells: dict[tuple[int, str], list[float]] = {}
    seen: list[str] = []
    n = 0
    for r in records:
        n += 1
        if keep is not None and r.model not in keep:
            continue
        row = index.get(r.text)
        if row is None:
            row = index[r.text] = len(texts)
            texts.append(r.text)
            ids.append(r.id)
        if r.model not in seen:
            seen.append(r.model)
        cells.setdefault((row, r.model), []).append(r.score)
    order = list(models) if models else sorted(seen)
    missing = [m for m in order if m not in seen]
    if missing:
        raise OutcomeError(f"no outcomes for model(s) {', '.join(missing)}")
    col = {m: j for j, m in enumerate(order)}
    scores = np.full((len(texts), len(order)), np.nan)
    for (row, model), vals in cells.items():
        scores[row, col[model]] = sum(vals) / len(vals)
    return Outcomes(texts, ids, order, scores, n)


def load(paths: Sequence[Path], models: Sequence[str] | None = None) -> Outcomes:
    """Read and pivot outcome files; ``files`` records each file's sha256."""
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise OutcomeError(f"outcome file(s) not found: {', '.join(missing)}")
    out = pivot((r for p in paths for r in read_records(Path(p))), models)
    out.files = {str(p): _sha256(Path(p)) for p in paths}
    return out
