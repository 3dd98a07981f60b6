"""Steady client traffic for the fault schedule, and how each request ended.

Client threads send chat completions through the gateway with the official ``openai`` client,
streaming and not, paced, each request tagged with the phase (fault) current when it started.
A request is *ok* when the model routing picks answered, *failed over* when another model did
(the ``x-switchyard-model`` response header names the model that answered), *failed* when the
client saw an error status or a broken stream, and *hung* when it hit the client timeout.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import openai

MESSAGES: list[dict[str, str]] = [{"role": "user", "content": "Say hello to my friend."}]


@dataclass(frozen=True)
class Outcome:
    phase: str
    started: float
    ended: float
    status: int  # HTTP status; 0 connection error or broken stream; -1 client timeout
    model: str  # the model that answered (x-switchyard-model), "" on failure
    expected: frozenset[str]  # the models routing may pick for this request
    well_formed: bool  # a failure's body is an OpenAI error {"error": {message, type, code}}
    detail: str = ""

    @property
    def hung(self) -> bool:
        return self.status == -1

    @property
    def failed(self) -> bool:
        return self.status != 200 and not self.hung

    @property
    def failed_over(self) -> bool:
        return self.status == 200 and self.model not in self.expected

    @property
    def normal(self) -> bool:
        return self.status == 200 and self.model in self.expected


def is_openai_error(body: bytes) -> bool:
    try:
        error = json.loads(body)["error"]
        return all(isinstance(error[k], str) and error[k] for k in ("message", "type", "code"))
    except (ValueError, KeyError, TypeError):
        return False


@dataclass
class Load:
    """``clients`` threads, each sending one request per ``interval_s`` at most."""

    base_url: str
    clients: int
    interval_s: float
    timeout_s: float
    expected: dict[str, frozenset[str]]  # model asked for → models routing may pick
    phase: str = "baseline"
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        for i in range(self.clients):
            thread = threading.Thread(target=self._run, args=(i,), daemon=True)
            self._threads.append(thread)
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout_s + 5)

    def set_expected(self, model: str, picks: frozenset[str]) -> None:
        with self._lock:
            self.expected = {**self.expected, model: picks}

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def _run(self, index: int) -> None:
        client = openai.OpenAI(
            base_url=self.base_url, api_key="unused", max_retries=0, timeout=self.timeout_s
        )
        models = sorted(self.expected)
        count = 0
        while not self._stop.is_set():
            model = models[(index + count) % len(models)]
            stream = (index + count) % 2 == 1
            count += 1
            started = time.monotonic()
            expected = self.expected[model]
            status, served, well_formed, detail = _request(client, model, stream)
            ended = time.monotonic()
            phase = self.phase  # the fault in force when the answer came
            outcome = Outcome(phase, started, ended, status, served, expected, well_formed, detail)
            with self._lock:
                self.outcomes.append(outcome)
            self._stop.wait(max(0.0, self.interval_s - (ended - started)))  # pacing


def _request(client: openai.OpenAI, model: str, stream: bool) -> tuple[int, str, bool, str]:
    """(status, model that answered, whether an error was well formed, what went wrong)."""
    chat = client.chat.completions
    try:
        if not stream:
            raw = chat.with_raw_response.create(model=model, messages=MESSAGES)  # type: ignore[arg-type]
            completion = raw.parse()
            ok = bool(completion.choices and completion.choices[0].message.content)
            return (200 if ok else 0), raw.headers.get("x-switchyard-model", ""), ok, ""
        with chat.with_streaming_response.create(
            model=model,
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
        ) as response:
            lines = [line for line in response.iter_lines() if line]
            served = response.headers.get("x-switchyard-model", "")
        if lines and lines[-1] == "data: [DONE]" and len(lines) > 2:
            return 200, served, True, ""
        return 0, "", False, f"broken stream: {lines[-1:]!r}"
    except openai.APITimeoutError:
        return -1, "", False, "client timeout"
    except openai.APIStatusError as exc:
        body = exc.response.content
        return exc.status_code, "", is_openai_error(body), body[:200].decode(errors="replace")
    except (openai.APIConnectionError, httpx.HTTPError) as exc:
        return 0, "", False, f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class PhaseReport:
    phase: str
    sent: int
    ok: int
    failed_over: int
    failed: Counter[int]
    hung: int
    malformed: int
    recover_s: float | None  # from the fault's end until traffic was normal; None: not seen
    in_flight: int = 0  # of the failures: requests in flight at an instant of ``report``

    @property
    def failures(self) -> int:
        return sum(self.failed.values())


def report(
    phase: str, outcomes: list[Outcome], restored: float, instants: list[float] | None = None
) -> PhaseReport:
    """Tally ``phase``; recovery runs from ``restored`` to the end of its last abnormal request.
    Failures of requests that were in flight at one of ``instants`` are also counted apart."""
    mine = [o for o in outcomes if o.phase == phase]
    abnormal = [o.ended for o in mine if not o.normal]
    at = instants or []
    after = [o for o in mine if o.started >= restored]
    recovered = bool(after) and after[-1].normal
    return PhaseReport(
        phase=phase,
        sent=len(mine),
        ok=sum(o.normal for o in mine),
        failed_over=sum(o.failed_over for o in mine),
        failed=Counter(o.status for o in mine if o.failed),
        hung=sum(o.hung for o in mine),
        malformed=sum(o.failed and not o.well_formed for o in mine),
        recover_s=max(0.0, max(abnormal, default=restored) - restored) if recovered else None,
        in_flight=sum(o.failed and in_flight(o, at) for o in mine),
    )


def in_flight(outcome: Outcome, instants: list[float]) -> bool:
    """Whether the request was under way at one of ``instants``."""
    return any(outcome.started <= t <= outcome.ended for t in instants)


def table(reports: list[PhaseReport]) -> str:
    head = (
        "fault",
        "sent",
        "ok",
        "failed over",
        "failed (status: n)",
        "of them in flight at a kill",
        "hung",
        "malformed",
        "recover",
    )
    rows = [head]
    for r in reports:
        failed = ", ".join(f"{s}: {n}" for s, n in sorted(r.failed.items())) or "0"
        recover = "not seen" if r.recover_s is None else f"{r.recover_s:.2f} s"
        rows.append(
            (r.phase, str(r.sent), str(r.ok), str(r.failed_over), failed, str(r.in_flight),
             str(r.hung), str(r.malformed), recover)
        )  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
