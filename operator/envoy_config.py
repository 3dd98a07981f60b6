"""RoutingConfig → Envoy resources (listener, route configuration, clusters), built as typed
xds-protos messages and served over ADS by the control plane (the operator's, and local
mode's). Envoy does all byte moving: the ext_proc only sets the routing header, and everything
else here is decided at compile time:

- ``GET /v1/models`` is a direct response built from the config (no Python per request);
- unknown paths and methods get OpenAI-style errors from Envoy itself;
- one route per model backend keyed on ``x-switchyard-backend``; the model's name, policy and
  the decision's reason come back as response headers from the ext_proc's dynamic metadata;
- the ext_proc gets ONE message per request: the buffered body plus, as attributes, exactly
  the request headers routing reads (the config lists them). Skipping the headers phase
  halves the gRPC messages Python handles per request;
- when the ext_proc is down or times out, Envoy either answers 503 (fail closed) or lets the
  request through unrouted to the fail-open model.

tests/unit/testdata/translate/ pins the output (tests/unit/test_translate_golden.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from envoy.config.accesslog.v3 import accesslog_pb2 as accesslog
from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.common.mutation_rules.v3 import mutation_rules_pb2
from envoy.config.core.v3 import (
    address_pb2,
    backoff_pb2,
    base_pb2,
    config_source_pb2,
    extension_pb2,
    grpc_service_pb2,
    health_check_pb2,
    http_uri_pb2,
    protocol_pb2,
    substitution_format_string_pb2,
)
from envoy.config.endpoint.v3 import endpoint_components_pb2 as ep
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.access_loggers.filters.cel.v3 import cel_pb2
from envoy.extensions.filters.http.buffer.v3 import buffer_pb2
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2, processing_mode_pb2
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.http.early_header_mutation.header_mutation.v3 import (
    header_mutation_pb2 as early_mutation_pb2,
)
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2 as tls_common
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as http_pb2
from envoy.type.matcher.v3 import metadata_pb2, regex_pb2, string_pb2, value_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf import wrappers_pb2
from google.protobuf.message import Message

from switchyard.api.v1 import routing_pb2 as pb
from switchyard.extproc.models_list import MODELS_PATH, listed_models, models_body
from switchyard.headers import (
    BACKEND_HEADER,
    CLIENT_KEY_HEADERS,
    EXTPROC_FILTER,
    FEEDBACK_PATH,
    JWT_PAYLOAD_HEADER,
    METADATA_NAMESPACE,
    NO_FALLBACK_SUFFIX,
    REQUEST_ID_HEADER,
    RESPONSE_ATTRIBUTES,
    SHADOW_HEADER,
)
from switchyard.operator import fallback, tracing
from switchyard.operator.envoy_tls import EnvoyMtls, upstream_mtls
from switchyard.operator.multicluster import service_dns_name
from switchyard.operator.xds_types import (
    ADD_IF_ABSENT,
    OVERWRITE,
    header,
    inline,
    millis,
    packed,
    protocol_options,
    seconds,
    struct,
    u32,
)

LISTENER_NAME = "switchyard_http"
ROUTE_CONFIG_NAME = "switchyard_routes"
EXTPROC_CLUSTER = "switchyard_extproc"
EXTPROC_RETRY_BACKOFF_MS = 10  # first retry of an ext_proc stream within 0-10 ms
CATCH_ALL_ROUTES = frozenset({"fail_open", "unrouted", "not_found"})
"""The routes after the backend routes, taking what no backend route matched."""
LUA_FILTER = "envoy.filters.http.lua"

# Envoy-generated failures (no healthy upstream, connect failure, overflow, timeouts) are
# reshaped into OpenAI-style bodies; replies the gateway writes itself are already JSON.
_UPSTREAM_FLAGS = ["UH", "UF", "UO", "URX", "UT", "UC", "UR", "NR", "LR", "DC"]
ADS = config_source_pb2.ConfigSource(
    ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3
)
"""Where Envoy gets the resources these name (routes, the ext_proc's endpoints): over ADS."""


@dataclass(frozen=True)
class GatewaySettings:
    """Data-plane settings that are not per policy."""

    listen_address: str = "127.0.0.1"
    listen_port: int = 8080
    extproc_endpoints: list[tuple[str, int]] = field(default_factory=lambda: [("127.0.0.1", 9002)])
    # Kubernetes: the ext_proc pods come over EDS (the operator follows their EndpointSlices)
    # instead of the fixed ``extproc_endpoints``.
    extproc_eds: bool = False
    max_request_bytes: int = 8 * 1024 * 1024
    extproc_message_timeout_ms: int = 500
    route_timeout_s: int = 300
    # CA bundle (a path on Envoy's filesystem) that verifies https backends without caBundle.
    system_ca_file: str = field(default_factory=lambda: system_ca_file())
    # OpenTelemetry traces (operator/tracing.py): an OTLP/gRPC collector (host:port or URL;
    # empty: no tracing config at all), the share of requests traced, the spans' service name.
    otlp_endpoint: str = ""
    trace_sampling: float = 1.0
    trace_service_name: str = tracing.DEFAULT_SERVICE
    # mTLS to the ext_proc workers (operator/envoy_tls.py); None: plaintext.
    extproc_tls: EnvoyMtls | None = None


_CA_FILES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu (Envoy's images), Alpine
    "/etc/pki/tls/certs/ca-bundle.crt",  # RHEL, Fedora
    "/etc/ssl/cert.pem",  # macOS, BSD
)


def system_ca_file() -> str:
    """The first system CA bundle present here (Debian's path when none is)."""
    return next((f for f in _CA_FILES if os.path.exists(f)), _CA_FILES[0])


def _error(status: int, message: str, type_: str, code: str) -> rc.DirectResponseAction:
    body = json.dumps({"error": {"message": message, "type": type_, "code": code, "param": None}})
    return rc.DirectResponseAction(status=status, body=inline(body))


def _with_extproc(route: rc.Route) -> rc.Route:
    """Enable the ext_proc (off by default on the listener) on a route requests start on."""
    enabled = ext_proc_pb2.ExtProcPerRoute(overrides=ext_proc_pb2.ExtProcOverrides())
    route.typed_per_filter_config[EXTPROC_FILTER].CopyFrom(
        packed(rc.FilterConfig(config=packed(enabled)))
    )
    return route


ApiKeys = Callable[[str, str, str], str | None]
"""(namespace, secret name, key) → the API key, or None when it cannot be read."""


def _api_key(policy: pb.Policy, model: pb.Model, api_keys: ApiKeys | None) -> str:
    secret = model.backend.api_key_secret
    if secret.name and api_keys is not None:
        return api_keys(policy.namespace, secret.name, secret.key) or ""
    if model.backend.api_key_env:
        return os.environ.get(model.backend.api_key_env, "")
    return ""


def _backend_route(
    policy: pb.Policy,
    model: pb.Model,
    settings: GatewaySettings,
    api_keys: ApiKeys | None,
    direct: bool = False,
) -> rc.Route:
    """The route of one model backend; ``direct``: its ``NO_FALLBACK_SUFFIX`` twin, to the
    model's own cluster only."""
    retries = policy.retries
    action = rc.RouteAction(
        cluster=model.backend_key,
        timeout=millis(policy.timeout_ms or settings.route_timeout_s * 1000),
    )
    if retries.attempts and retries.retry_on:
        retry = action.retry_policy
        retry.retry_on = retries.retry_on
        retry.num_retries.value = retries.attempts
        if retries.per_try_timeout_ms:
            retry.per_try_timeout.CopyFrom(millis(retries.per_try_timeout_ms))
        retry.retriable_status_codes.extend(retries.retriable_status_codes)
        if model.backend.resolved:
            fallback.retry_elsewhere(retry)
    members = [model] if direct else fallback.chain(policy, model)
    served_by = OVERWRITE
    if len(members) > 1:
        # Fallback attempts get their own host, path, API key and body from the aggregate
        # cluster's filters, which also name the model that answered.
        action.cluster = fallback.aggregate_name(model)
        action.retry_policy.CopyFrom(fallback.retry_policy(retries, members))
        served_by = ADD_IF_ABSENT
    if model.backend.url:
        url = urlsplit(model.backend.url)
        action.host_rewrite_literal = url.netloc
        base = url.path.rstrip("/")
        if base:
            action.prefix_rewrite = base + "/v1/"
    key = _api_key(policy, model, api_keys)
    name = model.backend_key + (NO_FALLBACK_SUFFIX if direct else "")
    match = rc.RouteMatch(
        prefix="/v1/",
        dynamic_metadata=[
            metadata_pb2.MetadataMatcher(
                filter=METADATA_NAMESPACE,
                path=[metadata_pb2.MetadataMatcher.PathSegment(key="backend")],
                value=value_pb2.ValueMatcher(string_match=string_pb2.StringMatcher(exact=name)),
            )
        ],
    )
    return rc.Route(
        name=name,
        match=match,
        route=action,
        request_headers_to_add=[header("authorization", f"Bearer {key}")] if key else [],
        # Envoy removes before it adds: the provider key replaces the client's.
        request_headers_to_remove=[
            BACKEND_HEADER,
            *CLIENT_KEY_HEADERS,
            # Only where it can be set: the shadow secret never reaches a provider.
            *([SHADOW_HEADER] if policy.recording.HasField("shadow") else []),
        ],
        response_headers_to_add=[
            header("x-switchyard-model", model.name, served_by),
            header("x-switchyard-upstream-model", model.upstream_model, served_by),
            header("x-switchyard-policy", f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:policy)%"),
            header("x-switchyard-reason", f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:reason)%"),
        ],
    )


# Without the ext_proc nothing parses the body, so the fail-open route swaps the top-level
# "model" string with a pattern: JSON escapes quotes inside strings, so the pattern cannot
# match inside message text; it takes the first "model": "<string>" key in the document.
_REWRITE_MODEL = """
function envoy_on_request(handle)
  local body = handle:body()
  if body == nil then return end
  local raw = body:getBytes(0, body:length())
  local rewritten, count = string.gsub(raw, '"model"%%s*:%%s*"[^"]*"', '"model":"%s"', 1)
  if count > 0 then
    body:setBytes(rewritten)
    handle:headers():replace("content-length", tostring(#rewritten))
  end
end
"""


def _rewrite_model_lua(upstream_model: str) -> lua_pb2.LuaPerRoute:
    safe = json.dumps(upstream_model)[1:-1].replace("%", "%%")
    return lua_pb2.LuaPerRoute(source_code=inline(_REWRITE_MODEL % safe))


def request_attributes(config: pb.RoutingConfig) -> list[str]:
    """What Envoy sends the ext_proc with the body: path plus the headers routing reads."""
    return ["request.path", *(f"request.headers['{h}']" for h in config.request_headers)]


def _unrouted(config: pb.RoutingConfig, match: rc.RouteMatch) -> list[rc.Route]:
    """The inference routes before the ext_proc decides, and for requests it did not route.

    A request that says its body is empty (``content-length: 0``) never reaches the ext_proc
    (it reads bodies): it gets a 400 here. Every other request starts on the last route, with
    the ext_proc, and reaches that route's own action only when the ext_proc did not route it:
    the ext_proc failed (unreachable, timed out), or the request had no body yet no length (an
    HTTP/1 POST with neither a length nor chunked encoding, an HTTP/2 request ended with its
    headers). The filter always fails open, so that a failing ext_proc never cuts a response it
    is reading (usage accounting); this action is where the configured fail mode applies: the
    fail-open model, or a 503 whose message names both causes.
    """
    json_header = [header("content-type", "application/json")]
    zero_length = rc.HeaderMatcher(
        name="content-length", string_match=string_pb2.StringMatcher(exact="0")
    )
    empty = rc.Route(
        name="empty_body",
        match=rc.RouteMatch(safe_regex=match.safe_regex, headers=[zero_length]),
        direct_response=_error(
            400,
            "the request body is empty; send a JSON object",
            "invalid_request_error",
            "empty_body",
        ),
        response_headers_to_add=json_header,
    )
    # With client keys the gateway fails closed: without the ext_proc no key is checked.
    if config.fail_open_backend and not config.require_client_key:
        model = next(
            m
            for p in config.policies
            for m in p.models
            if m.backend_key == config.fail_open_backend
        )
        route = rc.Route(
            name="fail_open",
            match=match,
            route=rc.RouteAction(cluster=model.backend_key, timeout=seconds(300)),
            request_headers_to_remove=list(CLIENT_KEY_HEADERS),
            response_headers_to_add=[
                header("x-switchyard-model", model.name),
                header("x-switchyard-reason", "fail-open: router unavailable"),
            ],
        )
        route.typed_per_filter_config[LUA_FILTER].CopyFrom(
            packed(_rewrite_model_lua(model.upstream_model))
        )
    else:
        route = rc.Route(
            name="unrouted",
            match=match,
            direct_response=_error(
                503,
                "the routing service is unavailable; retry shortly (or, if the request had no "
                "body, send a JSON object)",
                "server_error",
                "router_unavailable",
            ),
            response_headers_to_add=json_header,
        )
    return [empty, _with_extproc(route)]


def recording_on(config: pb.RoutingConfig) -> bool:
    """Whether any policy records requests (``POST /v1/feedback`` is served then)."""
    return any(p.recording.record for p in config.policies)


def feedback_routes(config: pb.RoutingConfig) -> list[rc.Route]:
    """``POST /v1/feedback``, answered by the ext_proc from the buffered body (an immediate
    response), only when a policy records; other methods get a 405, an empty body a 400, and
    an ext_proc that cannot answer a 503."""
    if not recording_on(config):
        return []
    json_header = [header("content-type", "application/json")]
    not_post = rc.HeaderMatcher(
        name=":method", string_match=string_pb2.StringMatcher(exact="POST"), invert_match=True
    )
    zero_length = rc.HeaderMatcher(
        name="content-length", string_match=string_pb2.StringMatcher(exact="0")
    )
    return [
        rc.Route(
            name="feedback_method_not_allowed",
            match=rc.RouteMatch(path=FEEDBACK_PATH, headers=[not_post]),
            direct_response=_error(
                405, "use POST on this path", "invalid_request_error", "method_not_allowed"
            ),
            response_headers_to_add=json_header,
        ),
        rc.Route(
            name="feedback_empty_body",
            match=rc.RouteMatch(path=FEEDBACK_PATH, headers=[zero_length]),
            direct_response=_error(
                400,
                "the request body is empty; send a JSON object",
                "invalid_request_error",
                "empty_body",
            ),
            response_headers_to_add=json_header,
        ),
        _with_extproc(
            rc.Route(
                name="feedback",
                match=rc.RouteMatch(path=FEEDBACK_PATH),
                direct_response=_error(
                    503,
                    "the routing service is unavailable; retry shortly",
                    "server_error",
                    "router_unavailable",
                ),
                response_headers_to_add=json_header,
            )
        ),
    ]


def _processing_mode(
    request_headers: int, request_body: int, response_body: int
) -> processing_mode_pb2.ProcessingMode:
    """What the ext_proc is sent; never the response headers or either side's trailers."""
    mode = processing_mode_pb2.ProcessingMode
    return mode(
        request_header_mode=request_headers,
        response_header_mode=mode.SKIP,
        request_body_mode=request_body,
        response_body_mode=response_body,
        request_trailer_mode=mode.SKIP,
        response_trailer_mode=mode.SKIP,
    )


def _models_route(config: pb.RoutingConfig) -> rc.Route:
    """``GET /v1/models``: Envoy answers it from the config, or, with client keys, the ext_proc
    does (its headers only), listing what the caller's key may use. The route does not fail
    open, and its own answer is then a 503, reached only if the ext_proc let a request pass."""
    route = rc.Route(
        name="models",
        match=rc.RouteMatch(path=MODELS_PATH, headers=[_method("GET")]),
        direct_response=rc.DirectResponseAction(
            status=200, body=inline(models_body(listed_models(config)))
        ),
        response_headers_to_add=[header("content-type", "application/json")],
    )
    if not config.require_client_key:
        return route
    route.direct_response.CopyFrom(
        _error(
            503,
            "the gateway could not check this request's API key; retry",
            "server_error",
            "keys_unavailable",
        )
    )
    mode = processing_mode_pb2.ProcessingMode
    headers_only = ext_proc_pb2.ExtProcOverrides(
        processing_mode=_processing_mode(mode.SEND, mode.NONE, mode.NONE),
        failure_mode_allow=wrappers_pb2.BoolValue(value=False),
    )
    route.typed_per_filter_config[EXTPROC_FILTER].CopyFrom(
        packed(rc.FilterConfig(config=packed(ext_proc_pb2.ExtProcPerRoute(overrides=headers_only))))
    )
    return route


def build_route_config(
    config: pb.RoutingConfig, settings: GatewaySettings, api_keys: ApiKeys | None = None
) -> route_pb2.RouteConfiguration:
    """The one route configuration of the gateway listener."""
    json_header = [header("content-type", "application/json")]
    inference = regex_pb2.RegexMatcher(regex="^/v1/(chat/)?completions(\\?.*)?$")
    not_post = rc.HeaderMatcher(
        name=":method", string_match=string_pb2.StringMatcher(exact="POST"), invert_match=True
    )
    routes = [
        _models_route(config),
        rc.Route(
            name="method_not_allowed",
            match=rc.RouteMatch(safe_regex=inference, headers=[not_post]),
            direct_response=_error(
                405, "use POST on this path", "invalid_request_error", "method_not_allowed"
            ),
            response_headers_to_add=json_header,
        ),
        # The ext_proc reads the body as plain JSON, so a compressed one is refused rather than
        # routed on garbage and forwarded with an encoding the model server may not read.
        rc.Route(
            name="content_encoding",
            match=rc.RouteMatch(
                prefix="/",
                headers=[
                    rc.HeaderMatcher(name="content-encoding", present_match=True),
                    rc.HeaderMatcher(
                        name="content-encoding",
                        string_match=string_pb2.StringMatcher(exact="identity", ignore_case=True),
                        invert_match=True,
                    ),
                ],
            ),
            direct_response=_error(
                415,
                "compressed request bodies are not supported; send the JSON uncompressed "
                "(no content-encoding)",
                "invalid_request_error",
                "unsupported_content_encoding",
            ),
            response_headers_to_add=json_header,
        ),
    ]
    for policy in config.policies:
        routes.extend(_backend_route(policy, m, settings, api_keys) for m in policy.models)
        if config.require_client_key:  # for keys that may not use every fallback
            routes.extend(
                _backend_route(policy, m, settings, api_keys, direct=True)
                for m in policy.models
                if m.fallbacks
            )
    # The only route a request starts on with the ext_proc: codec errors and the direct
    # responses above never open an ext_proc stream, not even for their response.
    routes.extend(_unrouted(config, rc.RouteMatch(safe_regex=inference)))
    routes.extend(feedback_routes(config))
    routes.append(
        rc.Route(
            name="not_found",
            match=rc.RouteMatch(prefix="/"),
            direct_response=_error(
                404,
                "unknown path; this gateway serves /v1/chat/completions, "
                "/v1/completions and /v1/models",
                "invalid_request_error",
                "unknown_url",
            ),
            response_headers_to_add=json_header,
        )
    )
    with_jwt(config, routes)
    return route_pb2.RouteConfiguration(
        name=ROUTE_CONFIG_NAME,
        # /v1/models is a direct response; with thousands of models it outgrows the 4 KiB default.
        max_direct_response_body_size_bytes=u32(16 * 1024 * 1024),
        virtual_hosts=[rc.VirtualHost(name="gateway", domains=["*"], routes=routes)],
    )


def _method(method: str) -> rc.HeaderMatcher:
    return rc.HeaderMatcher(name=":method", string_match=string_pb2.StringMatcher(exact=method))


def _status(status: int, op: int = accesslog.ComparisonFilter.EQ) -> accesslog.AccessLogFilter:
    return accesslog.AccessLogFilter(
        status_code_filter=accesslog.StatusCodeFilter(
            comparison=accesslog.ComparisonFilter(
                op=op,
                value=base_pb2.RuntimeUInt32(default_value=status, runtime_key=f"sy_{status}"),
            )
        )
    )


def _status_is(status: int) -> accesslog.AccessLogFilter:
    return _status(status)


# Replies that already carry an OpenAI-style body: the ext_proc's own (their details are
# switchyard_<code>) and the config's direct responses (/v1/models, unknown paths).
_OWN_REPLIES = accesslog.AccessLogFilter(
    extension_filter=accesslog.ExtensionFilter(
        name="envoy.access_loggers.extension_filters.cel",
        typed_config=packed(
            cel_pb2.ExpressionFilter(
                expression="response.code_details.startsWith('switchyard_') || "
                "response.code_details == 'direct_response'"
            )
        ),
    )
)


def _local_reply_config() -> hcm_pb2.LocalReplyConfig:
    def mapper(
        filter_: accesslog.AccessLogFilter,
        type_: str,
        code: str,
        message: str = "%LOCAL_REPLY_BODY%",
    ) -> hcm_pb2.ResponseMapper:
        body = {"message": message, "type": type_, "code": code, "param": None}
        return hcm_pb2.ResponseMapper(
            filter=filter_,
            body_format_override=substitution_format_string_pb2.SubstitutionFormatString(
                json_format=struct({"error": body}), content_type="application/json"
            ),
        )

    # Left after the upstream flags: a local 503 is the ext_proc failing closed.
    unavailable = mapper(_status_is(503), "server_error", "router_unavailable")
    unavailable.body.inline_string = "the routing service is unavailable; retry shortly"
    # ...and a local 504 the ext_proc not answering in time (its reply has no body).
    late = mapper(_status_is(504), "server_error", "router_timeout")
    late.body.inline_string = "the routing service did not answer in time; retry shortly"
    # Envoy's own answers to broken HTTP (431 headers too large, codec 400s, 426 HTTP/1.0, 501
    # for an unknown transfer coding: a client error, so 400) get the same shape. Their body
    # may be empty, so the message names the response code details.
    refused = "the gateway refused the request: %RESPONSE_CODE_DETAILS%"
    details = "%RESPONSE_CODE_DETAILS%"
    not_implemented = mapper(_status_is(501), "invalid_request_error", details, refused)
    not_implemented.status_code.value = 400
    at_least = accesslog.ComparisonFilter.GE
    return hcm_pb2.LocalReplyConfig(
        mappers=[
            hcm_pb2.ResponseMapper(filter=_OWN_REPLIES),  # left as they are
            mapper(_status_is(413), "invalid_request_error", "request_too_large"),
            mapper(
                accesslog.AccessLogFilter(
                    response_flag_filter=accesslog.ResponseFlagFilter(flags=_UPSTREAM_FLAGS)
                ),
                "upstream_error",
                details,
            ),
            unavailable,
            late,
            not_implemented,
            mapper(_status(500, at_least), "server_error", details, refused),
            mapper(_status(400, at_least), "invalid_request_error", details, refused),
        ]
    )


def _ext_proc(
    config: pb.RoutingConfig, settings: GatewaySettings
) -> ext_proc_pb2.ExternalProcessor:
    mode = processing_mode_pb2.ProcessingMode
    timeout = millis(settings.extproc_message_timeout_ms)
    return ext_proc_pb2.ExternalProcessor(
        grpc_service=grpc_service_pb2.GrpcService(
            envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=EXTPROC_CLUSTER),
            timeout=timeout,
            retry_policy=_extproc_retry(settings.extproc_message_timeout_ms),
        ),
        # An ext_proc that fails lets the request continue unrouted, to the inference route's
        # own action (the fail-open model, or a 503), and a response it was reading continue
        # unread: a failing worker never cuts a response in flight.
        failure_mode_allow=True,
        status_on_error=http_status_pb2.HttpStatus(code=http_status_pb2.ServiceUnavailable),
        message_timeout=timeout,
        # The response passes chunk by chunk (never buffered): usage and cost are read from
        # it, and a usage chunk the client did not ask for is removed.
        processing_mode=_processing_mode(mode.SKIP, mode.BUFFERED, mode.STREAMED),
        metadata_options=ext_proc_pb2.MetadataOptions(
            receiving_namespaces=ext_proc_pb2.MetadataOptions.MetadataNamespaces(
                untyped=[METADATA_NAMESPACE]
            )
        ),
        request_attributes=request_attributes(config),
        response_attributes=list(RESPONSE_ATTRIBUTES),
        allow_mode_override=False,
    )


def _extproc_retry(timeout_ms: int) -> base_pb2.RetryPolicy:
    """An ext_proc stream that a worker refused or reset before answering (killed, restarting)
    starts over on another worker, never one it already tried (a killed worker's connection can
    still be picked until Envoy sees it closed); the filter buffers what it sent for that. Envoy
    takes the back-off's ``max_interval`` as the per-try timeout, so that is the message
    timeout."""
    policy = base_pb2.RetryPolicy(
        retry_on="connect-failure,refused-stream,reset",
        num_retries=u32(2),
        retry_back_off=backoff_pb2.BackoffStrategy(
            base_interval=millis(EXTPROC_RETRY_BACKOFF_MS), max_interval=millis(timeout_ms)
        ),
        host_selection_retry_max_attempts=3,
    )
    policy.retry_host_predicate.add(
        name="envoy.retry_host_predicates.previous_hosts",
        typed_config=packed(previous_hosts_pb2.PreviousHostsPredicate()),
    )
    return policy


def _filter(name: str, config: Message, disabled: bool = False) -> hcm_pb2.HttpFilter:
    return hcm_pb2.HttpFilter(name=name, typed_config=packed(config), disabled=disabled)


_REMOVE_CLIENT_REQUEST_ID = extension_pb2.TypedExtensionConfig(
    name="envoy.http.early_header_mutation.header_mutation",
    typed_config=packed(
        early_mutation_pb2.HeaderMutation(
            mutations=[mutation_rules_pb2.HeaderMutation(remove=REQUEST_ID_HEADER)]
        )
    ),
)


JWT_FILTER = "envoy.filters.http.jwt_authn"
JWT_PROVIDER = "switchyard"
JWT_REQUIREMENT = "switchyard_jwt"
JWKS_CLUSTER = "switchyard_jwks"


def _jwt_authn(jwt: pb.JwtAuth) -> jwt_pb2.JwtAuthentication:
    """Verifies the bearer JWT where a route asks (``with_jwt``), its payload forwarded to the
    ext_proc; an invalid one is refused (``_jwt_reply``)."""
    provider = jwt_pb2.JwtProvider(
        issuer=jwt.issuer,
        audiences=list(jwt.audiences),
        from_headers=[jwt_pb2.JwtHeader(name="authorization", value_prefix="Bearer ")],
        forward_payload_header=JWT_PAYLOAD_HEADER,
    )
    if jwt.jwks_uri:
        provider.remote_jwks.CopyFrom(
            jwt_pb2.RemoteJwks(
                http_uri=http_uri_pb2.HttpUri(
                    uri=jwt.jwks_uri, cluster=JWKS_CLUSTER, timeout=millis(jwt.jwks_timeout_ms)
                ),
                cache_duration=seconds(jwt.jwks_cache_s),
                # Fetched when the listener loads and again before the cache expires; the
                # listener does not wait for it (a request before the first fetch is a 401).
                async_fetch=jwt_pb2.JwksAsyncFetch(fast_listener=True),
            )
        )
    else:
        provider.local_jwks.CopyFrom(base_pb2.DataSource(inline_string=jwt.jwks_inline))
    return jwt_pb2.JwtAuthentication(
        providers={JWT_PROVIDER: provider},
        requirement_map={JWT_REQUIREMENT: jwt_pb2.JwtRequirement(provider_name=JWT_PROVIDER)},
    )


# A bearer credential shaped like a JWT (three base64url parts); any other (a client key) takes
# the key path, unverified by jwt_authn, which would refuse it as a malformed JWT.
_JWT_BEARER = rc.HeaderMatcher(
    name="authorization",
    string_match=string_pb2.StringMatcher(
        safe_regex=regex_pb2.RegexMatcher(
            regex=r"^Bearer [A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$"
        )
    ),
)


def with_jwt(config: pb.RoutingConfig, routes: list[rc.Route]) -> None:
    """With JWTs accepted: each route the ext_proc runs on gets a twin before it for requests
    with a JWT bearer, which jwt_authn verifies first; no route forwards the verified payload
    upstream."""
    if not config.HasField("jwt"):
        return
    verify = packed(jwt_pb2.PerRouteConfig(requirement_name=JWT_REQUIREMENT))
    out: list[rc.Route] = []
    for route in routes:
        if route.HasField("route"):
            route.request_headers_to_remove.append(JWT_PAYLOAD_HEADER)
        if EXTPROC_FILTER in route.typed_per_filter_config:
            twin = rc.Route()
            twin.CopyFrom(route)
            twin.name = f"{route.name}_jwt"
            twin.match.headers.append(_JWT_BEARER)
            twin.typed_per_filter_config[JWT_FILTER].CopyFrom(verify)
            out.append(twin)
        out.append(route)
    routes[:] = out


def _jwt_reply() -> hcm_pb2.ResponseMapper:
    """jwt_authn's plain-text refusals (invalid, expired, 403 for a wrong audience) as one
    OpenAI-style 401: the token is not a credential here. Its body names the reason, never the
    token."""
    body = {
        "message": "invalid token: %LOCAL_REPLY_BODY%",
        "type": "invalid_request_error",
        "code": "invalid_api_key",
        "param": None,
    }
    match = accesslog.AccessLogFilter(
        extension_filter=accesslog.ExtensionFilter(
            name="envoy.access_loggers.extension_filters.cel",
            typed_config=packed(
                cel_pb2.ExpressionFilter(expression="response.code_details.startsWith('jwt_authn')")
            ),
        )
    )
    return hcm_pb2.ResponseMapper(
        filter=match,
        status_code=wrappers_pb2.UInt32Value(value=401),
        body_format_override=substitution_format_string_pb2.SubstitutionFormatString(
            json_format=struct({"error": body}), content_type="application/json"
        ),
    )


def _jwt_listener(config: pb.RoutingConfig, hcm: hcm_pb2.HttpConnectionManager) -> None:
    """With JWTs accepted: a client's own payload header goes with its request id, jwt_authn
    runs before the ext_proc, and its refusals are OpenAI-style."""
    if not config.HasField("jwt"):
        return
    remove = mutation_rules_pb2.HeaderMutation
    early = early_mutation_pb2.HeaderMutation(
        mutations=[remove(remove=REQUEST_ID_HEADER), remove(remove=JWT_PAYLOAD_HEADER)]
    )
    hcm.early_header_mutation_extensions[0].typed_config.CopyFrom(packed(early))
    at = [f.name for f in hcm.http_filters].index(EXTPROC_FILTER)
    hcm.http_filters.insert(at, _filter(JWT_FILTER, _jwt_authn(config.jwt)))
    hcm.local_reply_config.mappers.insert(1, _jwt_reply())


def build_listener(config: pb.RoutingConfig, settings: GatewaySettings) -> listener_pb2.Listener:
    """The gateway listener, its routes over ADS (RDS).

    It depends on the config only through the fail mode and the header attributes, so it
    changes (and Envoy drains connections gracefully) only when those do.
    """
    remove = mutation_rules_pb2.HeaderMutation
    strip_backend = header_mutation_pb2.HeaderMutation(
        mutations=header_mutation_pb2.Mutations(
            request_mutations=[remove(remove=BACKEND_HEADER), remove(remove="content-length")]
        )
    )
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix="switchyard",
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        # Every request gets an id Envoy generates (a client's own is removed before that, so
        # no client can pick the id of someone else's request), returned on every response:
        # recorded requests are filed under it and POST /v1/feedback names it.
        early_header_mutation_extensions=[_REMOVE_CLIENT_REQUEST_ID],
        generate_request_id=wrappers_pb2.BoolValue(value=True),
        preserve_external_request_id=False,
        always_set_request_id_in_response=True,
        rds=hcm_pb2.Rds(route_config_name=ROUTE_CONFIG_NAME, config_source=ADS),
        local_reply_config=_local_reply_config(),
        http_filters=[
            _filter("envoy.filters.http.header_mutation", strip_backend),
            _filter(EXTPROC_FILTER, _ext_proc(config, settings), disabled=True),
            # Holds the request headers until the whole body has passed the ext_proc, so the
            # router sees the routing header the ext_proc set from the body.
            _filter(
                "envoy.filters.http.buffer",
                buffer_pb2.Buffer(max_request_bytes=u32(settings.max_request_bytes)),
            ),
            # Only when failing open: rewrites "model" on the fail-open route (per-route code).
            *([_filter(LUA_FILTER, lua_pb2.Lua())] if config.fail_open_backend else []),
            _filter("envoy.filters.http.router", router_pb2.Router()),
        ],
    )
    _jwt_listener(config, hcm)
    if settings.otlp_endpoint:
        hcm.tracing.CopyFrom(
            tracing.hcm_tracing(settings.trace_sampling, settings.trace_service_name)
        )
    return listener_pb2.Listener(
        name=LISTENER_NAME,
        address=_address(settings.listen_address, settings.listen_port),
        per_connection_buffer_limit_bytes=u32(settings.max_request_bytes),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=packed(hcm),
                    )
                ]
            )
        ],
    )


def _address(host: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=host, port_value=port)
    )


def _endpoint(host: str, port: int) -> ep.LbEndpoint:
    return ep.LbEndpoint(endpoint=ep.Endpoint(address=_address(host, port)))


def _extproc_endpoint(host: str, port: int) -> ep.LbEndpoint:
    """A worker at host:port, or at a Unix socket given as ("unix:/path", 0)."""
    if host.startswith("unix:"):
        pipe = address_pb2.Pipe(path=host.removeprefix("unix:"))
        return ep.LbEndpoint(endpoint=ep.Endpoint(address=address_pb2.Address(pipe=pipe)))
    return _endpoint(host, port)


def extproc_cluster(settings: GatewaySettings) -> cluster_pb2.Cluster:
    """The ext_proc workers: HTTP/2, round-robin per stream. Fixed addresses, or (Kubernetes)
    the ready ext_proc pods over EDS, so a pod that joins gets streams within seconds."""
    h2 = http_pb2.HttpProtocolOptions(
        explicit_http_config=http_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
        )
    )
    cluster = cluster_pb2.Cluster(
        name=EXTPROC_CLUSTER,
        connect_timeout=seconds(1),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
        typed_extension_protocol_options=protocol_options(h2),
        outlier_detection=_dead_worker_ejection(),
        circuit_breakers=_EXTPROC_STREAMS,
        # Health changes (ejections, returns) reach the load balancers at once, not merged
        # over Envoy's default 1 s: a stale view kept sending to a worker known dead.
        common_lb_config=cluster_pb2.Cluster.CommonLbConfig(update_merge_window=millis(0)),
    )
    if settings.extproc_tls is not None:
        cluster.transport_socket.CopyFrom(upstream_mtls(settings.extproc_tls))
    if settings.extproc_eds:
        cluster.type = cluster_pb2.Cluster.EDS
        cluster.eds_cluster_config.eds_config.CopyFrom(ADS)
        cluster.eds_cluster_config.service_name = EXTPROC_CLUSTER
        return cluster
    # Envoy rejects a host name in a STATIC cluster: names (a Service's) are resolved.
    named = any(
        not _is_ip(host) and not host.startswith("unix:") for host, _ in settings.extproc_endpoints
    )
    cluster.type = cluster_pb2.Cluster.STRICT_DNS if named else cluster_pb2.Cluster.STATIC
    cluster.load_assignment.CopyFrom(extproc_load_assignment(settings.extproc_endpoints))
    return cluster


# A routed request holds its ext_proc stream until its response ends (usage is read from the
# response), so concurrent streams = requests in flight, long LLM responses included. Envoy's
# default of 1,024 would cap the gateway there; workers bound each connection to
# MAX_CONCURRENT_STREAMS (extproc/h2/limits.py) and Envoy opens more connections past it.
# Every stream that a dying worker or pod resets before answering may retry (``_extproc_retry``;
# Envoy's default allows 3 concurrent retries per cluster and the rest failed closed); each
# retries at most twice, and only on refused or reset streams.
_EXTPROC_STREAMS = circuit_breaker_pb2.CircuitBreakers(
    thresholds=[
        circuit_breaker_pb2.CircuitBreakers.Thresholds(
            max_requests=u32(1 << 20), max_pending_requests=u32(1 << 16), max_retries=u32(1 << 20)
        )
    ]
)


def _dead_worker_ejection() -> outlier_detection_pb2.OutlierDetection:
    """A worker that refuses connections (killed, restarting) or times out leaves the rotation
    at its first failure, and again at the next check after each ejection ends while it is down
    (Envoy ejects for consecutive failures only once). Every worker may be ejected: with at most
    half, a restarted worker that was still ejected kept a newly dead one in rotation, alone, and
    every retry went there; with all ejected Envoy's panic mode uses every worker and a
    stream's retries (``_extproc_retry``) find one that lives."""
    return outlier_detection_pb2.OutlierDetection(
        split_external_local_origin_errors=True,
        consecutive_local_origin_failure=u32(1),
        enforcing_failure_percentage_local_origin=u32(100),
        failure_percentage_threshold=u32(50),
        failure_percentage_minimum_hosts=u32(1),
        failure_percentage_request_volume=u32(1),
        interval=millis(200),
        base_ejection_time=seconds(1),
        max_ejection_time=seconds(5),
        max_ejection_percent=u32(100),
    )


def extproc_load_assignment(endpoints: list[tuple[str, int]]) -> endpoint_pb2.ClusterLoadAssignment:
    """The ext_proc endpoints as a ClusterLoadAssignment (static cluster body or EDS)."""
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=EXTPROC_CLUSTER,
        endpoints=[
            ep.LocalityLbEndpoints(lb_endpoints=[_extproc_endpoint(h, p) for h, p in endpoints])
        ],
    )


def _service_localities(model: pb.Model) -> tuple[int, list[ep.LocalityLbEndpoints]]:
    """(cluster type, locality groups) of a Service backend.

    Resolved endpoints (operator) become one locality per (priority, cluster, zone), so Envoy
    keeps traffic on priority 0 (the preferred cluster) and spills to the next priority as its
    hosts fail health checks. Unresolved (local mode) means the Service's cluster DNS name.
    """
    svc = model.backend.service
    if not model.backend.resolved:
        members = [_endpoint(service_dns_name(svc), svc.port)]
        return cluster_pb2.Cluster.STRICT_DNS, [ep.LocalityLbEndpoints(lb_endpoints=members)]
    groups: dict[tuple[int, str, str, str], list[ep.LbEndpoint]] = {}
    for e in model.backend.endpoints:
        key = (e.priority, e.region, e.zone, e.cluster)
        groups.setdefault(key, []).append(_endpoint(e.address, e.port))
    return cluster_pb2.Cluster.STATIC, [
        ep.LocalityLbEndpoints(
            locality=base_pb2.Locality(region=region, zone=zone, sub_zone=cluster),
            priority=priority,
            lb_endpoints=members,
        )
        for (priority, region, zone, cluster), members in sorted(groups.items())
    ]


def _service_health_check() -> health_check_pb2.HealthCheck:
    """Service backends are our own pods: probe them (TCP connect) so dead ones leave the pool
    before a request finds them. External providers only get passive outlier detection."""
    return health_check_pb2.HealthCheck(
        timeout=seconds(1),
        interval=seconds(2),
        no_traffic_interval=seconds(2),
        unhealthy_threshold=u32(2),
        healthy_threshold=u32(1),
        tcp_health_check=health_check_pb2.HealthCheck.TcpHealthCheck(),
    )


def _upstream_tls(host: str, ca_pem: str, system_ca_file: str) -> base_pb2.TransportSocket:
    """TLS to an https backend: SNI, and the certificate verified for ``host`` against the
    backend's own CA bundle or else the system's."""
    trusted = inline(ca_pem) if ca_pem else base_pb2.DataSource(filename=system_ca_file)
    san = tls_common.SubjectAltNameMatcher
    context = tls_pb2.UpstreamTlsContext(
        sni=host,
        common_tls_context=tls_pb2.CommonTlsContext(
            alpn_protocols=["h2", "http/1.1"],
            validation_context=tls_common.CertificateValidationContext(
                trusted_ca=trusted,
                match_typed_subject_alt_names=[
                    san(
                        san_type=san.IP_ADDRESS if _is_ip(host) else san.DNS,
                        matcher=string_pb2.StringMatcher(exact=host),
                    )
                ],
            ),
        ),
    )
    return base_pb2.TransportSocket(
        name="envoy.transport_sockets.tls", typed_config=packed(context)
    )


def model_cluster(model: pb.Model, system_ca: str = "") -> cluster_pb2.Cluster:
    """One cluster per model backend: an external URL or an in-cluster Service."""
    health_checks = []
    if model.backend.service.name:
        kind, localities = _service_localities(model)
        tls, host = False, ""
        if model.backend.resolved:
            health_checks.append(_service_health_check())
    else:
        url = urlsplit(model.backend.url)
        tls = url.scheme == "https"
        host = url.hostname or "localhost"
        port = url.port or (443 if tls else 80)
        kind = cluster_pb2.Cluster.STATIC if _is_ip(host) else cluster_pb2.Cluster.STRICT_DNS
        localities = [ep.LocalityLbEndpoints(lb_endpoints=[_endpoint(host, port)])]
    metadata = fallback.endpoint_metadata(model)
    for locality in localities:
        for member in locality.lb_endpoints:
            member.metadata.CopyFrom(metadata)
    options = http_pb2.HttpProtocolOptions
    if tls:
        protocol = options(
            auto_config=options.AutoHttpConfig(
                http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
            )
        )
    else:
        protocol = options(
            explicit_http_config=options.ExplicitHttpConfig(
                http_protocol_options=protocol_pb2.Http1ProtocolOptions()
            )
        )
    unlimited = u32(100000)
    cluster = cluster_pb2.Cluster(
        name=model.backend_key,
        alt_stat_name=fallback.stats_name(model.backend_key),
        type=kind,
        dns_lookup_family=cluster_pb2.Cluster.V4_PREFERRED,
        connect_timeout=seconds(5),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=model.backend_key, endpoints=localities
        ),
        health_checks=health_checks,
        circuit_breakers=circuit_breaker_pb2.CircuitBreakers(
            thresholds=[
                circuit_breaker_pb2.CircuitBreakers.Thresholds(
                    max_connections=unlimited,
                    max_pending_requests=unlimited,
                    max_requests=unlimited,
                )
            ]
        ),
        outlier_detection=outlier_detection_pb2.OutlierDetection(
            consecutive_5xx=u32(5), base_ejection_time=seconds(10), max_ejection_percent=u32(50)
        ),
        typed_extension_protocol_options=protocol_options(protocol),
    )
    if tls:
        ca_file = system_ca or system_ca_file()
        cluster.transport_socket.CopyFrom(_upstream_tls(host, model.backend.ca_bundle, ca_file))
    return cluster


def jwks_cluster(uri: str, system_ca: str = "") -> cluster_pb2.Cluster:
    """Where jwt_authn fetches the issuer's JWKS: resolved by DNS unless an IP, TLS (the
    certificate verified for the host against the system CAs) for https."""
    url = urlsplit(uri)
    tls = url.scheme == "https"
    host = url.hostname or "localhost"
    port = url.port or (443 if tls else 80)
    options = http_pb2.HttpProtocolOptions
    cluster = cluster_pb2.Cluster(
        name=JWKS_CLUSTER,
        type=cluster_pb2.Cluster.STATIC if _is_ip(host) else cluster_pb2.Cluster.STRICT_DNS,
        dns_lookup_family=cluster_pb2.Cluster.V4_PREFERRED,
        connect_timeout=seconds(5),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=JWKS_CLUSTER,
            endpoints=[ep.LocalityLbEndpoints(lb_endpoints=[_endpoint(host, port)])],
        ),
    )
    if tls:  # ALPN picks HTTP/2 or 1.1
        protocol = options(
            auto_config=options.AutoHttpConfig(
                http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
            )
        )
        ca_file = system_ca or system_ca_file()
        cluster.transport_socket.CopyFrom(_upstream_tls(host, "", ca_file))
    else:
        protocol = options(
            explicit_http_config=options.ExplicitHttpConfig(
                http_protocol_options=protocol_pb2.Http1ProtocolOptions()
            )
        )
    for name, packed_options in protocol_options(protocol).items():
        cluster.typed_extension_protocol_options[name].CopyFrom(packed_options)
    return cluster


def _is_ip(host: str) -> bool:
    parts = host.split(".")
    return len(parts) == 4 and all(p.isdigit() for p in parts)


def build_clusters(
    config: pb.RoutingConfig, settings: GatewaySettings, api_keys: ApiKeys | None = None
) -> list[cluster_pb2.Cluster]:
    """The ext_proc cluster, one cluster per model backend, and one aggregate cluster per model
    with usable fallbacks."""
    clusters = [extproc_cluster(settings)]
    clusters.extend(
        model_cluster(m, settings.system_ca_file) for p in config.policies for m in p.models
    )
    for policy in config.policies:
        for model in policy.models:
            members = fallback.chain(policy, model)
            if len(members) > 1:
                keys = [_api_key(policy, m, api_keys) for m in members]
                clusters.append(fallback.aggregate_cluster(members, keys))
    if config.jwt.jwks_uri:
        clusters.append(jwks_cluster(config.jwt.jwks_uri, settings.system_ca_file))
    if settings.otlp_endpoint:
        clusters.append(tracing.collector_cluster(settings.otlp_endpoint, settings.system_ca_file))
    return clusters
