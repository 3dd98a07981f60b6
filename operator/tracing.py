"""OpenTelemetry traces: Envoy's tracer on the gateway listener and the collector's cluster,
and the standard ``OTEL_*`` environment variables read as one ``TraceSettings``.

Envoy starts the trace (``random_sampling`` decides which requests) and exports its spans over
OTLP/gRPC through the ``switchyard_otlp`` cluster; its gRPC call to the ext_proc carries the
W3C ``traceparent``, so the ext_proc's ``switchyard.route`` span joins the same trace.
Without an endpoint there is no tracing config at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, grpc_service_pb2, protocol_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2 as ep
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.trace.v3 import http_tracer_pb2, opentelemetry_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import common_pb2 as tls_common
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as http_pb2
from envoy.type.matcher.v3 import string_pb2
from envoy.type.metadata.v3 import metadata_pb2
from envoy.type.tracing.v3 import custom_tag_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import wrappers_pb2

from switchyard.headers import METADATA_NAMESPACE
from switchyard.operator.xds_types import millis, packed, protocol_options, seconds

COLLECTOR_CLUSTER = "switchyard_otlp"
DEFAULT_SERVICE = "switchyard"
_RATIO = {"always_on": 1.0, "parentbased_always_on": 1.0}
_OFF = {"always_off", "parentbased_always_off"}


@dataclass(frozen=True)
class TraceSettings:
    """Where traces go (empty: tracing off), which share of requests Envoy traces (0..1) and
    the service name of the gateway's spans (the ext_proc's get ``-extproc`` appended)."""

    otlp_endpoint: str = ""
    sampling: float = 1.0
    service_name: str = DEFAULT_SERVICE


def from_environment(defaults: TraceSettings, env: Mapping[str, str]) -> TraceSettings:
    """``defaults`` with what the standard OTEL_* variables set (they win: a person points
    a gateway at a collector without editing files)."""
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT", defaults.otlp_endpoint
    )
    sampling = defaults.sampling
    sampler = env.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if sampler in _RATIO:
        sampling = _RATIO[sampler]
    elif sampler in _OFF:
        sampling = 0.0
    elif sampler in ("traceidratio", "parentbased_traceidratio"):
        sampling = _ratio(env.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))
    elif sampler:
        raise ValueError(f"OTEL_TRACES_SAMPLER={sampler!r} is not supported")
    service = env.get("OTEL_SERVICE_NAME") or defaults.service_name
    return TraceSettings(endpoint, sampling, service)


def _ratio(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"OTEL_TRACES_SAMPLER_ARG={raw!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"OTEL_TRACES_SAMPLER_ARG={raw!r} is not in [0, 1]")
    return value


def collector_address(endpoint: str) -> tuple[str, int, bool]:
    """(host, port, tls) of an OTLP/gRPC endpoint: ``host:port`` or an http(s) URL."""
    url = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"OTLP endpoint {endpoint!r}: expected host:port or http(s)://host:port")
    tls = url.scheme == "https"
    return url.hostname, url.port or (443 if tls else 4317), tls


SPAN_TAGS = {
    "gen_ai.usage.input_tokens": "input_tokens",
    "gen_ai.usage.output_tokens": "output_tokens",
    "gen_ai.response.model": "served_upstream_model",
    "switchyard.policy": "policy",
    "switchyard.model": "model",
    "switchyard.served_model": "served_model",
    "switchyard.reason": "reason",
    "switchyard.cost_usd": "cost_usd",
    "switchyard.usage_estimated": "usage_estimated",
}
"""Attributes of the request's span (Envoy's), from the dynamic metadata the ext_proc writes:
the decision with the request, usage and cost with the response's last chunk. Envoy reads
them when the span ends; a key the request never got is left out."""


def _metadata_tag(tag: str, key: str, host: bool = False) -> custom_tag_pb2.CustomTag:
    kind = metadata_pb2.MetadataKind
    return custom_tag_pb2.CustomTag(
        tag=tag,
        metadata=custom_tag_pb2.CustomTag.Metadata(
            kind=kind(host=kind.Host()) if host else kind(request=kind.Request()),
            metadata_key=metadata_pb2.MetadataKey(
                key=METADATA_NAMESPACE,
                path=[metadata_pb2.MetadataKey.PathSegment(key=key)],
            ),
        ),
    )


def hcm_tracing(sampling: float, service_name: str) -> hcm_pb2.HttpConnectionManager.Tracing:
    """The listener's tracing: OpenTelemetry over the collector cluster, ``sampling`` of the
    requests, one upstream span per attempt (a retried request shows each try), and the
    routing decision, usage and cost as attributes of the request's span (``SPAN_TAGS``)."""
    otel = opentelemetry_pb2.OpenTelemetryConfig(
        grpc_service=grpc_service_pb2.GrpcService(
            envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=COLLECTOR_CLUSTER),
            timeout=millis(2000),
        ),
        service_name=service_name,
    )
    return hcm_pb2.HttpConnectionManager.Tracing(
        random_sampling=percent_pb2.Percent(value=round(sampling * 100.0, 6)),
        provider=http_tracer_pb2.Tracing.Http(
            name="envoy.tracers.opentelemetry", typed_config=packed(otel)
        ),
        spawn_upstream_span=wrappers_pb2.BoolValue(value=True),
        custom_tags=[
            *(_metadata_tag(tag, key) for tag, key in SPAN_TAGS.items()),
            # Which model each attempt went to: its host's endpoint metadata.
            _metadata_tag("switchyard.upstream.model", "model", host=True),
        ],
    )


def collector_cluster(endpoint: str, system_ca_file: str) -> cluster_pb2.Cluster:
    """The OTLP/gRPC collector: HTTP/2, resolved by DNS unless an IP, TLS for https."""
    host, port, tls = collector_address(endpoint)
    h2 = http_pb2.HttpProtocolOptions(
        explicit_http_config=http_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
        )
    )
    is_ip = all(p.isdigit() for p in host.split(".")) and host.count(".") == 3
    address = address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=host, port_value=port)
    )
    cluster = cluster_pb2.Cluster(
        name=COLLECTOR_CLUSTER,
        type=cluster_pb2.Cluster.STATIC if is_ip else cluster_pb2.Cluster.STRICT_DNS,
        dns_lookup_family=cluster_pb2.Cluster.V4_PREFERRED,
        connect_timeout=seconds(2),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=COLLECTOR_CLUSTER,
            endpoints=[
                ep.LocalityLbEndpoints(
                    lb_endpoints=[ep.LbEndpoint(endpoint=ep.Endpoint(address=address))]
                )
            ],
        ),
        typed_extension_protocol_options=protocol_options(h2),
    )
    if tls:
        context = tls_pb2.UpstreamTlsContext(
            sni=host,
            common_tls_context=tls_pb2.CommonTlsContext(
                alpn_protocols=["h2"],
                validation_context=tls_common.CertificateValidationContext(
                    trusted_ca=base_pb2.DataSource(filename=system_ca_file),
                    match_typed_subject_alt_names=[
                        tls_common.SubjectAltNameMatcher(
                            san_type=tls_common.SubjectAltNameMatcher.DNS,
                            matcher=string_pb2.StringMatcher(exact=host),
                        )
                    ],
                ),
            ),
        )
        cluster.transport_socket.CopyFrom(
            base_pb2.TransportSocket(
                name="envoy.transport_sockets.tls", typed_config=packed(context)
            )
        )
    return cluster
