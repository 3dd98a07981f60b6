"""The ext_proc's part of a request's trace: a ``switchyard.route`` span per routed request,
the child of the span on Envoy's ext_proc call (the W3C ``traceparent`` of that gRPC stream).

Off (no OTLP endpoint in the environment) nothing here runs per request: the HTTP/2 layer
hands a stream's request headers over only to a handler with an ``on_headers`` hook, and the
processor has one only with a tracer. On, a span is made only for a trace Envoy sampled (the
flag in ``traceparent``); the SDK's BatchSpanProcessor exports spans on its own thread.
Prompt text is never recorded: the span carries names, numbers and reasons only.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)

from switchyard.extproc.config import CompiledConfig, CompiledPolicy, ModelRoute
from switchyard.extproc.engine import Decision, exclusions
from switchyard.extproc.errors import GatewayError
from switchyard.extproc.request import Endpoint, ParsedRequest
from switchyard.extproc.scoring import RouterScores, Scorer
from switchyard.extproc.semantic import Embedder

SPAN_NAME = "switchyard.route"
DEFAULT_SERVICE = "switchyard-extproc"
_OPERATIONS = {Endpoint.CHAT: "chat", Endpoint.COMPLETIONS: "text_completion"}
_OFF = ("always_off", "parentbased_always_off")


def parent_context(traceparent: str) -> Context | None:
    """The remote parent a W3C ``traceparent`` names; None when malformed or not sampled."""
    parts = traceparent.strip().split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or len(parts[2]) != 16 or len(parts[3]) != 2:
        return None
    if len(parts[0]) != 2 or parts[0] == "ff" or (parts[0] == "00" and len(parts) != 4):
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    if not trace_id or not span_id or not flags & TraceFlags.SAMPLED:
        return None
    parent = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags))
    return trace.set_span_in_context(NonRecordingSpan(parent))


class RouteTracer:
    """Starts ``switchyard.route`` spans for the streams whose headers carry a sampled trace."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("switchyard.extproc")

    def on_headers(self, stream: Any, headers: list[tuple[str, str]]) -> None:
        """A new stream's request headers (the HTTP/2 layer's hook): keep its trace parent."""
        for name, value in headers:
            if name == "traceparent":
                stream.trace = parent_context(value)
                return

    def start(self, parent: Context, endpoint: Endpoint) -> RouteSpan:
        span = self.tracer.start_span(SPAN_NAME, context=parent, kind=SpanKind.SERVER)
        span.set_attribute("gen_ai.operation.name", _OPERATIONS[endpoint])
        return RouteSpan(span)

    def shutdown(self) -> None:
        """Export what is queued, then stop the exporter's thread."""
        self.provider.shutdown()


class RouteSpan:
    """One request's ``switchyard.route`` span, filled in as routing learns things."""

    __slots__ = ("span",)

    def __init__(self, span: trace.Span) -> None:
        self.span = span

    async def score(
        self, scorer: Scorer, prompt: str, embedder: Embedder | None = None
    ) -> RouterScores:
        """Score with ``scorer`` (and ``embedder``), recording how long the classifier took."""
        started = time.perf_counter()
        if embedder is None:
            scores = await scorer.score(prompt)
        else:
            scores = await scorer.score(prompt, embedder)
        elapsed = (time.perf_counter() - started) * 1000.0
        self.span.set_attribute("switchyard.classifier.duration_ms", round(elapsed, 3))
        return scores

    def decided(
        self,
        config: CompiledConfig,
        target: CompiledPolicy | ModelRoute,
        request: ParsedRequest,
        headers: Mapping[str, str],
        scores: RouterScores | None,
        decision: Decision,
        allowed_models: frozenset[str] | None = None,
    ) -> None:
        """Record the decision and end the span (``allowed_models``: the client key's)."""
        model = decision.model
        why = exclusions(target, request, headers, allowed_models)
        attributes: dict[str, Any] = {
            "gen_ai.request.model": request.model,
            "switchyard.policy": decision.policy,
            "switchyard.reason": decision.reason,
            "switchyard.model": model.name,
            "switchyard.upstream_model": model.upstream_model,
            "switchyard.backend": model.backend_key,
            "switchyard.config_version": config.version,
            "switchyard.candidates": list(why),
            "switchyard.excluded": [f"{name}: {reason}" for name, reason in why.items() if reason],
            "switchyard.request.prompt_tokens_estimate": request.prompt_tokens,
            "switchyard.request.stream": request.stream,
        }
        if model.provider:
            attributes["gen_ai.provider.name"] = model.provider
        if scores is not None:
            attributes["switchyard.router.difficulty"] = round(scores.difficulty, 4)
            attributes["switchyard.router.category"] = scores.category
            for category, score in scores.categories.items():
                attributes[f"switchyard.router.scores.{category}"] = round(score, 4)
        self.span.set_attributes(attributes)
        self.span.end()

    def failed(self, error: GatewayError | None) -> None:
        """The request got an error reply instead of a route (None: an internal failure)."""
        span = self.span
        if error is None:
            span.set_attribute("error.type", "internal_error")
            span.set_status(Status(StatusCode.ERROR, "internal_error"))
        else:
            span.set_attribute("error.type", error.code)
            span.set_attribute("http.response.status_code", error.status)
            span.set_status(Status(StatusCode.ERROR, error.code))
        span.end()


def from_environment(
    env: Mapping[str, str] = os.environ, exporter: SpanExporter | None = None
) -> RouteTracer | None:
    """A tracer exporting OTLP/gRPC where OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT says; None
    when no endpoint is set, OTEL_SDK_DISABLED, or OTEL_TRACES_SAMPLER turns tracing off.
    Any other sampler follows Envoy's decision (the parent's sampled flag)."""
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT", ""
    )
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if env.get("OTEL_TRACES_SAMPLER", "").strip().lower() in _OFF:
        return None
    if exporter is None:
        if not endpoint:
            return None
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError as error:
            raise RuntimeError(
                "the OTLP exporter cannot load opentelemetry-proto's messages: xds-protos "
                "ships an older copy of the same files and was installed after it; run "
                "pip install --force-reinstall --no-deps opentelemetry-proto==<its version>"
            ) from error

        exporter = OTLPSpanExporter(endpoint if "://" in endpoint else f"http://{endpoint}")
    service = env.get("OTEL_SERVICE_NAME") or DEFAULT_SERVICE
    provider = TracerProvider(
        resource=Resource.create({"service.name": service}), sampler=ParentBased(ALWAYS_ON)
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return RouteTracer(provider)
