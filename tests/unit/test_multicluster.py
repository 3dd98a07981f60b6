"""Multi-cluster placement: EndpointSlices from several clusters → prioritised Envoy localities."""

from __future__ import annotations

from typing import Any

from envoy.config.cluster.v3.cluster_pb2 import Cluster

from switchyard.operator.compiler import compile_config
from switchyard.operator.envoy_config import GatewaySettings, build_clusters, build_route_config
from switchyard.operator.multicluster import EndpointDirectory
from switchyard.operator.policy import parse_policy


def _slice(name: str, namespace: str, addresses: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": "vllm"},
        },
        "ports": [{"port": 8000}],
        "endpoints": [
            {"addresses": [a], "conditions": {"ready": True}, **extra} for a in addresses
        ],
    }


def _directory() -> EndpointDirectory:
    directory = EndpointDirectory("home", "eu")
    directory.apply("home", "ADDED", _slice("a", "default", ["10.0.0.1", "10.0.0.2"], zone="z1"))
    directory.replace_cluster("eu-2", "eu", [_slice("b", "default", ["10.1.0.1"])])
    directory.replace_cluster("us-1", "us", [_slice("c", "default", ["10.2.0.1"])])
    directory.replace_cluster("other-ns", "eu", [_slice("d", "elsewhere", ["10.3.0.1"])])
    return directory


def _in_house(policy_doc: dict[str, Any], **model: Any) -> dict[str, Any]:
    policy_doc["spec"]["models"].append(
        {
            "name": "in-house",
            "backend": {"service": {"name": "vllm", "port": 8000}},
            "upstreamModel": "llama",
            "pricing": {"inputPer1M": 0.02, "outputPer1M": 0.02},
            **model,
        }
    )
    return policy_doc


def _placement(policy_doc: dict[str, Any], directory: EndpointDirectory) -> list[tuple[str, int]]:
    config = compile_config([parse_policy(policy_doc)], "", directory.endpoints, directory.topology)
    model = next(m for m in config.policies[0].models if m.name == "in-house")
    assert model.backend.resolved
    return [(e.address, e.priority) for e in model.backend.endpoints]


def test_local_first_then_same_region_then_the_rest(policy_doc: dict[str, Any]) -> None:
    placed = _placement(_in_house(policy_doc), _directory())
    assert placed == [("10.0.0.1", 0), ("10.0.0.2", 0), ("10.1.0.1", 1), ("10.2.0.1", 2)]


def test_priorities_stay_contiguous_when_the_local_endpoints_are_gone(
    policy_doc: dict[str, Any],
) -> None:
    directory = _directory()
    assert directory.apply("home", "DELETED", _slice("a", "default", []))
    assert _placement(_in_house(policy_doc), directory) == [("10.1.0.1", 0), ("10.2.0.1", 1)]


def test_region_constraint_drops_other_regions(policy_doc: dict[str, Any]) -> None:
    constrained = _in_house(policy_doc, region="us")
    assert _placement(constrained, _directory()) == [("10.2.0.1", 0)]
    no_region = EndpointDirectory("home", "")
    no_region.apply("home", "ADDED", _slice("a", "default", ["10.0.0.1"]))
    # A cluster of unknown region never satisfies a region constraint.
    assert _placement(constrained, no_region) == []


def test_preferred_cluster_comes_first(policy_doc: dict[str, Any]) -> None:
    placed = _placement(_in_house(policy_doc, cluster="us-1"), _directory())
    assert placed[0] == ("10.2.0.1", 0)
    assert {p for _, p in placed[1:]} == {1}  # no other cluster shares us-1's region


def test_not_ready_endpoints_and_port_mismatch() -> None:
    directory = EndpointDirectory()
    body = _slice("a", "ns", ["10.0.0.1"])
    body["endpoints"].append({"addresses": ["10.0.0.9"], "conditions": {"ready": False}})
    assert directory.apply("local", "ADDED", body)
    assert not directory.apply("local", "MODIFIED", body)  # unchanged
    assert [e.address for e in directory.endpoints("ns", "vllm", 9999)] == ["10.0.0.1"]
    body["ports"].append({"port": 8001})
    directory.apply("local", "MODIFIED", body)
    assert directory.endpoints("ns", "vllm", 9999) == []  # two ports, neither is 9999


def test_dropping_a_remote_cluster_forgets_its_endpoints(policy_doc: dict[str, Any]) -> None:
    directory = _directory()
    directory.drop_cluster("us-1")
    directory.drop_cluster("home")  # the local cluster is never dropped
    assert _placement(_in_house(policy_doc), directory) == [
        ("10.0.0.1", 0),
        ("10.0.0.2", 0),
        ("10.1.0.1", 1),
    ]


def test_envoy_gets_localities_priorities_health_checks_and_priority_retries(
    policy_doc: dict[str, Any],
) -> None:
    directory = _directory()
    config = compile_config(
        [parse_policy(_in_house(policy_doc))], "", directory.endpoints, directory.topology
    )
    clusters = {c.name: c for c in build_clusters(config, GatewaySettings())}
    in_house = clusters["default.default.in-house"]
    assert in_house.type == Cluster.STATIC
    localities = in_house.load_assignment.endpoints
    assert [
        (g.priority, g.locality.region, g.locality.zone, g.locality.sub_zone) for g in localities
    ] == [
        (0, "eu", "z1", "home"),
        (1, "eu", "", "eu-2"),
        (2, "us", "", "us-1"),
    ]
    assert len(localities[0].lb_endpoints) == 2
    assert in_house.health_checks[0].HasField("tcp_health_check")
    assert not clusters["default.default.light"].health_checks  # external URL: passive only
    routes = build_route_config(config, GatewaySettings()).virtual_hosts[0].routes
    retry = next(r for r in routes if r.name == "default.default.in-house").route.retry_policy
    assert retry.retry_priority.name == "envoy.retry_priorities.previous_priorities"
    assert retry.retry_host_predicate[0].name == "envoy.retry_host_predicates.previous_hosts"


def test_local_mode_reaches_services_by_dns(policy_doc: dict[str, Any]) -> None:
    config = compile_config([parse_policy(_in_house(policy_doc))])
    clusters = {c.name: c for c in build_clusters(config, GatewaySettings())}
    in_house = clusters["default.default.in-house"]
    assert in_house.type == Cluster.STRICT_DNS
    address = in_house.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address
    assert address.socket_address.address == "vllm.default.svc.cluster.local"
