"""Tracing in the ext_proc (the span, the traceparent hook) and Envoy's tracer config."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import grpc
import orjson
import pytest
import yaml
from conftest import EXAMPLE
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from test_processor import body_msg, state_for

from switchyard.api.v1 import routing_pb2 as pb
from switchyard.extproc.h2grpc import GrpcConnection
from switchyard.extproc.processor import Processor
from switchyard.extproc.state import RuntimeState
from switchyard.extproc.tracing import RouteTracer, from_environment, parent_context
from switchyard.local import runner
from switchyard.local.documents import LocalGatewaySpec
from switchyard.operator import tracing as envoy_tracing
from switchyard.operator.envoy_config import GatewaySettings, build_clusters, build_listener
from switchyard.operator.policy import PolicyError
from switchyard.operator.tracing import TraceSettings

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
PROMPT = "Prove rigorously, step by step, that the secret phrase zebra-quartz is a theorem."


def traceparent(flags: str = "01") -> str:
    return f"00-{TRACE_ID}-{PARENT_ID}-{flags}"


def test_parent_context_is_the_sampled_remote_parent() -> None:
    context = parent_context(traceparent())
    assert context is not None
    parent = trace.get_current_span(context).get_span_context()
    assert (parent.trace_id, parent.span_id) == (int(TRACE_ID, 16), int(PARENT_ID, 16))
    assert parent.is_remote and parent.trace_flags.sampled


@pytest.mark.parametrize(
    "value",
    [
        traceparent("00"),  # not sampled: no span at all
        "00-" + "0" * 32 + f"-{PARENT_ID}-01",
        f"00-{TRACE_ID}-{'0' * 16}-01",
        f"ff-{TRACE_ID}-{PARENT_ID}-01",
        f"00-{TRACE_ID}-{PARENT_ID}-01-extra",
        f"00-{TRACE_ID[:-1]}x-{PARENT_ID}-01",
        "garbage",
    ],
)
def test_parent_context_refuses_unsampled_and_malformed(value: str) -> None:
    assert parent_context(value) is None


def test_tracing_is_off_without_an_endpoint_or_with_an_off_sampler() -> None:
    assert from_environment({}) is None
    on = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}
    assert from_environment({**on, "OTEL_TRACES_SAMPLER": "always_off"}) is None
    assert from_environment({**on, "OTEL_SDK_DISABLED": "true"}) is None
    assert Processor(state_for_example()).on_headers is None


def state_for_example() -> RuntimeState:
    return state_for(yaml.safe_load(EXAMPLE.read_text()))


def _tracer() -> tuple[RouteTracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracer = from_environment({"OTEL_SERVICE_NAME": "sy-test"}, exporter=exporter)
    assert tracer is not None
    return tracer, exporter


async def _route(tracer: RouteTracer, parent: str | None, body: dict[str, Any]) -> None:
    processor = Processor(state_for_example(), tracer)
    stream = processor.open()
    headers = [(":path", "/envoy.service.ext_proc.v3.ExternalProcessor/Process")]
    if parent is not None:
        headers.append(("traceparent", parent))
    assert processor.on_headers is not None
    processor.on_headers(stream, headers)
    message = body_msg(orjson.dumps(body))
    message.attributes["envoy.filters.http.ext_proc"].fields[
        "request.path"
    ].string_value = "/v1/chat/completions"
    await processor.message(stream, message.SerializeToString())


def _spans(tracer: RouteTracer, exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    assert tracer.provider.force_flush()
    return list(exporter.get_finished_spans())


async def test_route_span_is_a_child_of_envoys_span_with_the_decision() -> None:
    tracer, exporter = _tracer()
    body = {"model": "auto", "messages": [{"role": "user", "content": PROMPT}]}
    await _route(tracer, traceparent(), body)
    (span,) = _spans(tracer, exporter)
    assert span.name == "switchyard.route"
    assert span.context is not None and span.parent is not None
    assert span.context.trace_id == int(TRACE_ID, 16)
    assert span.parent.span_id == int(PARENT_ID, 16)
    assert span.resource.attributes["service.name"] == "sy-test"
    attrs = dict(span.attributes or {})
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == "auto"
    assert attrs["switchyard.policy"] == "default/default"
    assert str(attrs["switchyard.reason"]).startswith("classifier")
    assert attrs["switchyard.model"] in attrs["switchyard.candidates"]  # type: ignore[operator]
    assert list(attrs["switchyard.candidates"]) == ["light", "standard", "capable"]  # type: ignore[arg-type]
    assert 0 <= float(attrs["switchyard.router.difficulty"]) <= 1  # type: ignore[arg-type]
    assert attrs["switchyard.router.category"]
    assert float(attrs["switchyard.classifier.duration_ms"]) >= 0  # type: ignore[arg-type]
    assert "gen_ai.provider.name" not in attrs  # demo upstreams: no known provider
    assert not any("zebra" in str(v) for v in attrs.values())


async def test_excluded_models_say_why() -> None:
    tracer, exporter = _tracer()
    body = {
        "model": "auto",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 100_000,
    }
    await _route(tracer, traceparent(), body)
    (span,) = _spans(tracer, exporter)
    excluded = list((span.attributes or {})["switchyard.excluded"])  # type: ignore[arg-type]
    assert excluded and all("context window" in e for e in excluded), excluded


async def test_rejected_request_ends_the_span_with_the_error() -> None:
    tracer, exporter = _tracer()
    await _route(tracer, traceparent(), {"model": "nope", "messages": [{"role": "user"}]})
    (span,) = _spans(tracer, exporter)
    assert (span.attributes or {})["error.type"] == "model_not_found"
    assert not span.status.is_ok


async def test_unsampled_or_untraced_requests_make_no_span() -> None:
    tracer, exporter = _tracer()
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
    await _route(tracer, traceparent("00"), body)
    await _route(tracer, None, body)
    assert _spans(tracer, exporter) == []


class _Recorder:
    """A handler that wants request headers (like the processor when tracing)."""

    def __init__(self) -> None:
        self.seen: list[list[tuple[str, str]]] = []

    def open(self) -> dict[str, Any]:
        return {}

    def on_headers(self, state: dict[str, Any], headers: list[tuple[str, str]]) -> None:
        state["headers"] = headers
        self.seen.append(headers)

    async def message(self, state: dict[str, Any], payload: bytes) -> tuple[bytes, bool]:
        return dict(state["headers"]).get("traceparent", "").encode(), True


async def test_h2_layer_hands_request_headers_to_a_handler_that_wants_them() -> None:
    handler = _Recorder()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: GrpcConnection("/t.S/M", handler), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/t.S/M", lambda b: b, lambda b: b)
        reply = await call(b"x", metadata=(("traceparent", traceparent()),))
    assert reply == traceparent().encode()
    assert len(handler.seen) == 1


def test_envoy_tracer_only_with_an_endpoint() -> None:
    config = pb.RoutingConfig()
    off = GatewaySettings()
    on = GatewaySettings(otlp_endpoint="otel.example:4317", trace_sampling=0.01)
    assert not _hcm(build_listener(config, off)).HasField("tracing")
    tracing = _hcm(build_listener(config, on)).tracing
    assert tracing.random_sampling.value == pytest.approx(1.0)
    assert tracing.provider.name == "envoy.tracers.opentelemetry"
    names = [c.name for c in build_clusters(config, on)]
    assert envoy_tracing.COLLECTOR_CLUSTER in names
    assert envoy_tracing.COLLECTOR_CLUSTER not in [c.name for c in build_clusters(config, off)]


def _hcm(listener: Any) -> Any:
    hcm = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    return hcm


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, TraceSettings("doc:4317", 0.5, "doc")),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_SERVICE_NAME": "gw"},
            TraceSettings("http://c:4317", 0.5, "gw"),
        ),
        ({"OTEL_TRACES_SAMPLER": "always_on"}, TraceSettings("doc:4317", 1.0, "doc")),
        ({"OTEL_TRACES_SAMPLER": "parentbased_always_off"}, TraceSettings("doc:4317", 0.0, "doc")),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"},
            TraceSettings("doc:4317", 0.01, "doc"),
        ),
    ],
)
def test_otel_environment_overrides_the_document(
    env: dict[str, str], expected: TraceSettings
) -> None:
    assert envoy_tracing.from_environment(TraceSettings("doc:4317", 0.5, "doc"), env) == expected


@pytest.mark.parametrize(
    "env",
    [
        {"OTEL_TRACES_SAMPLER": "jaeger_remote"},
        {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"},
        {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "x"},
    ],
)
def test_unsupported_samplers_are_refused(env: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="OTEL_TRACES_SAMPLER"):
        envoy_tracing.from_environment(TraceSettings(), env)


def test_collector_addresses() -> None:
    assert envoy_tracing.collector_address("otel:4317") == ("otel", 4317, False)
    assert envoy_tracing.collector_address("http://10.0.0.1:4318") == ("10.0.0.1", 4318, False)
    assert envoy_tracing.collector_address("https://otel.example") == ("otel.example", 443, True)
    with pytest.raises(ValueError):
        envoy_tracing.collector_address("ftp://otel:21")


def test_local_mode_reads_the_document_then_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in [n for n in os.environ if n.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    doc = {"tracing": {"otlpEndpoint": "127.0.0.1:4317", "samplingRatio": 0.25}}
    spec = LocalGatewaySpec.model_validate(doc)
    traces = runner._trace_settings(spec)
    assert traces == TraceSettings("127.0.0.1:4317", 0.25, "switchyard")
    env = runner._extproc_environment(traces)
    assert env is not None and env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://127.0.0.1:4317"
    assert env["OTEL_SERVICE_NAME"] == "switchyard-extproc"
    assert runner._extproc_environment(runner._trace_settings(LocalGatewaySpec())) is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector.example:4317")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.01")
    traces = runner._trace_settings(spec)
    assert traces == TraceSettings("https://collector.example:4317", 0.01, "switchyard")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://nope")
    with pytest.raises(PolicyError, match="tracing"):
        runner._trace_settings(spec)
