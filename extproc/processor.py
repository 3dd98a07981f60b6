"""One ext_proc stream (one HTTP request): headers → buffered body → routing decision.

Envoy sends the request headers, then the buffered body. The headers are answered at once
(or with an immediate error for a method or path the gateway does not serve); the body is
parsed, scored when the policy needs it, routed by the engine, and answered with the routing
header, the rewritten body and the decision as dynamic metadata that Envoy turns into
``x-switchyard-*`` response headers.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Mapping

import orjson
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from switchyard.extproc.engine import decide, select_target
from switchyard.extproc.errors import GatewayError
from switchyard.extproc.request import Endpoint, parse_request
from switchyard.extproc.state import RuntimeState

log = logging.getLogger(__name__)

BACKEND_HEADER = "x-switchyard-backend"
METADATA_NAMESPACE = "switchyard"
_ENDPOINTS = {e.value: e for e in Endpoint}
_OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_HEADERS_CONTINUE = ep.ProcessingResponse(request_headers=ep.HeadersResponse())
_BODY_CONTINUE = ep.ProcessingResponse(request_body=ep.BodyResponse())
_JSON = HeaderValueOption(header=HeaderValue(key="content-type", raw_value=b"application/json"))


def immediate(error: GatewayError) -> ep.ProcessingResponse:
    """An immediate OpenAI-style error reply; Envoy answers the client without an upstream."""
    response = ep.ProcessingResponse()
    reply = response.immediate_response
    reply.status.code = error.status  # StatusCode values are HTTP codes
    reply.body = error.body()
    reply.details = f"switchyard_{error.code}"
    reply.headers.set_headers.append(_JSON)
    return response


def _headers(message: ep.HttpHeaders) -> dict[str, str]:
    return {
        h.key: h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
        for h in message.headers.headers
    }


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


class Processor:
    """Handles ext_proc streams against the current RuntimeState."""

    def __init__(self, state: RuntimeState) -> None:
        self.state = state

    async def process(
        self, requests: AsyncIterator[ep.ProcessingRequest], context: object = None
    ) -> AsyncIterator[ep.ProcessingResponse]:
        """The bidirectional stream of one HTTP request (``context``: the gRPC context)."""
        headers: dict[str, str] = {}
        endpoint: Endpoint | None = None
        async for message in requests:
            kind = message.WhichOneof("request")
            if kind == "request_headers":
                headers = _headers(message.request_headers)
                try:
                    endpoint = _endpoint(headers)
                    if message.request_headers.end_of_stream:
                        raise GatewayError(
                            400, "the request body is empty; send a JSON object", code="empty_body"
                        )
                except GatewayError as error:
                    yield immediate(error)
                    return
                yield _HEADERS_CONTINUE
            elif kind == "request_body":
                if endpoint is None:
                    yield _BODY_CONTINUE
                    continue
                yield await self.route(endpoint, headers, message.request_body.body)
            else:
                # Phases this filter is not configured to send; answer so Envoy never waits.
                response = ep.ProcessingResponse()
                getattr(response, kind).SetInParent()
                yield response

    async def route(
        self, endpoint: Endpoint, headers: Mapping[str, str], body: bytes
    ) -> ep.ProcessingResponse:
        """Decide one request; every failure becomes an OpenAI-style immediate response."""
        state = self.state
        try:
            request = parse_request(endpoint, body)
            config = state.config
            target = select_target(config, request, headers)
            scores = None
            if getattr(target, "needs_scores", False):
                scores = await state.scorer_for(target.router_bundle).score(  # type: ignore[union-attr]
                    request.prompt
                )
            decision = decide(target, request, headers, scores, random.random())
        except GatewayError as error:
            return immediate(error)
        except Exception:
            log.exception("routing failed")
            return immediate(
                GatewayError(
                    500,
                    "the gateway failed to route this request",
                    code="internal_error",
                    type_="server_error",
                )
            )

        model = decision.model
        response = ep.ProcessingResponse()
        common = response.request_body.response
        common.clear_route_cache = True
        mutation = common.header_mutation
        mutation.set_headers.append(
            HeaderValueOption(
                header=HeaderValue(key=BACKEND_HEADER, raw_value=model.backend_key.encode()),
                append_action=_OVERWRITE,
            )
        )
        if request.model != model.upstream_model:
            request.payload["model"] = model.upstream_model
            new_body = orjson.dumps(request.payload)
            common.body_mutation.body = new_body
            mutation.set_headers.append(
                HeaderValueOption(
                    header=HeaderValue(key="content-length", raw_value=str(len(new_body)).encode()),
                    append_action=_OVERWRITE,
                )
            )
        meta = {
            "model": model.name,
            "policy": decision.policy,
            "reason": decision.reason,
            "config_version": config.version,
        }
        if scores is not None:
            meta["difficulty"] = f"{scores.difficulty:.3f}"
            meta["category"] = scores.category
        response.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value.update(meta)
        state.record(decision, request)
        return response
