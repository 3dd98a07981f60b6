"""Traffic to replay: the gateway's request recording, or outcome files.

A recording is JSON lines (files ``requests-*.jsonl`` in a directory, or one file)::

    {"id": "<request id>", "ts": <unix float>, "policy": "<namespace>/<name>",
     "alias": "<request model field>", "model": "<chosen model>", "reason": "<reason>",
     "headers": {"<lowercase routing header>": "<value>"}, "body": {<the client's request>}}

``body`` is missing (or null) when the policy did not record prompts: such lines are counted and
skipped.
A line without ``body``, ``alias`` or ``policy`` is read as an outcome record (``prompt`` or
``messages``): the prompt is sent to ``alias`` as a chat request, once per distinct prompt, with
no recorded decision. Bad lines stop the read with ``FILE:LINE: why``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from switchyard.extproc.request import Endpoint
from switchyard.training.outcomes import OutcomeError, parse_record
from switchyard.training.replay import ReplayError, endpoint_of

LOG_FIELDS = ("body", "alias", "policy")


@dataclass(frozen=True, slots=True)
class Line:
    """One request to replay."""

    id: Any
    where: str
    endpoint: Endpoint
    headers: dict[str, str]
    body: bytes
    model: str | None
    """The model the gateway chose (None: not recorded, e.g. an outcome file)."""
    reason: str = ""
    policy: str = ""


@dataclass(slots=True)
class Traffic:
    lines: list[Line] = field(default_factory=list)
    without_body: int = 0
    files: list[Path] = field(default_factory=list)

    @property
    def recorded(self) -> bool:
        """Every line carries the gateway's decision."""
        return bool(self.lines) and all(line.model is not None for line in self.lines)


def traffic_files(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(path.glob("requests-*.jsonl"))
            if not found:
                raise ReplayError(f"{path}: no requests-*.jsonl files in this directory")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ReplayError(f"{path}: no such file or directory")
    return files


def _string(doc: dict[str, Any], name: str, where: str, required: bool = True) -> str:
    value = doc.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise ReplayError(f"{where}: field {name!r} must be a string")
    return value


def _log_line(doc: dict[str, Any], where: str) -> Line | None:
    rid = doc.get("id")
    if isinstance(rid, bool) or not isinstance(rid, str | int):
        raise ReplayError(f"{where}: field 'id' must be a string or an integer")
    model = _string(doc, "model", where)
    reason = _string(doc, "reason", where, required=False)
    policy = _string(doc, "policy", where, required=False)
    headers = doc.get("headers") or {}
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise ReplayError(f"{where}: field 'headers' must be an object of strings")
    body = doc.get("body")
    if body is None:  # missing (or null): the policy did not record prompts
        return None
    if not isinstance(body, dict):
        raise ReplayError(f"{where}: field 'body' must be a JSON object (the request)")
    return Line(
        rid,
        where,
        endpoint_of(body),
        {k.lower(): v for k, v in headers.items()},
        orjson.dumps(body),
        model,
        reason,
        policy,
    )


def read_traffic(paths: Sequence[Path], alias: str | None) -> Traffic:
    """Every line of the recordings or outcome files under ``paths``, in file order.
    ``alias`` is the model field outcome prompts are sent with (None: they are refused)."""
    traffic = Traffic(files=traffic_files(paths))
    prompts: set[str] = set()
    for path in traffic.files:
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    doc = orjson.loads(raw)
                except orjson.JSONDecodeError as exc:
                    raise ReplayError(f"{where}: not valid JSON ({exc})") from None
                if not isinstance(doc, dict):
                    raise ReplayError(f"{where}: expected a JSON object")
                if any(k in doc for k in LOG_FIELDS):
                    line = _log_line(doc, where)
                    if line is None:
                        traffic.without_body += 1
                    else:
                        traffic.lines.append(line)
                    continue
                try:
                    record = parse_record(doc, where, need_model=False)
                except OutcomeError as exc:
                    raise ReplayError(
                        f"{exc} (a line is a recorded request with 'body', or an outcome record)"
                    ) from None
                if record.text in prompts:
                    continue
                if alias is None:
                    raise ReplayError(
                        f"{where}: an outcome record as traffic needs --alias (the model field "
                        "to send it with) when the policies answer several aliases"
                    )
                prompts.add(record.text)
                messages = doc.get("messages") or [{"role": "user", "content": record.text}]
                body = orjson.dumps({"model": alias, "messages": messages})
                traffic.lines.append(Line(record.id, where, Endpoint.CHAT, {}, body, None))
    return traffic
