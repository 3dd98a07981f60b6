"""The ext_proc cluster over EDS: its form, and how the ADS server and the control plane keep
its endpoints current and re-sent after every cluster push."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.core.v3.config_source_pb2 import V3
from envoy.config.endpoint.v3 import endpoint_pb2
from google.protobuf.empty_pb2 import Empty

from switchyard.api.v1 import routing_pb2 as pb
from switchyard.operator.control_plane import ControlPlane
from switchyard.operator.envoy_config import EXTPROC_CLUSTER, GatewaySettings, extproc_cluster
from switchyard.operator.xds_server import CLUSTER, ENDPOINT, LISTENER, AdsServer, pack


def test_the_extproc_cluster_is_static_locally_and_eds_in_kubernetes() -> None:
    static = extproc_cluster(GatewaySettings(extproc_endpoints=[("10.0.0.1", 9002)]))
    assert static.type == Cluster.STATIC
    address = static.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address
    assert (address.socket_address.address, address.socket_address.port_value) == (
        "10.0.0.1",
        9002,
    )
    eds = extproc_cluster(GatewaySettings(extproc_eds=True))
    assert eds.type == Cluster.EDS
    assert not eds.HasField("load_assignment")
    assert eds.eds_cluster_config.service_name == EXTPROC_CLUSTER
    source = eds.eds_cluster_config.eds_config
    assert source.HasField("ads") and source.resource_api_version == V3


def test_endpoints_are_resent_after_every_cluster_push() -> None:
    ads = AdsServer()
    ads._snapshot = {
        CLUSTER: pack([]),
        ENDPOINT: pack([]),
        LISTENER: pack([]),
    }
    subscribed = {CLUSTER, ENDPOINT, LISTENER}
    sent: dict[str, tuple[str, str]] = {}
    first = [ads._response_if_due(t, subscribed, sent) for t in (CLUSTER, ENDPOINT, LISTENER)]
    assert all(r is not None for r in first)
    assert ads._response_if_due(ENDPOINT, subscribed, sent) is None  # nothing new
    ads._snapshot[CLUSTER] = pack([Empty()])
    assert ads._response_if_due(CLUSTER, subscribed, sent) is not None
    again = ads._response_if_due(ENDPOINT, subscribed, sent)
    assert again is not None and again.version_info == ads._snapshot[ENDPOINT].version


def _hosts(plane: ControlPlane) -> list[str]:
    (resource,) = plane.ads.snapshot[ENDPOINT].resources
    assignment = endpoint_pb2.ClusterLoadAssignment()
    resource.Unpack(assignment)
    assert assignment.cluster_name == EXTPROC_CLUSTER
    return [
        f"{e.endpoint.address.socket_address.address}:{e.endpoint.address.socket_address.port_value}"
        for group in assignment.endpoints
        for e in group.lb_endpoints
    ]


async def test_every_published_snapshot_carries_the_latest_endpoints() -> None:
    plane = ControlPlane(GatewaySettings(extproc_eds=True))
    await plane.set_extproc_endpoints([("10.0.0.2", 9002)])
    assert plane.ads.snapshot == {}  # nothing is published before the first config
    await plane.prime(pb.RoutingConfig(version="v1"))
    assert _hosts(plane) == ["10.0.0.2:9002"]
    cluster_version = plane.ads.snapshot[CLUSTER].version
    await plane.set_extproc_endpoints([("10.0.0.3", 9002), ("10.0.0.2", 9002), ("10.0.0.3", 9002)])
    assert _hosts(plane) == ["10.0.0.2:9002", "10.0.0.3:9002"]
    assert plane.ads.snapshot[CLUSTER].version == cluster_version  # no cluster churn
    await plane._publish({**plane.ads.snapshot})  # what apply() does with a built snapshot
    assert _hosts(plane) == ["10.0.0.2:9002", "10.0.0.3:9002"]


async def test_static_extproc_endpoints_cannot_be_moved() -> None:
    plane = ControlPlane(GatewaySettings())
    with pytest.raises(RuntimeError, match="static"):
        await plane.set_extproc_endpoints([("10.0.0.2", 9002)])
    await plane.prime(pb.RoutingConfig(version="v1"))
    assert ENDPOINT not in plane.ads.snapshot


def test_a_named_extproc_endpoint_is_resolved_not_static() -> None:
    """Envoy NACKs a host name in a STATIC cluster (the chart's old --extproc=<svc>:9002)."""
    named = extproc_cluster(GatewaySettings(extproc_endpoints=[("sy-extproc.ns.svc", 9002)]))
    assert named.type == Cluster.STRICT_DNS
    unix = extproc_cluster(GatewaySettings(extproc_endpoints=[("unix:/tmp/x.sock", 0)]))
    assert unix.type == Cluster.STATIC
