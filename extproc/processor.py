"""One ext_proc stream (one HTTP request): buffered body (+ header attributes) → decision.

The gateway's Envoy config sends one message per request: the buffered body, with the path
and the request headers routing reads as attributes. The body is parsed, scored when the
policy needs it, routed by the engine, and answered with the routing header, the rewritten
body and the decision as dynamic metadata that Envoy turns into ``x-switchyard-*`` response
headers. A processor configured to also send the headers phase works too: headers are then
read from that message.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from dataclasses import replace
from time import perf_counter, time
from typing import TYPE_CHECKING

import orjson
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf.message import DecodeError

from switchyard.extproc.accounting import (
    BODY_CONTINUE,
    BODY_CONTINUE_BYTES,
    Ledger,
    ResponseAccount,
    stream_options_for_usage,
)
from switchyard.extproc.claims import jwt_entry
from switchyard.extproc.config import CompiledConfig, CompiledPolicy, ModelRoute
from switchyard.extproc.engine import Decision, decide, select_target, session_view
from switchyard.extproc.errors import GatewayError, invalid_request
from switchyard.extproc.feedback import RECORDED_BODY, parse_feedback
from switchyard.extproc.keys import KeyEntry, authenticate, denial, forbidden
from switchyard.extproc.limits import Limiter, Reservation
from switchyard.extproc.metrics import REJECTIONS
from switchyard.extproc.models_list import MODELS_PATH, models_body
from switchyard.extproc.recording import Recorder, RecordingRule
from switchyard.extproc.request import (
    Endpoint,
    ParsedRequest,
    parse_request,
    screen,
    unwritable,
)
from switchyard.extproc.scoring import RouterScores
from switchyard.extproc.state import RuntimeState
from switchyard.headers import (
    DATA_CLASS_HEADER,
    DEFAULT_DATA_CLASS,
    EXTPROC_FILTER,
    FEEDBACK_PATH,
    METADATA_NAMESPACE,
    NO_FALLBACK_SUFFIX,
    REQUEST_ID_HEADER,
)

if TYPE_CHECKING:
    from opentelemetry.context import Context

    from switchyard.extproc.scoring import RouterScores, Scorer
    from switchyard.extproc.semantic import Embedder
    from switchyard.extproc.shadow import Capture, ShadowEvaluator
    from switchyard.extproc.tracing import RouteSpan, RouteTracer

log = logging.getLogger(__name__)

_ENDPOINTS = {e.value: e for e in Endpoint}
_OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_HEADERS_CONTINUE = ep.ProcessingResponse(request_headers=ep.HeadersResponse())
_JSON = HeaderValueOption(header=HeaderValue(key="content-type", raw_value=b"application/json"))


def immediate(error: GatewayError) -> ep.ProcessingResponse:
    """An immediate OpenAI-style error reply; Envoy answers the client without an upstream."""
    REJECTIONS.labels(str(error.status), error.code).inc()
    response = ep.ProcessingResponse()
    reply = response.immediate_response
    reply.status.code = error.status  # StatusCode values are HTTP codes
    reply.body = error.body()
    reply.details = f"switchyard_{error.code}"
    reply.headers.set_headers.append(_JSON)
    retry = getattr(error, "retry_after", 0)
    if retry:
        reply.headers.set_headers.append(
            HeaderValueOption(header=HeaderValue(key="retry-after", raw_value=str(retry).encode()))
        )
    return response


def _headers(message: ep.HttpHeaders) -> dict[str, str]:
    return {
        h.key: h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
        for h in message.headers.headers
    }


_HEADER_ATTRIBUTE = "request.headers['"


def _attribute_headers(message: ep.ProcessingRequest) -> dict[str, str]:
    """Headers Envoy sent as attributes (``request.headers['name']``, ``request.path``)."""
    attributes = message.attributes.get(EXTPROC_FILTER)
    if attributes is None:
        return {}
    headers = {}
    for key, value in attributes.fields.items():
        if key.startswith(_HEADER_ATTRIBUTE):
            headers[key[len(_HEADER_ATTRIBUTE) : -2]] = value.string_value
        elif key == "request.path":
            headers[":path"] = value.string_value
            headers[":method"] = "POST"  # only POSTs reach the ext_proc (route table)
    return headers


def _endpoint(headers: Mapping[str, str]) -> Endpoint:
    path = headers.get(":path", "").split("?", 1)[0]
    endpoint = _ENDPOINTS.get(path)
    if endpoint is None:
        raise GatewayError(404, f"unknown path {path}", code="unknown_url")
    if headers.get(":method") != "POST":
        raise GatewayError(
            405,
            f"{headers.get(':method')} is not allowed on {path}; use POST",
            code="method_not_allowed",
        )
    return endpoint


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if byte < 0x80:
            return value, at
        shift += 7


def _attribute_value(data: bytes, at: int) -> bytes:
    """The string of the ``Struct.fields`` map entry whose key ends at ``at``: the entry's
    value (field 2, a ``Value``) holding ``string_value`` (field 3)."""
    if data[at] != 0x12:
        raise IndexError(at)
    _, at = _varint(data, at + 1)
    if data[at] != 0x1A:
        raise IndexError(at)
    length, at = _varint(data, at + 1)
    return data[at : at + length]


def undecodable(payload: bytes) -> GatewayError:
    """400 for a message protobuf refuses. From Envoy that is a header routing reads (an
    attribute) whose value is not UTF-8: Envoy copies header bytes into attribute strings as
    they came, and a protobuf string must be UTF-8. The header is named when it can be found."""
    start = 0
    while (start := payload.find(_HEADER_ATTRIBUTE.encode(), start)) != -1:
        end = payload.find(b"']", start)
        if end == -1:
            break
        name = payload[start + len(_HEADER_ATTRIBUTE) : end].decode("ascii", "replace")
        try:
            _attribute_value(payload, end + 2).decode()
        except UnicodeDecodeError:
            return invalid_request(
                f"header {name} is not valid UTF-8", param=name, code="invalid_header"
            )
        except IndexError:  # not a map entry after all; look further
            pass
        start = end + 2
    return invalid_request(
        "the request could not be decoded: a header or the path is not valid UTF-8",
        code="invalid_header",
    )


async def _score_embedded(
    scorer: Scorer, prompt: str, embedder: Embedder, span: RouteSpan | None
) -> RouterScores:
    """Scores with the prompt's embedding, from the scorer's own token ids; a scorer that
    makes none (the heuristic placeholder) leaves the embedder to tokenise the prompt."""
    if span is None:
        scores = await scorer.score(prompt, embedder)
    else:
        scores = await span.score(scorer, prompt, embedder)
    if scores.embedding is None:
        scores = replace(scores, embedding=embedder.embed_text(prompt))
    return scores


class StreamState:
    """What one stream has learned so far (headers arrive before or with the body), and, once
    routed, what its response is accounted against."""

    __slots__ = ("account", "endpoint", "headers", "shadow", "trace")

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.endpoint: Endpoint | None = None
        self.trace: Context | None = None  # a sampled trace's parent (tracing.RouteTracer)
        self.account: ResponseAccount | None = None  # set when the request was routed
        self.shadow: Capture | None = None  # a sampled request's answer (extproc/shadow.py)


class Processor:
    """Handles ext_proc streams against the current RuntimeState."""

    def __init__(
        self,
        state: RuntimeState,
        tracer: RouteTracer | None = None,
        recorder: Recorder | None = None,
        shadow: ShadowEvaluator | None = None,
    ) -> None:
        self.state = state
        self.tracer = tracer
        self.recorder = recorder
        """Appends recorded requests and feedback (None: this worker has no directory)."""
        self.shadow = shadow
        """Shadow evaluation of sampled requests (None: off in this worker)."""
        self.ledger = Ledger()
        self.limiter = Limiter()
        # The HTTP/2 layer hands a new stream's headers to this hook only when it is set.
        self.on_headers = None if tracer is None else tracer.on_headers

    def open(self) -> StreamState:
        """State for a new ext_proc stream (``StreamHandler``)."""
        return StreamState()

    def closed(self, stream: StreamState) -> None:
        """The stream ended (``StreamHandler``): a response that did not finish (the client
        hung up, the upstream failed mid-body) is accounted for what was delivered."""
        account = stream.account
        if account is not None and not account.done:
            account.finish(complete=False)

    async def message(self, stream: StreamState, payload: bytes) -> tuple[bytes, bool]:
        """Answer one serialized ProcessingRequest (``StreamHandler``).

        A routed request's call stays open for its response body (usage and cost); the call
        ends with the body's last chunk, or at once with an immediate response.
        """
        try:
            request = ep.ProcessingRequest.FromString(payload)
        except DecodeError:
            return immediate(undecodable(payload)).SerializeToString(), True
        response, done = await self.handle(stream, request)
        if response is BODY_CONTINUE:  # most response chunks
            return BODY_CONTINUE_BYTES, done
        return response.SerializeToString(), done

    async def handle(
        self, stream: StreamState, message: ep.ProcessingRequest
    ) -> tuple[ep.ProcessingResponse, bool]:
        """Answer one message; True when the stream is finished (an immediate response)."""
        kind = message.WhichOneof("request")
        if kind == "request_body":
            if stream.endpoint is None:
                stream.headers = _attribute_headers(message)
                try:
                    stream.endpoint = _endpoint(stream.headers)
                except GatewayError as error:
                    # Checked only off the inference path: it costs routed requests nothing.
                    if stream.headers.get(":path", "").split("?", 1)[0] == FEEDBACK_PATH:
                        return self.feedback(stream.headers, message.request_body.body), True
                    return immediate(error), True
            response = await self.route(
                stream.endpoint, stream.headers, message.request_body.body, stream.trace, stream
            )
            # Not routed (answered here): nothing comes back, end the call now.
            return response, stream.account is None
        if kind == "response_body":
            account = stream.account
            if account is None:  # not a request this processor routed: pass it through
                return BODY_CONTINUE, message.response_body.end_of_stream
            # The call ends with the body's last chunk, or as soon as the whole answer was read
            # (Envoy then passes the rest unread: no round trip for an empty last chunk).
            response = account.body(message)
            if stream.shadow is not None:
                self._shadow_chunk(stream, message.response_body.body, account)
            return response, account.done
        if kind == "request_headers":
            stream.headers = _headers(message.request_headers)
            if stream.headers.get(":path", "").split("?", 1)[0] == MODELS_PATH:
                return self.models(stream.headers), True
            try:
                stream.endpoint = _endpoint(stream.headers)
                if message.request_headers.end_of_stream:
                    raise GatewayError(
                        400, "the request body is empty; send a JSON object", code="empty_body"
                    )
            except GatewayError as error:
                return immediate(error), True
            return _HEADERS_CONTINUE, False
        if kind is None:  # an empty message: not from Envoy; end the call, never raise
            empty = GatewayError(400, "empty ext_proc message", code="invalid_request")
            return immediate(empty), True
        # A phase this filter is not configured to send; answer so Envoy never waits.
        response = ep.ProcessingResponse()
        getattr(response, str(kind)).SetInParent()
        return response, False

    async def route(
        self,
        endpoint: Endpoint,
        headers: Mapping[str, str],
        body: bytes,
        trace: Context | None = None,
        stream: StreamState | None = None,
    ) -> ep.ProcessingResponse:
        """Decide one request; every failure becomes an OpenAI-style immediate response.
        With a sampled ``trace`` parent, a ``switchyard.route`` span records the decision; with
        a ``stream``, its response is accounted (``stream.account``)."""
        state = self.state
        started = perf_counter()
        span = None if trace is None or self.tracer is None else self.tracer.start(trace, endpoint)
        try:
            config = state.config
            key = None
            # The gateway's own shadow-evaluation requests (extproc/shadow.py) need no key.
            role = None
            if config.shadow and self.shadow is not None:
                role = self.shadow.marker.role(headers)
            if config.client_keys is not None and role is None:
                key = _client(config, headers)
            request = parse_request(endpoint, body)
            target = select_target(config, request, headers)
            if target.personal_data is not None:
                rule = target.personal_data
                screen(request, rule.scanner, rule.redact)
            routed, draw = session_view(target, request, headers)
            scores = None
            if getattr(target, "needs_scores", False):
                bundle = target.router_bundle  # type: ignore[union-attr]
                scorer = state.scorer_for(bundle)
                embedder = target.embedder  # type: ignore[union-attr]
                scoring = perf_counter()
                if embedder is not None:  # semantic rules: the prompt's embedding too
                    scores = await _score_embedded(scorer, routed.prompt, embedder, span)
                elif span is None:
                    scores = await scorer.score(routed.prompt)
                else:
                    scores = await span.score(scorer, routed.prompt)
                self.ledger.scored(bundle, perf_counter() - scoring)
            decision = decide(
                target,
                routed,
                headers,
                scores,
                random.random() if draw is None else draw,
                None if key is None else key.models,
            )
            if role is not None:
                decision = replace(decision, reason=f"shadow {role}, {decision.reason}")
            if key is not None:
                data_class = headers.get(DATA_CLASS_HEADER) or DEFAULT_DATA_CLASS
                denied = denial(key, request.model, decision.model.name, data_class)
                if denied:
                    raise forbidden(denied)
            reservation = None
            if key is not None and key.limits is not None:
                decision, reservation = await self._admit(
                    config, key, target, routed, headers, scores, decision, request
                )
        except GatewayError as error:
            if span is not None:
                span.failed(error)
            return immediate(error)
        except Exception:
            log.exception("routing failed")
            if span is not None:
                span.failed(None)
            return immediate(
                GatewayError(
                    500,
                    "the gateway failed to route this request",
                    code="internal_error",
                    type_="server_error",
                )
            )

        # Envoy routes on the "backend" metadata key. It re-matches the route only for a
        # response that carries a header mutation, hence the empty one. The buffer filter
        # behind the ext_proc sets the content-length of the rewritten body.
        model = decision.model
        response = ep.ProcessingResponse()
        common = response.request_body.response
        common.clear_route_cache = True
        common.header_mutation.SetInParent()
        strip = False
        if request.stream and stream is not None:
            # Usage is read from the stream's last chunk; a client that did not ask for it gets
            # the stream without it (usage.UsageMeter strips it).
            options = stream_options_for_usage(request.payload.get("stream_options"))
            if options is not None:
                request.payload["stream_options"] = options
                strip = True
        if request.model != model.upstream_model or strip or request.redacted:
            request.payload["model"] = model.upstream_model
            try:
                common.body_mutation.body = orjson.dumps(request.payload)
            except orjson.JSONEncodeError:
                too_deep = unwritable(request.payload)
                if reservation is not None:
                    reservation.release()
                if span is not None:
                    span.failed(too_deep)
                return immediate(too_deep)
        # Direct field writes: Struct.update() costs several times more per request.
        meta = response.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value.fields
        meta["backend"].string_value = (
            model.backend_key
            if key is None or key.models is None or key.models.issuperset(model.fallbacks)
            else model.backend_key + NO_FALLBACK_SUFFIX  # Envoy must not fall back outside it
        )
        meta["model"].string_value = model.name
        meta["policy"].string_value = decision.policy
        meta["reason"].string_value = decision.reason
        meta["config_version"].string_value = config.version
        if scores is not None:
            meta["difficulty"].number_value = round(scores.difficulty, 3)
            meta["category"].string_value = scores.category
        state.record(decision, request)
        if config.recording and self.recorder is not None and role is None:
            recorded = config.recording.get(decision.policy)
            if recorded is not None:
                # Personal data is never written to disk: a redacted body is recorded as sent
                # upstream, and one with personal data that was routed, not redacted, not at all.
                if request.redacted:
                    kept: bytes | None = common.body_mutation.body
                else:
                    kept = None if request.personal_data else body
                self._record(config, recorded, decision, request.model, headers, kept)
        self.ledger.decided(decision.policy, perf_counter() - started)
        if stream is not None:
            stream.account = ResponseAccount(
                self.ledger, config, target, decision, request, strip, reservation
            )
            if config.shadow and self.shadow is not None and role is None:
                sent = common.body_mutation.body
                stream.shadow = self.shadow.sample(config, decision, request, headers, body, sent)
        if span is not None:
            span.decided(
                config,
                target,
                routed,
                headers,
                scores,
                decision,
                None if key is None else key.models,
            )
        return response

    async def _admit(
        self,
        config: CompiledConfig,
        key: KeyEntry,
        target: CompiledPolicy | ModelRoute,
        routed: ParsedRequest,
        headers: Mapping[str, str],
        scores: RouterScores | None,
        decision: Decision,
        request: ParsedRequest,
    ) -> tuple[Decision, Reservation]:
        """The key's budgets and rate limits (``limits.py``): the decision, downgraded when
        the policy says so, and what was reserved."""
        assert key.limits is not None
        downgrade = target.budget_downgrade if isinstance(target, CompiledPolicy) else None
        if downgrade is not None and key.models is not None:
            downgrade = downgrade & key.models

        def redecide(models: frozenset[str]) -> Decision:
            return decide(target, routed, headers, scores, random.random(), models)

        return await self.limiter.admit(
            config.limit_store, key.limits, decision, request, downgrade or None, redecide
        )

    def _shadow_chunk(self, stream: StreamState, chunk: bytes, account: ResponseAccount) -> None:
        """Keep a sampled request's answer; once it ended, queue its shadow evaluation."""
        capture = stream.shadow
        assert capture is not None and self.shadow is not None
        capture.feed(chunk)
        if account.done:
            stream.shadow = None
            self.shadow.submit(capture, account.served or account.chosen, account.status)

    def _record(
        self,
        config: CompiledConfig,
        rule: RecordingRule,
        decision: Decision,
        alias: str,
        headers: Mapping[str, str],
        body: bytes | None,
    ) -> None:
        """Queue the request's record (the writer thread builds the line)."""
        recorder = self.recorder
        assert recorder is not None
        rid = headers.get(REQUEST_ID_HEADER)
        if not rid:  # not from this gateway's Envoy (it always sets one): nothing to file under
            return
        if recorder.retention is not config.retention:
            recorder.retention = config.retention
        recorder.request(
            (
                time(),
                rid,
                decision.policy,
                alias,
                decision.model.name,
                decision.reason,
                headers,
                config.recorded_headers,
                body if rule.prompts else None,
            )
        )

    def models(self, headers: Mapping[str, str]) -> ep.ProcessingResponse:
        """Answer ``GET /v1/models`` when client keys are on (``extproc/models_list.py``): the
        aliases and models the caller's key may use, or its 401."""
        config = self.state.config
        aliases = models = None
        try:
            if headers.get(":method") != "GET":
                raise GatewayError(405, f"use GET on {MODELS_PATH}", code="method_not_allowed")
            if config.client_keys is not None:
                key = _client(config, headers)
                aliases, models = key.aliases, key.models
        except GatewayError as error:
            return immediate(error)
        response = ep.ProcessingResponse()
        reply = response.immediate_response
        reply.status.code = 200
        reply.body = models_body(config.models_listing, aliases, models).encode()
        reply.details = "switchyard_models"
        reply.headers.set_headers.append(_JSON)
        return response

    def feedback(self, headers: Mapping[str, str], body: bytes) -> ep.ProcessingResponse:
        """Answer ``POST /v1/feedback`` (``switchyard.extproc.feedback``)."""
        config = self.state.config
        try:
            if config.client_keys is not None:
                _client(config, headers)
            if self.recorder is None or not config.recording:
                raise GatewayError(
                    404,
                    "feedback is not enabled: no RoutePolicy records requests "
                    "(spec.outcomes.record)",
                    code="unknown_url",
                )
            given = parse_feedback(body)
            if not self.recorder.feedback((time(), given.request_id, given.score, given.model)):
                raise GatewayError(
                    503,
                    "the gateway is recording more than it can write; retry shortly",
                    code="recording_busy",
                    type_="server_error",
                )
        except GatewayError as error:
            return immediate(error)
        return _RECORDED


def _client(config: CompiledConfig, headers: Mapping[str, str]) -> KeyEntry:
    """The caller: the tenant a verified JWT names, else the presented key (a 401 if none)."""
    assert config.client_keys is not None
    entry = None if config.jwt is None else jwt_entry(config.jwt, headers)
    return entry or authenticate(config.client_keys, headers, time())


def _recorded() -> ep.ProcessingResponse:
    response = ep.ProcessingResponse()
    reply = response.immediate_response
    reply.status.code = 200
    reply.body = RECORDED_BODY
    reply.details = "switchyard_feedback_recorded"
    reply.headers.set_headers.append(_JSON)
    return response


_RECORDED = _recorded()
