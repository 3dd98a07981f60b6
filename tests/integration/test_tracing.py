"""One trace per request across the real Envoy and the ext_proc, stored by a real Jaeger (built
from the Go module proxy by tests/infra/build_jaeger.sh) and read back from its query API."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import pytest
import yaml
from gateway_harness import REPO, Gateway, start_gateway

from switchyard.local.ports import free_port_block

SECRET = "zebra-quartz-7731"  # in every prompt; must appear in no span
PROMPT = f"Prove step by step that {SECRET} is a theorem, then implement it in python."


class Jaeger:
    """A running Jaeger: OTLP/gRPC in on ``otlp_port``, its HTTP query API on ``query_port``."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.otlp_port, self.query_port, grpc_port = free_port_block(3), 0, 0
        self.query_port, grpc_port = self.otlp_port + 1, self.otlp_port + 2
        config = {
            "service": {
                "extensions": ["jaeger_storage", "jaeger_query"],
                "pipelines": {
                    "traces": {"receivers": ["otlp"], "exporters": ["jaeger_storage_exporter"]}
                },
                "telemetry": {"metrics": {"level": "none"}, "logs": {"level": "warn"}},
            },
            "extensions": {
                "jaeger_storage": {"backends": {"memstore": {"memory": {"max_traces": 10000}}}},
                "jaeger_query": {
                    "storage": {"traces": "memstore"},
                    "http": {"endpoint": f"127.0.0.1:{self.query_port}"},
                    "grpc": {"endpoint": f"127.0.0.1:{grpc_port}"},
                },
            },
            "receivers": {
                "otlp": {"protocols": {"grpc": {"endpoint": f"127.0.0.1:{self.otlp_port}"}}}
            },
            "exporters": {"jaeger_storage_exporter": {"trace_storage": "memstore"}},
        }
        path = directory / "jaeger.yaml"
        path.write_text(yaml.safe_dump(config))
        self.log = (directory / "jaeger.log").open("wb")
        self.process = subprocess.Popen(
            [binary, "--config", f"file:{path}"], stdout=self.log, stderr=subprocess.STDOUT
        )
        self.wait(lambda: self.get("/api/services") is not None, "the Jaeger query API")

    def get(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.query_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError):
            assert self.process.poll() is None, f"jaeger exited with {self.process.returncode}"
            return None

    def traces(self, service: str) -> list[dict[str, Any]]:
        found = self.get(f"/api/traces?service={service}&limit=100&lookback=1h")
        return list((found or {}).get("data") or [])

    def trace(self, trace_id: str) -> dict[str, Any] | None:
        found = self.get(f"/api/traces/{trace_id}")
        data = (found or {}).get("data") or []
        return data[0] if data else None

    def wait(self, condition: Any, what: str, timeout: float = 30) -> Any:
        """Poll until ``condition()`` is truthy (spans arrive by batches, on their own time)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = condition()
            if result:
                return result
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def jaeger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jaeger]:
    built = subprocess.run(
        ["bash", str(REPO / "tests" / "infra" / "build_jaeger.sh")],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert built.returncode == 0, built.stderr
    running = Jaeger(built.stdout.strip().splitlines()[-1], tmp_path_factory.mktemp("jaeger"))
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
        {
            "name": name,
            "backend": {"url": f"http://127.0.0.1:{port}"},
            "upstreamModel": f"{name}-v1",
            "pricing": {"inputPer1M": 1, "outputPer1M": 2},
            **({"fallbacks": ["steady"]} if name == "failing" else {}),
        }
        for name, port in ports.items()
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
