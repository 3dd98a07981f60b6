"""Request recording: what a deployment's own outcomes are learned from.

With a RoutePolicy's ``spec.outcomes.record`` on, each ext_proc worker appends one JSON line per
routed request of that policy to ``<dir>/requests-<replica>-<date>.jsonl``, and one per
``POST /v1/feedback`` to ``<dir>/feedback-<replica>-<date>.jsonl`` (``<replica>``: the pod or
host name and the worker's process id; ``<date>``: the UTC day, ``YYYY-MM-DD``). Keys come in
this order::

    {"id": "<x-request-id>", "ts": <unix seconds float>, "policy": "<namespace>/<name>",
     "alias": "<request model field>", "model": "<chosen model name>",
     "reason": "<decision reason>", "headers": {"<lowercase routing header>": "<value>", ...},
     "body": <the client's request JSON object>}

    {"id": "<x-request-id>", "ts": <unix seconds float>, "score": <0..1>, "model": "<name>"}

    (shadow evaluation, ``extproc/shadow.py``, adds ``"source": "shadow", "judge": "<name>"``)

* ``id``: the ``x-request-id`` Envoy generated for the request (a client's own is removed
  first) and returned on its response;
* ``headers``: the request headers routing reads (``RoutingConfig.request_headers``) that the
  request carried, never ``authorization``, ``x-api-key`` or ``x-request-id``;
* ``body``: only when the policy records ``prompts``: the request JSON exactly as the client
  sent it (line breaks between tokens turned into spaces), or, when the policy redacts personal
  data, the redacted body that went upstream. A request found to hold personal data that was
  routed, not redacted (``spec.personalData`` action ``route``), is recorded without its body:
  personal data is never written to disk;
* feedback ``model``: only when the client named one (else the recorded model is meant).

Nothing here runs on the event loop but ``Recorder.request``/``feedback``: a tuple appended to a
bounded deque. A writer thread per worker serializes and appends the lines every
``FLUSH_SECONDS``, and prunes the directory to the retention. A full queue drops the record and
counts it (``switchyard_recording_dropped_total``): a request is never slowed by the disk.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import Counter

log = logging.getLogger(__name__)

OUTCOMES_DIR_ENV = "SWITCHYARD_OUTCOMES_DIR"
FLUSH_SECONDS = 0.2
PRUNE_SECONDS = 60.0
MAX_QUEUED = 10_000
"""Records waiting for the writer; past this, new ones are dropped (and counted)."""

REQUESTS = "requests"
FEEDBACK = "feedback"

RECORDED = Counter(
    "switchyard_recorded",
    "Records appended to the outcomes directory, by kind (requests, feedback).",
    ["kind"],
)
DROPPED = Counter(
    "switchyard_recording_dropped",
    "Records dropped (the writer queue was full, or the directory could not be written), by kind.",
    ["kind"],
)


@dataclass(frozen=True, slots=True)
class Retention:
    """Age and size bounds of the recording directory; 0: unbounded."""

    max_age_s: int = 0
    max_bytes: int = 0


@dataclass(frozen=True, slots=True)
class RecordingRule:
    """One policy's recording, ready for the hot path."""

    prompts: bool
    """Record the request body too (``record: prompts``)."""


RequestItem = tuple[
    float, str, str, str, str, str, Mapping[str, str], tuple[str, ...], bytes | None
]
"""(ts, id, policy, alias, model, reason, request headers, header names to keep, raw body)."""
FeedbackItem = (
    tuple[float, str, float, str | None] | tuple[float, str, float, str | None, Mapping[str, str]]
)
"""(ts, id, score, model[, more string keys, e.g. a shadow evaluation's source and judge])."""


def request_line(item: RequestItem) -> bytes:
    """One ``requests-*.jsonl`` line (with its newline)."""
    ts, rid, policy, alias, model, reason, headers, names, body = item
    kept = {name: headers[name] for name in names if name in headers}
    head = orjson.dumps(
        {
            "id": rid,
            "ts": ts,
            "policy": policy,
            "alias": alias,
            "model": model,
            "reason": reason,
            "headers": kept,
        }
    )
    if body is None:
        return head + b"\n"
    # A parsed JSON body holds raw line breaks only between tokens (inside strings they are
    # escaped), so spaces keep it the same value on one line, without a re-serialization.
    one_line = body.replace(b"\n", b" ").replace(b"\r", b" ").strip()
    return head[:-1] + b',"body":' + one_line + b"}\n"


def feedback_line(item: FeedbackItem) -> bytes:
    """One ``feedback-*.jsonl`` line (with its newline)."""
    ts, rid, score, model = item[0], item[1], item[2], item[3]
    doc: dict[str, Any] = {"id": rid, "ts": ts, "score": score}
    if model is not None:
        doc["model"] = model
    if len(item) > 4:
        doc.update(item[4])
    return orjson.dumps(doc) + b"\n"


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def replica_name() -> str:
    """This worker's part of file names: pod (or host) name and process id."""
    host = os.environ.get("POD_NAME") or socket.gethostname()
    return f"{_UNSAFE.sub('_', host)[:100]}-{os.getpid()}"


def _day(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def recording_files(directory: Path) -> list[Path]:
    """The record files in ``directory`` (any replica, any day)."""
    return [
        p for p in directory.glob("*.jsonl") if p.name.startswith((f"{REQUESTS}-", f"{FEEDBACK}-"))
    ]


def prune(
    directory: Path, retention: Retention, now: float, keep: Iterable[Path] = ()
) -> list[Path]:
    """Delete record files older than ``max_age_s``, then the oldest until the rest fit in
    ``max_bytes`` (files in ``keep``, those being written, go last). Returns what was deleted.
    Other workers prune the same directory: a file gone meanwhile is skipped."""
    entries = []
    for path in recording_files(directory):
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        entries.append((stat.st_mtime, stat.st_size, path))
    keep_set = set(keep)
    entries.sort(key=lambda e: (e[2] in keep_set, e[0]))
    deleted = []
    total = sum(size for _, size, _ in entries)
    for mtime, size, path in entries:
        too_old = retention.max_age_s and now - mtime > retention.max_age_s
        too_big = retention.max_bytes and total > retention.max_bytes
        if not (too_old or too_big):
            continue
        path.unlink(missing_ok=True)
        deleted.append(path)
        total -= size
    return deleted


class _File:
    """One append-only file of this worker, reopened for a new day or after a prune removed it."""

    def __init__(self, directory: Path, kind: str, replica: str) -> None:
        self.directory = directory
        self.kind = kind
        self.replica = replica
        self.day = ""
        self.fd = -1
        self.path: Path | None = None

    def write(self, ts: float, data: bytes) -> None:
        day = _day(ts)
        if self.fd < 0 or day != self.day or os.fstat(self.fd).st_nlink == 0:
            self.close()
            self.day = day
            self.path = self.directory / f"{self.kind}-{self.replica}-{day}.jsonl"
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Recorder:
    """One worker's recording: ``request``/``feedback`` queue records (event loop), a writer
    thread appends them (``start``/``stop``)."""

    def __init__(
        self,
        directory: Path,
        replica: str | None = None,
        max_queued: int = MAX_QUEUED,
        flush_s: float = FLUSH_SECONDS,
    ) -> None:
        self.directory = directory
        self.replica = replica or replica_name()
        self.max_queued = max_queued
        self.flush_s = flush_s
        self.retention = Retention()
        """Set by the processor from the routing config (the strictest recording policy's)."""
        self._queue: deque[tuple[str, Any]] = deque()
        # Counted on the loop (only it writes these); the writer exports the growth.
        self._dropped = {REQUESTS: 0, FEEDBACK: 0}
        self._exported = {REQUESTS: 0, FEEDBACK: 0}
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._files = {k: _File(directory, k, self.replica) for k in (REQUESTS, FEEDBACK)}
        self._pruned_at = 0.0

    def _put(self, kind: str, item: Any) -> bool:
        queue = self._queue
        if len(queue) >= self.max_queued:
            self._dropped[kind] += 1
            return False
        queue.append((kind, item))
        return True

    def request(self, item: RequestItem) -> bool:
        """Queue one routed request (False: dropped, the queue is full)."""
        return self._put(REQUESTS, item)

    def feedback(self, item: FeedbackItem) -> bool:
        """Queue one feedback (False: dropped, the queue is full)."""
        return self._put(FEEDBACK, item)

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Write what is queued and stop the writer (blocking: call it off the event loop)."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        for f in self._files.values():
            f.close()

    def flush(self) -> None:
        """Write what is queued now (the writer thread's work; tests and ``stop`` use it)."""
        queue = self._queue
        for _ in range(len(queue)):
            kind, item = queue.popleft()
            try:
                data = request_line(item) if kind == REQUESTS else feedback_line(item)
                self._files[kind].write(item[0], data)
            except (OSError, orjson.JSONEncodeError) as error:
                DROPPED.labels(kind).inc()
                log.warning("recording: a %s record was dropped: %s", kind, error)
                continue
            RECORDED.labels(kind).inc()
        for kind, count in list(self._dropped.items()):
            if count > self._exported[kind]:
                DROPPED.labels(kind).inc(count - self._exported[kind])
                self._exported[kind] = count

    def prune(self, now: float | None = None) -> list[Path]:
        """Apply the retention to the directory now."""
        keep = [f.path for f in self._files.values() if f.path is not None]
        try:
            return prune(self.directory, self.retention, time.time() if now is None else now, keep)
        except OSError as error:
            log.warning("recording: pruning %s failed: %s", self.directory, error)
            return []

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self.flush_s)
            self._wake.clear()
            self.flush()
            now = time.monotonic()
            if now - self._pruned_at >= PRUNE_SECONDS:
                self._pruned_at = now
                self.prune()
        self.flush()


def from_environment() -> Recorder | None:
    """The worker's recorder when ``SWITCHYARD_OUTCOMES_DIR`` names a directory."""
    directory = os.environ.get(OUTCOMES_DIR_ENV, "")
    return Recorder(Path(directory)) if directory else None
