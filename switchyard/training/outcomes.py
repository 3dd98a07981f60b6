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

A recording directory (the ext_proc's ``--outcomes-dir``, ``switchyard.extproc.recording``) is
read as outcome records by ``join_recording``: each feedback is joined by request id to the
request recorded by any replica; the model is the feedback's, else the recorded one; the last
feedback (by time) for a (request, model) wins. Requests recorded without their body
(``record: decisions``), feedback whose request is not in the directory and unreadable lines
are skipped and counted.
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


@dataclass(slots=True)
class Joined:
    """Outcome records joined from a recording directory, and what was skipped."""

    records: list[bytes]
    """One outcome record per line (JSON, with its newline)."""
    files: list[Path]
    requests: int = 0
    feedback: int = 0
    no_body: int = 0
    unmatched: int = 0
    unreadable: int = 0

    def summary(self) -> str:
        return (
            f"{len(self.records)} outcome records from {self.requests} recorded requests and "
            f"{self.feedback} feedback ({len(self.files)} files); skipped: {self.no_body} "
            f"without a body (record: decisions), {self.unmatched} feedback without a recorded "
            f"request, {self.unreadable} unreadable lines"
        )


def _lines(path: Path, joined: Joined) -> Iterable[dict[str, Any]]:
    with open(path, "rb") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                doc = orjson.loads(line)
            except orjson.JSONDecodeError:  # e.g. a line cut short by a killed worker
                joined.unreadable += 1
                continue
            if isinstance(doc, dict) and isinstance(doc.get("id"), str):
                yield doc
            else:
                joined.unreadable += 1


def _prompt_fields(body: object) -> dict[str, Any] | None:
    if not isinstance(body, dict):
        return None
    if isinstance(body.get("messages"), list):
        return {"messages": body["messages"]}
    if isinstance(body.get("prompt"), str):
        return {"prompt": body["prompt"]}
    return None


def user_outcome_files(directory: Path) -> list[Path]:
    """Outcome files a user put in a recording directory (eval results, labelled logs): every
    ``*.jsonl`` there but the gateway's own ``requests-*`` and ``feedback-*`` files."""
    return sorted(
        p
        for p in directory.glob("*.jsonl")
        if p.is_file() and not p.name.startswith(("requests-", "feedback-"))
    )


def join_recording(directory: Path) -> Joined:
    """Outcome records from every replica's ``requests-*`` and ``feedback-*`` files. The
    feedback is read first, so only the requests it scores are held in memory."""
    if not directory.is_dir():
        raise OutcomeError(f"recording directory not found: {directory}")
    request_files = sorted(directory.glob("requests-*.jsonl"))
    feedback_files = sorted(directory.glob("feedback-*.jsonl"))
    joined = Joined([], [*request_files, *feedback_files])
    given: dict[str, list[tuple[float, float, str | None]]] = {}  # id → (ts, score, model)
    for path in feedback_files:
        for doc in _lines(path, joined):
            joined.feedback += 1
            score, ts, model = doc.get("score"), doc.get("ts"), doc.get("model")
            if (
                isinstance(score, bool)
                or not isinstance(score, int | float)
                or not 0.0 <= score <= 1.0
            ):
                joined.unreadable += 1
                continue
            when = float(ts) if isinstance(ts, int | float) and not isinstance(ts, bool) else 0.0
            named = model if isinstance(model, str) and model.strip() else None
            given.setdefault(doc["id"], []).append((when, float(score), named))
    scored: dict[tuple[str, str], tuple[float, float]] = {}  # (id, model) → (ts, score)
    prompts: dict[str, dict[str, Any] | None] = {}
    for path in request_files:
        for doc in _lines(path, joined):
            joined.requests += 1
            rid, model = doc["id"], doc.get("model")
            if rid not in given or rid in prompts or not isinstance(model, str) or not model:
                continue
            prompts[rid] = _prompt_fields(doc.get("body"))
            for when, score, named in given[rid]:
                key = (rid, named or model)
                if key not in scored or when >= scored[key][0]:  # the last feedback wins
                    scored[key] = (when, score)
    joined.unmatched = sum(len(v) for rid, v in given.items() if rid not in prompts)
    for (rid, model), (_, score) in scored.items():
        fields = prompts[rid]
        if fields is None:
            joined.no_body += 1
            continue
        joined.records.append(
            orjson.dumps({"id": rid, **fields, "model": model, "score": score}) + b"\n"
        )
    return joined


def _joined_outcomes(directory: Path, joined: Joined) -> Iterable[Outcome]:
    for i, line in enumerate(joined.records, start=1):
        yield parse_record(orjson.loads(line), f"{directory} (joined record {i})")


def load(paths: Sequence[Path], models: Sequence[str] | None = None) -> Outcomes:
    """Read and pivot outcome files, or recording directories (``join_recording``, plus any
    other ``*.jsonl`` outcome files put there); ``files`` records each file's sha256."""
    missing = [str(p) for p in paths if not Path(p).is_file() and not Path(p).is_dir()]
    if missing:
        raise OutcomeError(f"outcome file(s) not found: {', '.join(missing)}")
    files: list[Path] = []

    def records() -> Iterable[Outcome]:
        for path in map(Path, paths):
            if path.is_dir():
                joined = join_recording(path)
                files.extend(joined.files)
                yield from _joined_outcomes(path, joined)
                for extra in user_outcome_files(path):
                    files.append(extra)
                    yield from read_records(extra)
            else:
                files.append(path)
                yield from read_records(path)

    out = pivot(records(), models)
    out.files = {str(f): _sha256(f) for f in files}
    return out
