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
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2  # noqa: F401
from envoy.config.listener.v3 import listener_pb2  # noqa: F401
from envoy.config.route.v3 import route_pb2  # noqa: F401
from envoy.extensions.clusters.aggregate.v3 import cluster_pb2 as aggregate_pb2  # noqa: F401
from envoy.extensions.filters.http.buffer.v3 import buffer_pb2  # noqa: F401
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2  # noqa: F401
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2  # noqa: F401
from envoy.extensions.filters.http.lua.v3 import lua_pb2  # noqa: F401
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.http.upstream_codec.v3 import upstream_codec_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2,
)
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2  # noqa: F401
from envoy.extensions.retry.priority.previous_priorities.v3 import (  # noqa: F401
    previous_priorities_config_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest, DiscoveryResponse
from google.protobuf import any_pb2, json_format

from switchyard.api.v1 import routing_pb2 as pb
from switchyard.operator.envoy_config import (
    ROUTE_CONFIG_NAME,
    ApiKeys,
    GatewaySettings,
    build_clusters,
    build_listener,
    build_route_config,
)
from switchyard.operator.races import first_completed

log = logging.getLogger(__name__)

_T = "type.googleapis.com/envoy.config."
CLUSTER = _T + "cluster.v3.Cluster"
ENDPOINT = _T + "endpoint.v3.ClusterLoadAssignment"
LISTENER = _T + "listener.v3.Listener"
ROUTE = _T + "route.v3.RouteConfiguration"
# Envoy wants clusters before the listeners and routes that use them, and an EDS cluster's
# endpoints right after the cluster (it stays warming until they arrive).
PUSH_ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE)


@dataclass(frozen=True)
class Resources:
    """One type's resources at one version."""

    version: str
    resources: tuple[any_pb2.Any, ...]


def pack(resources: list[dict[str, Any]]) -> Resources:
    """xDS JSON (with ``@type``) → packed protos, versioned by a hash of the content."""
    content = json.dumps(resources, sort_keys=True).encode()
    packed = []
    for resource in resources:
        message = any_pb2.Any()
        json_format.ParseDict(resource, message)
        packed.append(message)
    return Resources(hashlib.sha256(content).hexdigest()[:16], tuple(packed))


@dataclass
class NodeStatus:
    """What one Envoy last accepted and rejected, per type."""

    acked: dict[str, str] = field(default_factory=dict)
    nacked: dict[str, tuple[str, str]] = field(default_factory=dict)


NackCallback = Callable[[str, str, str, str], None]
"""(node id, type url, rejected version, error message)."""


class AdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """Serves the current snapshot to every Envoy over ADS."""

    def __init__(self, on_nack: NackCallback | None = None) -> None:
        self._snapshot: dict[str, Resources] = {}
        self._changed = asyncio.Event()
        self._nonce = 0
        self.nodes: dict[str, NodeStatus] = {}
        self._on_nack = on_nack

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
        try:
            while True:
                request = await self._next(requests, subscribed, sent)
                if request is False:
                    return
                if isinstance(request, DiscoveryRequest):
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
            log.warning("%s rejected %s %s: %s", node, request.type_url, last[0], message)
            if self._on_nack is not None:
                self._on_nack(node, request.type_url, last[0], message)
        else:
            status.acked[request.type_url] = request.version_info

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


def ads_bootstrap(node_id: str, admin_port: int, xds_host: str, xds_port: int) -> dict[str, Any]:
    """Envoy bootstrap that takes listeners, routes and clusters from this ADS server."""
    ads = {"ads": {}, "resource_api_version": "V3"}
    return {
        "node": {"id": node_id, "cluster": "switchyard"},
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [{"envoy_grpc": {"cluster_name": "switchyard_xds"}}],
            },
            "lds_config": ads,
            "cds_config": ads,
        },
        "static_resources": {
            "clusters": [
                {
                    "name": "switchyard_xds",
                    "type": "STRICT_DNS",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                            "HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "load_assignment": {
                        "cluster_name": "switchyard_xds",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": xds_host,
                                                    "port_value": xds_port,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ]
        },
    }


def build_snapshot(
    config: pb.RoutingConfig, settings: GatewaySettings, api_keys: ApiKeys | None = None
) -> dict[str, Resources]:
    """Every Envoy resource of ``config``, for ADS (routes also come over ADS)."""
    rds = {
        "route_config_name": ROUTE_CONFIG_NAME,
        "config_source": {"ads": {}, "resource_api_version": "V3"},
    }
    return {
        CLUSTER: pack(build_clusters(config, settings, api_keys)),
        LISTENER: pack([build_listener(config, settings, rds)]),
        ROUTE: pack([build_route_config(config, settings, api_keys)]),
    }


def merge_clusters(old: dict[str, Resources], new: dict[str, Resources]) -> dict[str, Resources]:
    """``new`` but still carrying clusters only ``old`` has (make before break).

    Pushed first when clusters go away, so routes still in flight never point at a missing
    cluster; the final snapshot follows once Envoy has the new routes.
    """
    if CLUSTER not in old or CLUSTER not in new:
        return new
    names = {_name(r) for r in new[CLUSTER].resources}
    kept = [r for r in old[CLUSTER].resources if _name(r) not in names]
    if not kept:
        return new
    resources = (*new[CLUSTER].resources, *kept)
    digest = hashlib.sha256(b"".join(r.SerializeToString() for r in resources)).hexdigest()
    return {**new, CLUSTER: Resources(digest[:16], resources)}


def _name(resource: any_pb2.Any) -> str:
    cluster = cluster_pb2.Cluster()
    resource.Unpack(cluster)
    return str(cluster.name)
