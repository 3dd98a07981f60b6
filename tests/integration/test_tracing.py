"""One trace per request across the real Envoy and the ext_proc, stored by a real Jaeger (built
from the Go module proxy by switchyard/local/build_jaeger.sh) and read back from its query API;
and `switchyard up --jaeger` with `switchyard traces` as a person runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import pytest
from gateway_harness import REPO, Gateway, start_gateway, url_model

from switchyard.local.jaeger import JaegerPorts, LocalJaeger, jaeger_binary, running_url
from switchyard.local.ports import free_port_block
from switchyard.traces import JaegerError, JaegerQuery

SECRET = "zebra-quartz-7731"  # in every prompt; must appear in no span
CLI = (sys.executable, "-m", "switchyard.cli")
PROMPT = f"Prove step by step that {SECRET} is a theorem, then implement it in python."


def wait(condition: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    """Poll until ``condition()`` is truthy (spans arrive by batches, on their own time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Jaeger:
    """A running Jaeger (the product's LocalJaeger): OTLP/gRPC in on ``otlp_port``."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.local = LocalJaeger(directory, JaegerPorts.pick())
        self.local.start(binary)
        self.query = JaegerQuery(self.local.url)
        self.otlp_port = self.local.ports.otlp
        wait(self.local.ready, "the Jaeger query API")

    def traces(self, service: str) -> list[dict[str, Any]]:
        assert self.local.exited() is None, f"jaeger exited: {self.local.log_tail()}"
        return self.query.traces(service, limit=100, lookback_s=3600)

    def trace(self, trace_id: str) -> dict[str, Any] | None:
        return self.query.trace(trace_id)

    def wait(self, condition: Any, what: str, timeout: float = 30) -> Any:
        return wait(condition, what, timeout)

    def stop(self) -> None:
        self.local.stop()


@pytest.fixture(scope="module")
def jaeger_bin() -> str:
    return jaeger_binary(print)  # builds it (minutes) when the cache has none


@pytest.fixture(scope="module")
def jaeger(jaeger_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jaeger]:
    running = Jaeger(jaeger_bin, tmp_path_factory.mktemp("jaeger"))
    yield running
    running.stop()


def _traced_gateway(directory: Path, jaeger: Jaeger, service: str, ratio: float) -> Gateway:
    """A local gateway exporting to ``jaeger``, OTEL_* cleared so the document alone configures
    tracing. The ext_proc's spans leave only when it stops (its export delay is an hour, and
    stopping flushes it): once the gateway has stopped, every span the ext_proc made is in
    Jaeger, so a test can also tell that a span was not made."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["OTEL_BSP_SCHEDULE_DELAY"] = "3600000"
    tracing = {
        "otlpEndpoint": f"127.0.0.1:{jaeger.otlp_port}",
        "samplingRatio": ratio,
        "serviceName": service,
    }
    with mock.patch.dict(os.environ, env, clear=True):
        return start_gateway(directory, tracing=tracing)


def _chat(gateway: Gateway) -> httpx.Response:
    body = {"model": "auto", "messages": [{"role": "user", "content": PROMPT}]}
    response = httpx.post(f"{gateway.base_url}/chat/completions", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response


def _tags(span: dict[str, Any]) -> dict[str, Any]:
    return {t["key"]: t["value"] for t in span.get("tags", [])}


def _service(trace: dict[str, Any], span: dict[str, Any]) -> str:
    return str(trace["processes"][span["processID"]]["serviceName"])


def _route_spans(trace: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in trace["spans"] if s["operationName"] == "switchyard.route"]


def _stop(gateway: Gateway) -> None:
    assert gateway.stop() == 0, "".join(gateway.output)


def test_envoy_and_extproc_spans_form_one_trace(
    tmp_path_factory: pytest.TempPathFactory, jaeger: Jaeger
) -> None:
    gateway = _traced_gateway(tmp_path_factory.mktemp("traced"), jaeger, "sy-all", 1.0)
    try:
        response = _chat(gateway)
        # Envoy exports on its own timer; the ext_proc's span waits for the stop.
        (envoy_trace,) = jaeger.wait(lambda: jaeger.traces("sy-all"), "Envoy's spans")
        assert not _route_spans(envoy_trace)
    finally:
        _stop(gateway)
    trace = jaeger.trace(envoy_trace["traceID"])
    assert trace is not None
    (route,) = _route_spans(trace)
    spans = {s["spanID"]: s for s in trace["spans"]}
    # parent and child, one trace id: the route span's parent is Envoy's span of its ext_proc
    # call, whose traceparent the ext_proc read; that span is the request's (ingress) child
    (ref,) = [r for r in route["references"] if r["refType"] == "CHILD_OF"]
    assert ref["traceID"] == route["traceID"] == trace["traceID"]
    parent = spans[ref["spanID"]]
    assert _service(trace, parent) == "sy-all"
    assert _service(trace, route) == "sy-all-extproc"
    assert "ExternalProcessor.Process" in parent["operationName"]
    (grand,) = [r for r in parent["references"] if r["refType"] == "CHILD_OF"]
    assert spans[grand["spanID"]]["operationName"] == "ingress"
    assert all(s["traceID"] == trace["traceID"] for s in trace["spans"])
    tags = _tags(route)
    assert tags["gen_ai.operation.name"] == "chat"
    assert tags["gen_ai.request.model"] == "auto"
    assert tags["switchyard.policy"] == response.headers["x-switchyard-policy"]
    assert tags["switchyard.reason"] == response.headers["x-switchyard-reason"]
    assert tags["switchyard.model"] == response.headers["x-switchyard-model"]
    assert set(json.loads(tags["switchyard.candidates"])) == {"light", "standard", "capable"}
    assert 0 <= tags["switchyard.router.difficulty"] <= 1
    assert tags["switchyard.router.category"]
    assert tags["switchyard.classifier.duration_ms"] >= 0
    # the request's span carries the usage and cost read from the response
    ingress = _tags(spans[grand["spanID"]])
    usage = response.json()["usage"]
    assert int(ingress["gen_ai.usage.input_tokens"]) == usage["prompt_tokens"]
    assert int(ingress["gen_ai.usage.output_tokens"]) == usage["completion_tokens"]
    assert ingress["gen_ai.response.model"] == response.headers["x-switchyard-upstream-model"]
    assert ingress["switchyard.served_model"] == response.headers["x-switchyard-model"]
    assert float(ingress["switchyard.cost_usd"]) > 0
    # the prompt text is in no span of the trace, Envoy's or ours
    for span in trace["spans"]:
        for key, value in _tags(span).items():
            assert SECRET not in str(value), (span["operationName"], key)


def test_sampling_zero_makes_no_extproc_span(
    tmp_path_factory: pytest.TempPathFactory, jaeger: Jaeger
) -> None:
    gateway = _traced_gateway(tmp_path_factory.mktemp("untraced"), jaeger, "sy-none", 0.0)
    try:
        for _ in range(3):
            _chat(gateway)  # Envoy samples none: its ext_proc call's traceparent says so
    finally:
        _stop(gateway)  # the ext_proc has flushed: a span it made would be in Jaeger now
    assert jaeger.traces("sy-none-extproc") == []


def test_a_fallback_shows_both_attempts(
    tmp_path_factory: pytest.TempPathFactory, jaeger: Jaeger
) -> None:
    first = free_port_block(2)
    ports = {"failing": first, "steady": first + 1}
    models = [
        url_model("failing", ports["failing"], (1, 2), fallbacks=["steady"]),
        url_model("steady", ports["steady"], (1, 2)),
    ]
    policy = {
        "apiVersion": "switchyard.dev/v1alpha1",
        "kind": "RoutePolicy",
        "metadata": {"name": "resilient", "namespace": "default"},
        "spec": {
            "match": {"models": ["auto"]},
            "models": models,
            "strategy": {"type": "rules", "default": "failing"},
        },
    }
    demo = [
        {"name": "failing", "port": ports["failing"], "failureRate": 1.0},
        {"name": "steady", "port": ports["steady"]},
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    tracing = {"otlpEndpoint": f"127.0.0.1:{jaeger.otlp_port}", "serviceName": "sy-fallback"}
    with mock.patch.dict(os.environ, env, clear=True):
        gateway = start_gateway(
            tmp_path_factory.mktemp("fallback"), policy, demoUpstreams=demo, tracing=tracing
        )
    try:
        body = {"model": "failing", "messages": [{"role": "user", "content": "hello"}]}
        response = httpx.post(f"{gateway.base_url}/chat/completions", json=body, timeout=30)
        assert response.status_code == 200, response.text
        assert response.headers["x-switchyard-model"] == "steady"
        (trace,) = jaeger.wait(lambda: jaeger.traces("sy-fallback"), "Envoy's spans")
    finally:
        _stop(gateway)
    attempts = sorted(
        (s for s in trace["spans"] if s["operationName"].startswith("router ")),
        key=lambda s: s["startTime"],
    )
    assert [_tags(s)["switchyard.upstream.model"] for s in attempts] == ["failing", "steady"]
    assert [_tags(s)["http.status_code"] for s in attempts] == ["503", "200"]
    (ingress,) = [s for s in trace["spans"] if s["operationName"] == "ingress"]
    tags = _tags(ingress)
    assert (tags["switchyard.model"], tags["switchyard.served_model"]) == ("failing", "steady")
    usage = response.json()["usage"]
    assert int(tags["gen_ai.usage.output_tokens"]) == usage["completion_tokens"]
    cost = (usage["prompt_tokens"] * 1 + usage["completion_tokens"] * 2) / 1e6
    assert float(tags["switchyard.cost_usd"]) == pytest.approx(cost)


def test_switchyard_traces_shows_the_last_request(
    tmp_path_factory: pytest.TempPathFactory, jaeger_bin: str
) -> None:
    """`switchyard up --jaeger` (here: its document form), one request, then
    `switchyard traces --last 1` finds that Jaeger through the state dir and prints the tree."""
    directory = tmp_path_factory.mktemp("jaeger-up")
    state = directory / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["SWITCHYARD_JAEGER"] = jaeger_bin
    with mock.patch.dict(os.environ, env, clear=True):
        gateway = start_gateway(directory, tracing={"jaeger": True, "jaegerPort": 0})
    try:
        banner = gateway.wait_for_output("go to Jaeger")
        url = running_url(state)
        assert url is not None and f"on {url} " in banner
        response = _chat(gateway)

        def printed() -> str | None:
            shown = subprocess.run(
                [*CLI, "traces", "--last", "1", "--state-dir", str(state)],
                capture_output=True,
                text=True,
                timeout=30,
                cwd=REPO,
            )
            out = shown.stdout
            return out if "switchyard.route" in out and "router " in out else None

        # a sampled request's spans reach Jaeger within about a second (--jaeger's flush)
        text = wait(printed, "the span tree", 30)
    finally:
        _stop(gateway)
    header, ingress, call, route, attempt = text.splitlines()
    model = response.headers["x-switchyard-model"]
    usage = response.json()["usage"]
    assert header.startswith("trace ") and "POST /v1/chat/completions 200" in header
    assert ingress.startswith("  ingress [switchyard] ")
    for shown in (
        f"policy={response.headers['x-switchyard-policy']}",
        f"model={model}",
        f"served={model}",
        f"upstream={response.headers['x-switchyard-upstream-model']}",
        f"tokens={usage['prompt_tokens']} in/{usage['completion_tokens']} out",
        "cost=$0.",
        "status=200",
    ):
        assert shown in ingress, (shown, ingress)
    assert call.startswith("  ├─ ") and "ExternalProcessor.Process" in call
    assert route.startswith("  │  └─ switchyard.route [switchyard-extproc] ")
    assert "difficulty=" in route and "category=" in route
    assert attempt.startswith("  └─ router ") and f"attempt={model} status=200" in attempt
    assert SECRET not in text
    # stopped with the gateway: no record left, nothing answering
    assert running_url(state) is None
    with pytest.raises(JaegerError):
        JaegerQuery(url).services()
