"""`switchyard traces`: the last requests as span trees, read from Jaeger's HTTP query API.

Each request's trace is printed as an indented tree, one line per span: operation, service,
duration, then the attributes a person asks about (policy, model, served model, reason, router
difficulty, tokens, cost, status). Only those named attributes are shown, never prompt text (no
span carries it either), and values are printed with control characters escaped, since the
query API is a peer like any other. An attribute an ancestor line already showed with the same
value is not repeated.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

DEFAULT_URL = "http://127.0.0.1:16686"
DEFAULT_SERVICE = "switchyard"
_MAX_RESPONSE_BYTES = 64 * 1024 * 1024
_SEARCH_LIMIT = 500
# Jaeger's search returns up to `limit` traces of the window in no particular order, so the
# newest N are found by widening the window until it holds N, then sorting.
_WINDOWS_S = (10, 60, 600, 3600, 6 * 3600, 48 * 3600)
_MAX_VALUE = 120


class JaegerError(RuntimeError):
    """The query API could not be reached or answered something unusable."""


Trace = dict[str, Any]


class JaegerQuery:
    """A client of Jaeger's HTTP query API (``/api/...``, what the Jaeger UI reads)."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def get(self, path: str, params: dict[str, str | int] | None = None) -> Any:
        """GET ``path`` (with ``params``) as JSON; JaegerError when unreachable or not JSON."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        url = f"{self.url}{path}{query}"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as response:
                body = response.read(_MAX_RESPONSE_BYTES + 1)
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise JaegerError(f"cannot reach Jaeger at {self.url}: {reason}") from None
        if len(body) > _MAX_RESPONSE_BYTES:
            raise JaegerError(f"{url}: response larger than {_MAX_RESPONSE_BYTES} bytes")
        try:
            return json.loads(body)
        except ValueError:
            raise JaegerError(f"{url}: not a JSON answer (is this Jaeger's query port?)") from None

    def services(self) -> list[str]:
        return [str(s) for s in (self.get("/api/services") or {}).get("data") or []]

    def traces(
        self, service: str, limit: int = 100, lookback_s: int = 3600, end_s: float | None = None
    ) -> list[Trace]:
        """Up to ``limit`` traces with a span of ``service`` from the last ``lookback_s``."""
        end = int((time.time() if end_s is None else end_s) * 1e6)
        params: dict[str, str | int] = {
            "service": service,
            "limit": limit,
            "start": end - lookback_s * 1_000_000,
            "end": end,
        }
        return _traces(self.get("/api/traces", params))

    def trace(self, trace_id: str) -> Trace | None:
        """One trace by id; None when Jaeger has no such trace."""
        if not all(c in "0123456789abcdefABCDEF" for c in trace_id):
            raise ValueError(f"trace id {trace_id!r} is not hexadecimal")
        try:
            found = self.get(f"/api/traces/{trace_id}")
        except JaegerError:
            return None
        data = _traces(found)
        return data[0] if data else None

    def last(self, service: str, count: int) -> list[Trace]:
        """The newest ``count`` traces with a span of ``service``, oldest first."""
        now = time.time()
        found: list[Trace] = []
        for window in _WINDOWS_S:
            found = self.traces(service, max(_SEARCH_LIMIT, count), window, now)
            if len(found) >= count:
                break
        return sorted(found, key=trace_start)[-count:] if count > 0 else []


def _traces(answer: Any) -> list[Trace]:
    if not isinstance(answer, dict):
        raise JaegerError("unexpected answer from the query API")
    data = answer.get("data") or []
    if not isinstance(data, list):
        raise JaegerError("unexpected answer from the query API")
    return [t for t in data if isinstance(t, dict) and isinstance(t.get("spans"), list)]


def trace_start(trace: Trace) -> int:
    """The trace's first span start, microseconds since the epoch."""
    return min((int(s.get("startTime", 0)) for s in trace["spans"]), default=0)


@dataclass
class SpanNode:
    span: dict[str, Any]
    service: str
    tags: dict[str, Any]
    children: list[SpanNode] = field(default_factory=list)

    @property
    def start(self) -> int:
        return int(self.span.get("startTime", 0))


def span_tree(trace: Trace) -> list[SpanNode]:
    """The trace's root spans (those whose parent is not in the trace), children by start."""
    processes = trace.get("processes") or {}
    nodes: dict[str, SpanNode] = {}
    for span in trace["spans"]:
        process = processes.get(span.get("processID"), {})
        tags = {t.get("key"): t.get("value") for t in span.get("tags") or []}
        nodes[str(span.get("spanID"))] = SpanNode(span, str(process.get("serviceName", "?")), tags)
    roots: list[SpanNode] = []
    for node in nodes.values():
        parents = [
            str(r.get("spanID"))
            for r in node.span.get("references") or []
            if r.get("refType") == "CHILD_OF"
        ]
        parent = nodes.get(parents[0]) if parents else None
        (parent.children if parent is not None and parent is not node else roots).append(node)
    for node in nodes.values():
        node.children.sort(key=lambda n: n.start)
    return sorted(roots, key=lambda n: n.start)


def clean(value: Any, limit: int = _MAX_VALUE) -> str:
    """``value`` as one printable line: control characters escaped, long values cut."""
    text = str(value)
    out = "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )
    return out if len(out) <= limit else out[: limit - 1] + "…"


def _quoted(value: Any) -> str:
    text = clean(value)
    return f'"{text}"' if (" " in text or not text) else text


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _tokens(tags: dict[str, Any]) -> str | None:
    into, out = tags.get("gen_ai.usage.input_tokens"), tags.get("gen_ai.usage.output_tokens")
    if into is None and out is None:
        return None
    estimated = str(tags.get("switchyard.usage_estimated", "")).lower() == "true"
    tokens = f"{clean(into or '?')} in/{clean(out or '?')} out"
    return f"{tokens} (estimated)" if estimated else tokens


def _cost(tags: dict[str, Any]) -> str | None:
    cost = _number(tags.get("switchyard.cost_usd"))
    return None if cost is None else "$" + (f"{cost:.8f}".rstrip("0").rstrip(".") or "0")


def _plain(key: str) -> Callable[[dict[str, Any]], str | None]:
    return lambda tags: None if tags.get(key) in (None, "") else _quoted(tags[key])


def _excluded(tags: dict[str, Any]) -> str | None:
    raw = tags.get("switchyard.excluded")
    try:
        items = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        items = [raw]
    return _quoted("; ".join(str(i) for i in items)) if items else None


def _upstream_model(tags: dict[str, Any]) -> str | None:
    """The provider's model id: the response's (request span) or the decision's (route span)."""
    return _plain("gen_ai.response.model")(tags) or _plain("switchyard.upstream_model")(tags)


def _difficulty(tags: dict[str, Any]) -> str | None:
    value = _number(tags.get("switchyard.router.difficulty"))
    return None if value is None else f"{value:.2f}"


def _status(tags: dict[str, Any]) -> str | None:
    status = tags.get("http.status_code") or tags.get("http.response.status_code")
    error = tags.get("error.type")
    if status is None and error is None:
        return "error" if str(tags.get("error", "")).lower() == "true" else None
    return " ".join(clean(v) for v in (status, error) if v is not None)


# (label, how to read it from a span's tags), in printing order.
ATTRIBUTES: tuple[tuple[str, Callable[[dict[str, Any]], str | None]], ...] = (
    ("policy", _plain("switchyard.policy")),
    ("model", _plain("switchyard.model")),
    ("served", _plain("switchyard.served_model")),
    ("attempt", _plain("switchyard.upstream.model")),
    ("upstream", _upstream_model),
    ("reason", _plain("switchyard.reason")),
    ("category", _plain("switchyard.router.category")),
    ("difficulty", _difficulty),
    ("excluded", _excluded),
    ("tokens", _tokens),
    ("cost", _cost),
    ("status", _status),
)


_PER_SPAN = {"status"}  # printed on every span that has it, even when its parent's is the same


def _attributes(node: SpanNode, shown: dict[str, str]) -> list[str]:
    out = []
    tags = node.tags
    if "switchyard.served_model" in tags:
        tags = {k: v for k, v in tags.items() if k != "switchyard.upstream.model"}
    for label, read in ATTRIBUTES:
        value = read(tags)
        if value is not None and (label in _PER_SPAN or shown.get(label) != value):
            out.append(f"{label}={value}")
            shown[label] = value
    return out


def _duration(span: dict[str, Any]) -> str:
    micros = int(span.get("duration", 0))
    return f"{micros / 1000:.1f} ms" if micros < 10_000_000 else f"{micros / 1e6:.2f} s"


def _lines(node: SpanNode, prefix: str, last: bool, top: bool, shown: dict[str, str]) -> list[str]:
    shown = dict(shown)
    branch = "" if top else ("└─ " if last else "├─ ")
    head = (
        f"{prefix}{branch}{clean(node.span.get('operationName', '?'))} "
        f"[{clean(node.service)}] {_duration(node.span)}"
    )
    attributes = _attributes(node, shown)
    lines = [head + ("  " + " ".join(attributes) if attributes else "")]
    below = prefix if top else prefix + ("   " if last else "│  ")
    for i, child in enumerate(node.children):
        lines += _lines(child, below, i == len(node.children) - 1, False, shown)
    return lines


def _request(roots: list[SpanNode]) -> str:
    """``POST /v1/chat/completions 200`` from the request's (ingress) span, where it has one."""
    for root in roots:
        tags = root.tags
        if "http.method" in tags:
            path = urllib.parse.urlsplit(str(tags.get("http.url", ""))).path
            parts = (tags.get("http.method"), path, tags.get("http.status_code"))
            return "  " + " ".join(clean(p) for p in parts if p)
    return ""


def render_trace(trace: Trace, tz: Any = None) -> str:
    """One trace as a header line and an indented span tree."""
    roots = span_tree(trace)
    started = datetime.fromtimestamp(trace_start(trace) / 1e6, tz).strftime("%Y-%m-%d %H:%M:%S")
    duration = max(int(s.get("startTime", 0)) + int(s.get("duration", 0)) for s in trace["spans"])
    total = _duration({"duration": duration - trace_start(trace)})
    lines = [f"trace {clean(trace.get('traceID', '?'))}  {started}{_request(roots)}  {total}"]
    for root in roots:
        lines += _lines(root, "  ", True, True, {})
    return "\n".join(lines)


def render(traces: Iterable[Trace], tz: Any = None) -> str:
    """Traces, oldest first, a blank line between them."""
    return "\n\n".join(render_trace(t, tz) for t in sorted(traces, key=trace_start))


def run_traces(url: str, service: str, count: int) -> int:
    """Print the last ``count`` traces of ``service``; 0, or 1 when Jaeger cannot be read."""
    import sys

    query = JaegerQuery(url)
    try:
        traces = query.last(service, count)
        if not traces:
            services = query.services()
            hint = (
                f"services with traces: {', '.join(services)}"
                if services
                else "no service has sent traces yet (spans arrive within about 5 s)"
            )
            print(f"switchyard: no traces of service {service!r} at {url}; {hint}", file=sys.stderr)
            return 1
    except JaegerError as exc:
        print(f"switchyard: {exc}", file=sys.stderr)
        return 1
    print(render(traces), flush=True)
    return 0
