"""Make before break: the snapshot pushed before the ext_procs switch serves both configs."""

from __future__ import annotations

import copy
from typing import Any

from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.route.v3.route_pb2 import RouteConfiguration

from switchyard.operator.compiler import compile_config
from switchyard.operator.envoy_config import CATCH_ALL_ROUTES, GatewaySettings
from switchyard.operator.policy import parse_policy
from switchyard.operator.xds_server import CLUSTER, ROUTE, Resources, bridge, build_snapshot


def _snapshot(doc: dict[str, Any]) -> dict[str, Resources]:
    return build_snapshot(compile_config([parse_policy(doc)]), GatewaySettings())


def _clusters(resources: Resources) -> list[str]:
    names = []
    for resource in resources.resources:
        cluster = Cluster()
        resource.Unpack(cluster)
        names.append(cluster.name)
    return names


def _routes(resources: Resources) -> list[str]:
    config = RouteConfiguration()
    resources.resources[0].Unpack(config)
    return [r.name for r in config.virtual_hosts[0].routes]


def test_a_renamed_model_keeps_its_old_route_and_cluster_until_the_final_push(
    policy_doc: dict[str, Any],
) -> None:
    old = _snapshot(policy_doc)
    renamed = copy.deepcopy(policy_doc)
    renamed["spec"]["models"][0]["name"] = "lite"
    renamed["spec"]["strategy"]["tiers"][0]["model"] = "lite"
    renamed["spec"]["strategy"]["rules"][0]["route"] = "lite"
    new = _snapshot(renamed)
    bridged = bridge(old, new)
    assert "default.default.light" in _clusters(bridged[CLUSTER])
    assert "default.default.lite" in _clusters(bridged[CLUSTER])
    assert "default.default.light" not in _clusters(new[CLUSTER])
    routes = _routes(bridged[ROUTE])
    assert {"default.default.light", "default.default.lite"} <= set(routes)
    # Both backend routes come before the routes that catch what no backend matched.
    first_catch_all = min(routes.index(n) for n in CATCH_ALL_ROUTES if n in routes)
    assert routes.index("default.default.light") < first_catch_all
    assert bridged[CLUSTER].version != new[CLUSTER].version
    assert bridged[ROUTE].version != new[ROUTE].version


def test_nothing_removed_means_no_bridge(policy_doc: dict[str, Any]) -> None:
    old = _snapshot(policy_doc)
    edited = copy.deepcopy(policy_doc)
    edited["spec"]["strategy"] = {"type": "rules", "default": "capable"}
    new = _snapshot(edited)
    assert bridge(old, new) is new
    assert bridge({}, new) is new
