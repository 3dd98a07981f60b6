"""RoutingConfig → Envoy resources (listener, route configuration, clusters) as xDS JSON.

The same resources are written to files for local mode (Envoy's path-based xDS) and served
over ADS by the operator. Envoy does all byte moving: the ext_proc only sets the routing
header, and everything else here is decided at compile time:

- ``GET /v1/models`` is a direct response built from the config (no Python per request);
- unknown paths and methods get OpenAI-style errors from Envoy itself;
- one route per model backend keyed on ``x-switchyard-backend``; the model's name, policy and
  the decision's reason come back as response headers from the ext_proc's dynamic metadata;
- the ext_proc gets ONE message per request: the buffered body plus, as attributes, exactly
  the request headers routing reads (the config lists them). Skipping the headers phase
  halves the gRPC messages Python handles per request;
- when the ext_proc is down or times out, Envoy either answers 503 (fail closed) or lets the
  request through unrouted to the fail-open model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from switchyard.api.v1 import routing_pb2 as pb
from switchyard.headers import BACKEND_HEADER, EXTPROC_FILTER, METADATA_NAMESPACE
from switchyard.operator import fallback
from switchyard.operator.multicluster import service_dns_name

LISTENER_NAME = "switchyard_http"
ROUTE_CONFIG_NAME = "switchyard_routes"
EXTPROC_CLUSTER = "switchyard_extproc"

_T = "type.googleapis.com/"
HCM = _T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
EXT_PROC = _T + "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
EXT_PROC_PER_ROUTE = _T + "envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute"
HEADER_MUTATION = _T + "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation"
ROUTER = _T + "envoy.extensions.filters.http.router.v3.Router"
LUA = _T + "envoy.extensions.filters.http.lua.v3.Lua"
LUA_PER_ROUTE = _T + "envoy.extensions.filters.http.lua.v3.LuaPerRoute"
LUA_FILTER = "envoy.filters.http.lua"
BUFFER = _T + "envoy.extensions.filters.http.buffer.v3.Buffer"
HTTP_OPTIONS = _T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
TLS = _T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
LISTENER = _T + "envoy.config.listener.v3.Listener"
ROUTE_CONFIG = _T + "envoy.config.route.v3.RouteConfiguration"
CLUSTER = _T + "envoy.config.cluster.v3.Cluster"

# Envoy-generated failures (no healthy upstream, connect failure, overflow, timeouts) are
# reshaped into OpenAI-style bodies; replies the gateway writes itself are already JSON.
_UPSTREAM_FLAGS = ["UH", "UF", "UO", "URX", "UT", "UC", "UR", "NR", "LR", "DC"]


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


_CA_FILES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu (Envoy's images), Alpine
    "/etc/pki/tls/certs/ca-bundle.crt",  # RHEL, Fedora
    "/etc/ssl/cert.pem",  # macOS, BSD
)


def system_ca_file() -> str:
    """The first system CA bundle present here (Debian's path when none is)."""
    return next((f for f in _CA_FILES if os.path.exists(f)), _CA_FILES[0])


def _duration(ms: int) -> str:
    return f"{ms / 1000:.3f}s"


def _error_json(status: int, message: str, type_: str, code: str) -> dict[str, Any]:
    body = json.dumps({"error": {"message": message, "type": type_, "code": code, "param": None}})
    return {"status": status, "body": {"inline_string": body}}


def _no_extproc() -> dict[str, Any]:
    return {EXTPROC_FILTER: {"@type": EXT_PROC_PER_ROUTE, "disabled": True}}


def _models_list(config: pb.RoutingConfig) -> str:
    ids: dict[str, str] = {}
    for policy in config.policies:
        for alias in policy.aliases:
            ids.setdefault(alias, "switchyard-alias")
        for model in policy.models:
            ids.setdefault(model.name, f"{policy.namespace}/{policy.name}")
            ids.setdefault(f"{policy.namespace}/{policy.name}/{model.name}", "switchyard")
    data = [
        {"id": name, "object": "model", "created": 0, "owned_by": owner}
        for name, owner in sorted(ids.items())
    ]
    return json.dumps({"object": "list", "data": data})


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
    policy: pb.Policy, model: pb.Model, settings: GatewaySettings, api_keys: ApiKeys | None
) -> dict[str, Any]:
    retries = policy.retries
    retry_policy: dict[str, Any] = {"retry_on": retries.retry_on, "num_retries": retries.attempts}
    if retries.per_try_timeout_ms:
        retry_policy["per_try_timeout"] = _duration(retries.per_try_timeout_ms)
    if retries.retriable_status_codes:
        retry_policy["retriable_status_codes"] = list(retries.retriable_status_codes)
    if model.backend.resolved:
        retry_policy.update(fallback.RETRY_ELSEWHERE)
    action: dict[str, Any] = {
        "cluster": model.backend_key,
        "timeout": _duration(policy.timeout_ms or settings.route_timeout_s * 1000),
    }
    if retries.attempts and retries.retry_on:
        action["retry_policy"] = retry_policy
    members = fallback.chain(policy, model)
    served_by = "OVERWRITE_IF_EXISTS_OR_ADD"
    headers_to_add: list[dict[str, Any]] = []
    if len(members) > 1:
        # Fallback attempts get their own host, path, API key and body from the aggregate
        # cluster's filters, which also name the model that answered.
        action["cluster"] = fallback.aggregate_name(model)
        action["retry_policy"] = fallback.retry_policy(retries, members)
        served_by = "ADD_IF_ABSENT"
    if model.backend.url:
        url = urlsplit(model.backend.url)
        action["host_rewrite_literal"] = url.netloc
        base = url.path.rstrip("/")
        if base:
            action["prefix_rewrite"] = base + "/v1/"
    key = _api_key(policy, model, api_keys)
    if key:
        headers_to_add.append(
            {
                "header": {"key": "authorization", "value": f"Bearer {key}"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        )
    return {
        "name": model.backend_key,
        "match": {
            "prefix": "/v1/",
            "dynamic_metadata": [
                {
                    "filter": METADATA_NAMESPACE,
                    "path": [{"key": "backend"}],
                    "value": {"string_match": {"exact": model.backend_key}},
                }
            ],
        },
        "route": action,
        "request_headers_to_add": headers_to_add,
        "request_headers_to_remove": [BACKEND_HEADER],
        "response_headers_to_add": [
            _response_header("x-switchyard-model", model.name, served_by),
            _response_header("x-switchyard-upstream-model", model.upstream_model, served_by),
            _response_header(
                "x-switchyard-policy", f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:policy)%"
            ),
            _response_header(
                "x-switchyard-reason", f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:reason)%"
            ),
        ],
    }


def _response_header(
    key: str, value: str, action: str = "OVERWRITE_IF_EXISTS_OR_ADD"
) -> dict[str, Any]:
    return {"header": {"key": key, "value": value}, "append_action": action}


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


def _rewrite_model_lua(upstream_model: str) -> dict[str, Any]:
    safe = json.dumps(upstream_model)[1:-1].replace("%", "%%")
    return {"@type": LUA_PER_ROUTE, "source_code": {"inline_string": _REWRITE_MODEL % safe}}


def request_attributes(config: pb.RoutingConfig) -> list[str]:
    """What Envoy sends the ext_proc with the body: path plus the headers routing reads."""
    return ["request.path", *(f"request.headers['{h}']" for h in config.request_headers)]


def _unrouted(config: pb.RoutingConfig) -> dict[str, Any]:
    """The inference route before the ext_proc decides, and for requests it did not route.

    The ext_proc runs here with the attributes this config needs. Requests reach the route's
    own action only when the ext_proc was skipped (no body) or, failing open, unreachable.
    """
    match = {"prefix": "/v1/"}
    if config.fail_open_backend:
        model = next(
            m
            for p in config.policies
            for m in p.models
            if m.backend_key == config.fail_open_backend
        )
        return {
            "name": "fail_open",
            "match": match,
            "route": {"cluster": model.backend_key, "timeout": "300s"},
            "typed_per_filter_config": {LUA_FILTER: _rewrite_model_lua(model.upstream_model)},
            "response_headers_to_add": [
                _response_header("x-switchyard-model", model.name),
                _response_header("x-switchyard-reason", "fail-open: router unavailable"),
            ],
        }
    return {
        "name": "unrouted",
        "match": match,
        "direct_response": _error_json(
            400,
            "the request body is empty; send a JSON object",
            "invalid_request_error",
            "empty_body",
        ),
        "response_headers_to_add": [_response_header("content-type", "application/json")],
    }


def build_route_config(
    config: pb.RoutingConfig, settings: GatewaySettings, api_keys: ApiKeys | None = None
) -> dict[str, Any]:
    """The one route configuration of the gateway listener."""
    json_header = [_response_header("content-type", "application/json")]
    inference = {"safe_regex": {"regex": "^/v1/(chat/)?completions(\\?.*)?$"}}
    routes: list[dict[str, Any]] = [
        {
            "name": "models",
            "match": {"path": "/v1/models", "headers": [_method("GET")]},
            "direct_response": {"status": 200, "body": {"inline_string": _models_list(config)}},
            "response_headers_to_add": json_header,
            "typed_per_filter_config": _no_extproc(),
        },
        {
            "name": "method_not_allowed",
            "match": {
                **inference,
                "headers": [{**_method("POST"), "invert_match": True}],
            },
            "direct_response": _error_json(
                405, "use POST on this path", "invalid_request_error", "method_not_allowed"
            ),
            "response_headers_to_add": json_header,
            "typed_per_filter_config": _no_extproc(),
        },
    ]
    for policy in config.policies:
        routes.extend(_backend_route(policy, m, settings, api_keys) for m in policy.models)
    unrouted = _unrouted(config)
    unrouted["match"] = dict(inference)
    routes.append(unrouted)
    routes.append(
        {
            "name": "not_found",
            "match": {"prefix": "/"},
            "direct_response": _error_json(
                404,
                "unknown path; this gateway serves /v1/chat/completions, "
                "/v1/completions and /v1/models",
                "invalid_request_error",
                "unknown_url",
            ),
            "response_headers_to_add": json_header,
            "typed_per_filter_config": _no_extproc(),
        }
    )
    return {
        "@type": ROUTE_CONFIG,
        "name": ROUTE_CONFIG_NAME,
        # /v1/models is a direct response; with thousands of models it outgrows the 4 KiB default.
        "max_direct_response_body_size_bytes": 16 * 1024 * 1024,
        "virtual_hosts": [{"name": "gateway", "domains": ["*"], "routes": routes}],
    }


def _method(method: str) -> dict[str, Any]:
    return {"name": ":method", "string_match": {"exact": method}}


def _local_reply_config() -> dict[str, Any]:
    def mapper(filter_: dict[str, Any], type_: str, code: str) -> dict[str, Any]:
        return {
            "filter": filter_,
            "body_format_override": {
                "json_format": {
                    "error": {
                        "message": "%LOCAL_REPLY_BODY%",
                        "type": type_,
                        "code": code,
                        "param": None,
                    }
                },
                "content_type": "application/json",
            },
        }

    unavailable = {
        "status_code_filter": {
            "comparison": {"op": "EQ", "value": {"default_value": 503, "runtime_key": "sy_503"}}
        }
    }
    too_large = {
        "status_code_filter": {
            "comparison": {"op": "EQ", "value": {"default_value": 413, "runtime_key": "sy_413"}}
        }
    }
    return {
        "mappers": [
            mapper(too_large, "invalid_request_error", "request_too_large"),
            mapper(
                {"response_flag_filter": {"flags": _UPSTREAM_FLAGS}},
                "upstream_error",
                "%RESPONSE_CODE_DETAILS%",
            ),
            # Left after the upstream flags: a local 503 is the ext_proc failing closed.
            {
                **mapper(unavailable, "server_error", "router_unavailable"),
                "body": {"inline_string": "the routing service is unavailable; retry shortly"},
            },
        ]
    }


def build_listener(
    config: pb.RoutingConfig, settings: GatewaySettings, rds: dict[str, Any]
) -> dict[str, Any]:
    """The gateway listener; ``rds`` is the HCM's RDS block (file or ADS config source).

    It depends on the config only through the fail mode and the header attributes, so it
    changes (and Envoy drains connections gracefully) only when those do.
    """
    ext_proc = {
        "@type": EXT_PROC,
        "grpc_service": {
            "envoy_grpc": {"cluster_name": EXTPROC_CLUSTER},
            "timeout": _duration(settings.extproc_message_timeout_ms),
        },
        # Unreachable ext_proc: continue unrouted to the fail-open model, or answer 503.
        "failure_mode_allow": bool(config.fail_open_backend),
        "status_on_error": {"code": 503},
        "message_timeout": _duration(settings.extproc_message_timeout_ms),
        "processing_mode": {
            "request_header_mode": "SKIP",
            "response_header_mode": "SKIP",
            "request_body_mode": "BUFFERED",
            "response_body_mode": "NONE",
            "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SKIP",
        },
        "metadata_options": {"receiving_namespaces": {"untyped": [METADATA_NAMESPACE]}},
        "request_attributes": request_attributes(config),
        "allow_mode_override": False,
    }
    strip_backend = {
        "@type": HEADER_MUTATION,
        "mutations": {
            "request_mutations": [{"remove": BACKEND_HEADER}, {"remove": "content-length"}]
        },
    }
    hcm = {
        "@type": HCM,
        "stat_prefix": "switchyard",
        "codec_type": "AUTO",
        "rds": rds,
        "local_reply_config": _local_reply_config(),
        "http_filters": [
            {"name": "envoy.filters.http.header_mutation", "typed_config": strip_backend},
            {"name": EXTPROC_FILTER, "typed_config": ext_proc},
            # Holds the request headers until the whole body has passed the ext_proc, so the
            # router sees the routing header the ext_proc set from the body.
            {
                "name": "envoy.filters.http.buffer",
                "typed_config": {"@type": BUFFER, "max_request_bytes": settings.max_request_bytes},
            },
            # Only when failing open: rewrites "model" on the fail-open route (per-route code).
            *(
                [{"name": LUA_FILTER, "typed_config": {"@type": LUA}}]
                if config.fail_open_backend
                else []
            ),
            {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}},
        ],
    }
    return {
        "@type": LISTENER,
        "name": LISTENER_NAME,
        "address": {
            "socket_address": {
                "address": settings.listen_address,
                "port_value": settings.listen_port,
            }
        },
        "per_connection_buffer_limit_bytes": settings.max_request_bytes,
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }


def _endpoint(host: str, port: int) -> dict[str, Any]:
    return {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}


def _extproc_endpoint(host: str, port: int) -> dict[str, Any]:
    """A worker at host:port, or at a Unix socket given as ("unix:/path", 0)."""
    if host.startswith("unix:"):
        return {"endpoint": {"address": {"pipe": {"path": host.removeprefix("unix:")}}}}
    return _endpoint(host, port)


def extproc_cluster(settings: GatewaySettings) -> dict[str, Any]:
    """The ext_proc workers: HTTP/2, round-robin per stream. Fixed addresses, or (Kubernetes)
    the ready ext_proc pods over EDS, so a pod that joins gets streams within seconds."""
    cluster: dict[str, Any] = {
        "@type": CLUSTER,
        "name": EXTPROC_CLUSTER,
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": HTTP_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
    }
    if settings.extproc_eds:
        cluster["type"] = "EDS"
        cluster["eds_cluster_config"] = {
            "eds_config": {"ads": {}, "resource_api_version": "V3"},
            "service_name": EXTPROC_CLUSTER,
        }
        return cluster
    # Envoy rejects a host name in a STATIC cluster: names (a Service's) are resolved.
    named = any(
        not _is_ip(host) and not host.startswith("unix:") for host, _ in settings.extproc_endpoints
    )
    cluster["type"] = "STRICT_DNS" if named else "STATIC"
    cluster["load_assignment"] = extproc_load_assignment(settings.extproc_endpoints)
    return cluster


def extproc_load_assignment(endpoints: list[tuple[str, int]]) -> dict[str, Any]:
    """The ext_proc endpoints as a ClusterLoadAssignment (static cluster body or EDS)."""
    return {
        "cluster_name": EXTPROC_CLUSTER,
        "endpoints": [{"lb_endpoints": [_extproc_endpoint(h, p) for h, p in endpoints]}],
    }


def _service_localities(model: pb.Model) -> tuple[str, list[dict[str, Any]]]:
    """(cluster type, locality groups) of a Service backend.

    Resolved endpoints (operator) become one locality per (priority, cluster, zone), so Envoy
    keeps traffic on priority 0 (the preferred cluster) and spills to the next priority as its
    hosts fail health checks. Unresolved (local mode) means the Service's cluster DNS name.
    """
    svc = model.backend.service
    if not model.backend.resolved:
        return "STRICT_DNS", [{"lb_endpoints": [_endpoint(service_dns_name(svc), svc.port)]}]
    groups: dict[tuple[int, str, str, str], list[dict[str, Any]]] = {}
    for e in model.backend.endpoints:
        key = (e.priority, e.region, e.zone, e.cluster)
        groups.setdefault(key, []).append(_endpoint(e.address, e.port))
    return "STATIC", [
        {
            "locality": {"region": region, "zone": zone, "sub_zone": cluster},
            "priority": priority,
            "lb_endpoints": members,
        }
        for (priority, region, zone, cluster), members in sorted(groups.items())
    ]


# Service backends are our own pods: probe them (TCP connect) so dead ones leave the pool before
# a request finds them. External providers only get passive outlier detection.
_SERVICE_HEALTH_CHECK = {
    "timeout": "1s",
    "interval": "2s",
    "no_traffic_interval": "2s",
    "unhealthy_threshold": 2,
    "healthy_threshold": 1,
    "tcp_health_check": {},
}


def _upstream_tls(host: str, ca_pem: str, system_ca_file: str) -> dict[str, Any]:
    """TLS to an https backend: SNI, and the certificate verified for ``host`` against the
    backend's own CA bundle or else the system's."""
    trusted = {"inline_string": ca_pem} if ca_pem else {"filename": system_ca_file}
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": TLS,
            "sni": host,
            "common_tls_context": {
                "alpn_protocols": ["h2", "http/1.1"],
                "validation_context": {
                    "trusted_ca": trusted,
                    "match_typed_subject_alt_names": [
                        {
                            "san_type": "IP_ADDRESS" if _is_ip(host) else "DNS",
                            "matcher": {"exact": host},
                        }
                    ],
                },
            },
        },
    }


def model_cluster(model: pb.Model, system_ca: str = "") -> dict[str, Any]:
    """One cluster per model backend: an external URL or an in-cluster Service."""
    health_checks: list[dict[str, Any]] = []
    if model.backend.service.name:
        kind, localities = _service_localities(model)
        tls, host = False, ""
        if model.backend.resolved:
            health_checks.append(_SERVICE_HEALTH_CHECK)
    else:
        url = urlsplit(model.backend.url)
        tls = url.scheme == "https"
        host = url.hostname or "localhost"
        port = url.port or (443 if tls else 80)
        kind = "STATIC" if _is_ip(host) else "STRICT_DNS"
        localities = [{"lb_endpoints": [_endpoint(host, port)]}]
    for locality in localities:
        for member in locality["lb_endpoints"]:
            member["metadata"] = fallback.endpoint_metadata(model)
    cluster: dict[str, Any] = {
        "@type": CLUSTER,
        "name": model.backend_key,
        "type": kind,
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": "5s",
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": {"cluster_name": model.backend_key, "endpoints": localities},
        "health_checks": health_checks,
        "circuit_breakers": {
            "thresholds": [
                {"max_connections": 100000, "max_pending_requests": 100000, "max_requests": 100000}
            ]
        },
        "outlier_detection": {
            "consecutive_5xx": 5,
            "base_ejection_time": "10s",
            "max_ejection_percent": 50,
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": HTTP_OPTIONS,
                **(
                    {"auto_config": {"http2_protocol_options": {}}}
                    if tls
                    else {"explicit_http_config": {"http_protocol_options": {}}}
                ),
            }
        },
    }
    if tls:
        ca_file = system_ca or system_ca_file()
        cluster["transport_socket"] = _upstream_tls(host, model.backend.ca_bundle, ca_file)
    return cluster


def _is_ip(host: str) -> bool:
    parts = host.split(".")
    return len(parts) == 4 and all(p.isdigit() for p in parts)


def build_clusters(
    config: pb.RoutingConfig, settings: GatewaySettings, api_keys: ApiKeys | None = None
) -> list[dict[str, Any]]:
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
                clusters.append(fallback.aggregate_cluster(members, keys, HTTP_OPTIONS))
    return clusters
