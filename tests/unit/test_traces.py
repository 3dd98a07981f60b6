"""`switchyard traces`: span trees rendered from a recorded Jaeger answer (three requests of a
real `switchyard up --jaeger` run: a routed one, one that failed over, one refused), and the
newest-N search against a query API that returns traces in no particular order."""

from __future__ import annotations

import copy
import http.server
import json
import threading
import urllib.parse
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest

from switchyard.traces import JaegerError, JaegerQuery, clean, render, render_trace, span_tree

RECORDED = Path(__file__).parent / "testdata" / "jaeger" / "traces.json"

EXPECTED = """\
trace 35790066b0b9e0af2f4c11aae66462c8  2026-11-30 08:23:26  POST /v1/chat/completions 200  5.9 ms
  ingress [switchyard] 5.9 ms  policy=default/default model=light served=light \
upstream=demo-light-8b reason="classifier: difficulty 0.14 <= 0.16 (knowledge)" \
tokens=8 in/15 out cost=$0.0000016 status=200
  ├─ async envoy.service.ext_proc.v3.ExternalProcessor.Process egress [switchyard] 5.3 ms
  │  └─ switchyard.route [switchyard-extproc] 1.3 ms  category=knowledge difficulty=0.14
  └─ router default.default.light egress [switchyard] 1.3 ms  attempt=light status=200

trace 1f24370a551ad1a5c6dabb8e13573bea  2026-11-30 08:23:26  POST /v1/chat/completions 200  20.9 ms
  ingress [switchyard] 20.7 ms  policy=default/default model=flaky served=light \
upstream=demo-light-8b reason="direct: model named in request" tokens=2 in/9 out \
cost=$0.00000082 status=200
  ├─ async envoy.service.ext_proc.v3.ExternalProcessor.Process egress [switchyard] 20.6 ms
  │  └─ switchyard.route [switchyard-extproc] 0.3 ms  upstream=flaky-v1
  ├─ router default.default.flaky~fallbacks egress [switchyard] 1.3 ms  attempt=flaky status=503
  └─ router default.default.flaky~fallbacks egress [switchyard] 1.4 ms  attempt=light status=200

trace da7a5cccfc2abeb8551a0171cf32357c  2026-11-30 08:23:26  POST /v1/chat/completions 404  1.8 ms
  ingress [switchyard] 1.8 ms  status=404
  └─ async envoy.service.ext_proc.v3.ExternalProcessor.Process egress [switchyard] 1.4 ms
     └─ switchyard.route [switchyard-extproc] 0.1 ms  status=404 model_not_found"""


def _recorded() -> list[dict[str, Any]]:
    return list(json.loads(RECORDED.read_text())["data"])


def test_recorded_traces_render_as_span_trees() -> None:
    # the answer lists them newest first; the rendering is oldest first, like a log
    assert render(_recorded(), UTC) == EXPECTED


def test_the_route_span_hangs_under_envoys_ext_proc_call() -> None:
    routed = next(t for t in _recorded() if t["traceID"].startswith("3579"))
    (root,) = span_tree(routed)
    assert root.span["operationName"] == "ingress"
    ext_proc, attempt = root.children
    assert "ExternalProcessor.Process" in ext_proc.span["operationName"]
    assert [c.span["operationName"] for c in ext_proc.children] == ["switchyard.route"]
    assert ext_proc.children[0].service == "switchyard-extproc"
    assert attempt.tags["switchyard.upstream.model"] == "light"


def test_a_span_whose_parent_is_missing_is_a_root() -> None:
    trace = copy.deepcopy(next(t for t in _recorded() if t["traceID"].startswith("1f24")))
    trace["spans"] = [s for s in trace["spans"] if s["operationName"] != "ingress"]
    roots = span_tree(trace)  # the ext_proc call and both attempts; the route span stays a child
    assert [r.span["operationName"].split()[0] for r in roots] == ["async", "router", "router"]
    assert "switchyard.route" in render_trace(trace, UTC)


def test_only_named_attributes_are_shown_and_escaped() -> None:
    trace = copy.deepcopy(_recorded()[0])
    ingress = next(s for s in trace["spans"] if s["operationName"] == "ingress")
    ingress["tags"] += [
        {"key": "gen_ai.prompt", "type": "string", "value": "a secret prompt"},
        {"key": "switchyard.reason", "type": "string", "value": "\x1b[2Jowned\nline"},
    ]
    text = render_trace(trace, UTC)
    assert "secret" not in text
    assert "\x1b" not in text and "\\x1b[2Jowned\\nline" in text
    assert clean("x" * 500).endswith("…") and len(clean("x" * 500)) == 120


class _FakeJaeger(http.server.BaseHTTPRequestHandler):
    """Answers /api/traces with every trace in the window, in the order it was given."""

    traces: list[dict[str, Any]] = []
    seen: list[dict[str, list[str]]] = []

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        params = urllib.parse.parse_qs(url.query)
        self.seen.append(params)
        if url.path == "/api/traces":
            start, end = int(params["start"][0]), int(params["end"][0])
            found = [t for t in self.traces if start <= t["spans"][0]["startTime"] <= end]
            body = json.dumps({"data": found[: int(params["limit"][0])]}).encode()
        else:
            body = b"<html>not json</html>"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake_jaeger() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeJaeger)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_last_finds_the_newest_whatever_order_the_api_answers_in(fake_jaeger: str) -> None:
    import time

    now = int(time.time() * 1e6)
    ages_s = [30, 5, 2000, 1, 8]  # seconds old, unsorted
    _FakeJaeger.traces = [
        {"traceID": f"{age:032x}", "spans": [{"spanID": "1", "startTime": now - age * 10**6}]}
        for age in ages_s
    ]
    _FakeJaeger.seen = []
    last = JaegerQuery(fake_jaeger).last("switchyard", 3)
    assert [int(t["traceID"], 16) for t in last] == [8, 5, 1]  # oldest first
    # the 10 s window held all three: one query
    assert [p["service"] for p in _FakeJaeger.seen] == [["switchyard"]]
    assert [int(t["traceID"], 16) for t in JaegerQuery(fake_jaeger).last("s", 4)] == [30, 8, 5, 1]


def test_a_port_that_is_not_jaeger_is_reported(fake_jaeger: str) -> None:
    with pytest.raises(JaegerError, match="not a JSON answer"):
        JaegerQuery(fake_jaeger).services()
    with pytest.raises(JaegerError, match="cannot reach Jaeger"):
        JaegerQuery("http://127.0.0.1:1").services()
