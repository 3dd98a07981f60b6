"""A state-of-the-world ADS server: pushes versioned listeners, routes and clusters to Envoy.

The control plane publishes a snapshot (one version per resource type, content-hashed). Every
connected Envoy gets a type's resources when it subscribes and again whenever that type's
version changes. Clusters go out before listeners and routes, so a route never names a cluster
that Envoy does not have yet. ACKs and NACKs are recorded per node and type, and NACKs are
reported through a callback, so a rejected config can surface on the RoutePolicy's status.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    grpc_service_pb2,
    protocol_pb2,
)
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as http_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest, DiscoveryResponse
from google.protobuf import any_pb2, duration_pb2, json_format
from google.protobuf.message import Message

from switchyard.api.v1 import routing_pb2 as pb
from switchyard.operator.envoy_config import (
    ADS,
    CATCH_ALL_ROUTES,
    ApiKeys,
    GatewaySettings,
    build_clusters,
    build_listener,
    build_route_config,
)
from switchyard.operator.envoy_tls import EnvoyMtls, upstream_mtls
from switchyard.operator.metrics import ENVOY, OperatorMetrics
from switchyard.operator.races import first_completed
from switchyard.operator.xds_types import packed, protocol_options

log = logging.getLogger(__name__)

_T = "type.googleapis.com/envoy.config."
CLUSTER = _T + "cluster.v3.Cluster"
ENDPOINT = _T + "endpoint.v3.ClusterLoadAssignment"
LISTENER = _T + "listener.v3.Listener"
ROUTE = _T + "route.v3.RouteConfiguration"
# Envoy wants clusters before the listeners and routes that use them, and an EDS cluster's
# endpoints right after the cluster (it stays warming until they arrive).
PUSH_ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE)
XDS_CLUSTER = "switchyard_xds"


@dataclass(frozen=True)
class Resources:
    """One type's resources at one version."""

    version: str
    resources: tuple[any_pb2.Any, ...]


def pack(resources: list[Message]) -> Resources:
    """Typed resources → packed Anys, versioned by a hash of their content."""
    return _versioned(tuple(packed(r) for r in resources))


@dataclass
class NodeStatus:
    """What one Envoy last accepted and rejected, per type."""

    acked: dict[str, str] = field(default_factory=dict)
    nacked: dict[str, tuple[str, str]] = field(default_factory=dict)


NackCallback = Callable[[str, str, str, str], None]
"""(node id, type url, rejected version, error message)."""


class AdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """Serves the current snapshot to every Envoy over ADS."""

    def __init__(
        self, on_nack: NackCallback | None = None, metrics: OperatorMetrics | None = None
    ) -> None:
        self._snapshot: dict[str, Resources] = {}
        self._changed = asyncio.Event()
        self._nonce = 0
        self.nodes: dict[str, NodeStatus] = {}
        self._on_nack = on_nack
        self._metrics = metrics or OperatorMetrics()

    @property
    def snapshot(self) -> dict[str, Resources]:
        return dict(self._snapshot)

    async def publish(self, snapshot: dict[str, Resources]) -> None:
        """Make ``snapshot`` current and wake every stream."""
        self._snapshot = dict(snapshot)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def acked_everywhere(self, type_url: str, version: str) -> bool:
        """True when every connected node has ACKed ``version`` of ``type_url``."""
        return bool(self.nodes) and all(
            n.acked.get(type_url) == version for n in self.nodes.values()
        )

    async def StreamAggregatedResources(
        self,
        request_iterator: AsyncIterator[DiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[DiscoveryResponse]:
        requests: asyncio.Queue[DiscoveryRequest | None] = asyncio.Queue()

        async def read() -> None:
            async for request in request_iterator:
                await requests.put(request)
            await requests.put(None)

        reader = asyncio.create_task(read())
        node = ""
        subscribed: set[str] = set()
        sent: dict[str, tuple[str, str]] = {}  # type → (version, nonce)
        self._metrics.stream_opened(ENVOY)
        try:
            while True:
                request = await self._next(requests, subscribed, sent)
                if request is False:
                    return
                if isinstance(request, DiscoveryRequest):
                    if request.node.id and request.node.id != node:
                        self._metrics.client_named(ENVOY, request.node.id, node)
                    node = request.node.id or node
                    self._record(node, request, sent)
                    subscribed.add(request.type_url)
                for type_url in PUSH_ORDER:
                    response = self._response_if_due(type_url, subscribed, sent)
                    if response is not None:
                        yield response
        finally:
            reader.cancel()
            self.nodes.pop(node, None)
            self._metrics.stream_closed(ENVOY, node)

    async def _next(
        self,
        requests: asyncio.Queue[DiscoveryRequest | None],
        subscribed: set[str],
        sent: dict[str, tuple[str, str]],
    ) -> DiscoveryRequest | bool | None:
        """The next request, None when the snapshot moved ahead of a stream, False at the end."""
        changed = self._changed  # taken before the check, so no publish slips between
        outdated = any(
            t in self._snapshot and sent.get(t, ("", ""))[0] != self._snapshot[t].version
            for t in subscribed
        )
        if outdated and requests.empty():
            return None
        getter, _ = await first_completed(requests.get(), changed.wait())
        if getter.done() and not getter.cancelled():
            request = getter.result()
            return False if request is None else request
        return None

    def _record(
        self, node: str, request: DiscoveryRequest, sent: dict[str, tuple[str, str]]
    ) -> None:
        status = self.nodes.setdefault(node, NodeStatus())
        last = sent.get(request.type_url)
        if last is None or request.response_nonce != last[1]:
            return  # first request of a type, or a stale nonce
        if request.HasField("error_detail"):
            message = request.error_detail.message
            status.nacked[request.type_url] = (last[0], message)
            self._metrics.response(ENVOY, node, request.type_url, acked=False)
            log.warning("%s rejected %s %s: %s", node, request.type_url, last[0], message)
            if self._on_nack is not None:
                self._on_nack(node, request.type_url, last[0], message)
        else:
            status.acked[request.type_url] = request.version_info
            self._metrics.response(ENVOY, node, request.type_url, acked=True)

    def _response_if_due(
        self, type_url: str, subscribed: set[str], sent: dict[str, tuple[str, str]]
    ) -> DiscoveryResponse | None:
        current = self._snapshot.get(type_url)
        if type_url not in subscribed or current is None:
            return None
        if sent.get(type_url, ("", ""))[0] == current.version:
            return None
        self._nonce += 1
        nonce = str(self._nonce)
        sent[type_url] = (current.version, nonce)
        if type_url == CLUSTER:
            # A changed EDS cluster is rebuilt and waits for its endpoints: send them again.
            sent.pop(ENDPOINT, None)
        return DiscoveryResponse(
            version_info=current.version,
            type_url=type_url,
            nonce=nonce,
            resources=list(current.resources),
        )


def ads_bootstrap_message(
    node_id: str, admin_port: int, xds_host: str, xds_port: int, tls: EnvoyMtls | None = None
) -> bootstrap_pb2.Bootstrap:
    """Envoy bootstrap that takes listeners, routes and clusters from this ADS server (over
    mTLS with ``tls``)."""
    h2 = http_pb2.HttpProtocolOptions(
        explicit_http_config=http_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
        )
    )
    xds = cluster_pb2.Cluster(
        name=XDS_CLUSTER,
        type=cluster_pb2.Cluster.STRICT_DNS,
        connect_timeout=duration_pb2.Duration(seconds=1),
        typed_extension_protocol_options=protocol_options(h2),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=XDS_CLUSTER,
            endpoints=[
                endpoint_components_pb2.LocalityLbEndpoints(
                    lb_endpoints=[
                        endpoint_components_pb2.LbEndpoint(
                            endpoint=endpoint_components_pb2.Endpoint(
                                address=_socket(xds_host, xds_port)
                            )
                        )
                    ]
                )
            ],
        ),
    )
    if tls is not None:
        xds.transport_socket.CopyFrom(upstream_mtls(tls))
    grpc_service = grpc_service_pb2.GrpcService(
        envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=XDS_CLUSTER)
    )
    return bootstrap_pb2.Bootstrap(
        node=base_pb2.Node(id=node_id, cluster="switchyard"),
        admin=bootstrap_pb2.Admin(address=_socket("127.0.0.1", admin_port)),
        dynamic_resources=bootstrap_pb2.Bootstrap.DynamicResources(
            ads_config=config_source_pb2.ApiConfigSource(
                api_type=config_source_pb2.ApiConfigSource.GRPC,
                transport_api_version=config_source_pb2.V3,
                set_node_on_first_message_only=True,
                grpc_services=[grpc_service],
            ),
            lds_config=ADS,
            cds_config=ADS,
        ),
        static_resources=bootstrap_pb2.Bootstrap.StaticResources(clusters=[xds]),
    )


def ads_bootstrap(node_id: str, admin_port: int, xds_host: str, xds_port: int) -> dict[str, Any]:
    """``ads_bootstrap_message`` as the JSON Envoy reads with ``-c``."""
    message = ads_bootstrap_message(node_id, admin_port, xds_host, xds_port)
    return dict(json_format.MessageToDict(message, preserving_proto_field_name=True))


def _socket(host: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=host, port_value=port)
    )


def build_snapshot(
    config: pb.RoutingConfig, settings: GatewaySettings, api_keys: ApiKeys | None = None
) -> dict[str, Resources]:
    """Every Envoy resource of ``config``, for ADS (routes also come over ADS)."""
    return {
        CLUSTER: pack(list(build_clusters(config, settings, api_keys))),
        LISTENER: pack([build_listener(config, settings)]),
        ROUTE: pack([build_route_config(config, settings, api_keys)]),
    }


def bridge(old: dict[str, Resources], new: dict[str, Resources]) -> dict[str, Resources]:
    """``new`` still carrying the clusters and backend routes only ``old`` has (make before
    break).

    Published first, so a request routed by an ext_proc that still runs the old config finds
    its route and cluster; the final snapshot follows once every ext_proc has the new one.
    Returns ``new`` itself when nothing of ``old`` needs keeping.
    """
    if CLUSTER not in old or CLUSTER not in new:
        return new
    bridged = dict(new)
    names = {_name(r, cluster_pb2.Cluster()) for r in new[CLUSTER].resources}
    kept = [r for r in old[CLUSTER].resources if _name(r, cluster_pb2.Cluster()) not in names]
    if kept:
        bridged[CLUSTER] = _versioned((*new[CLUSTER].resources, *kept))
    if ROUTE in old and ROUTE in new:
        routes = _bridge_routes(old[ROUTE].resources[0], new[ROUTE].resources[0])
        if routes is not None:
            bridged[ROUTE] = _versioned((routes,))
    return new if bridged == new else bridged


def backend_routes(snapshot: dict[str, Resources]) -> set[str]:
    """Names of the backend routes (one per model) in a snapshot."""
    if ROUTE not in snapshot:
        return set()
    config = route_pb2.RouteConfiguration()
    snapshot[ROUTE].resources[0].Unpack(config)
    return {r.name for h in config.virtual_hosts for r in h.routes if r.match.dynamic_metadata}


def _bridge_routes(old: any_pb2.Any, new: any_pb2.Any) -> any_pb2.Any | None:
    """The new route configuration plus the old one's backend routes it lacks, ahead of the
    catch-all routes; None when it lacks none."""
    before, after = route_pb2.RouteConfiguration(), route_pb2.RouteConfiguration()
    old.Unpack(before)
    new.Unpack(after)
    routes = after.virtual_hosts[0].routes
    names = {r.name for r in routes}
    kept = [
        r
        for r in before.virtual_hosts[0].routes
        if r.match.dynamic_metadata and r.name not in names
    ]
    if not kept:
        return None
    merged = route_pb2.RouteConfiguration()
    merged.CopyFrom(after)
    host = merged.virtual_hosts[0]
    del host.routes[:]
    host.routes.extend(r for r in routes if r.name not in CATCH_ALL_ROUTES)
    host.routes.extend(kept)
    host.routes.extend(r for r in routes if r.name in CATCH_ALL_ROUTES)
    return packed(merged)


def _versioned(resources: tuple[any_pb2.Any, ...]) -> Resources:
    digest = hashlib.sha256(b"".join(r.SerializeToString(deterministic=True) for r in resources))
    return Resources(digest.hexdigest()[:16], resources)


def _name(resource: any_pb2.Any, message: Message) -> str:
    resource.Unpack(message)
    return str(message.name)
