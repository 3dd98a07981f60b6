"""Which fallbacks Envoy may fail over to, and how an attempt's settings reach the Lua filter."""

from __future__ import annotations

from typing import Any

from envoy.extensions.clusters.aggregate.v3.cluster_pb2 import ClusterConfig

from switchyard.operator.compiler import compile_config
from switchyard.operator.envoy_config import GatewaySettings, build_clusters, build_route_config
from switchyard.operator.fallback import _lua_string, chain
from switchyard.operator.policy import parse_policy


def _models(policy_doc: dict[str, Any]) -> dict[str, Any]:
    return {m["name"]: m for m in policy_doc["spec"]["models"]}


def test_only_fallbacks_that_accept_everything_are_chained(policy_doc: dict[str, Any]) -> None:
    models = _models(policy_doc)
    models["light"]["fallbacks"] = ["standard", "capable"]
    models["light"]["dataClasses"] = ["public", "pii"]
    models["standard"]["dataClasses"] = ["public"]  # would move pii where it may not go
    models["capable"]["dataClasses"] = ["public", "pii"]
    config = compile_config([parse_policy(policy_doc)])
    policy = config.policies[0]
    light = next(m for m in policy.models if m.name == "light")
    assert [m.name for m in chain(policy, light)] == ["light", "capable"]
    models["capable"]["contextWindow"] = 256  # smaller than light's
    policy = compile_config([parse_policy(policy_doc)]).policies[0]
    light = next(m for m in policy.models if m.name == "light")
    assert [m.name for m in chain(policy, light)] == ["light"]


def test_routes_with_fallbacks_use_an_aggregate_cluster(policy_doc: dict[str, Any]) -> None:
    # The example's standard model fails over to capable (which accepts all standard does).
    config = compile_config([parse_policy(policy_doc)])
    clusters = {c.name: c for c in build_clusters(config, GatewaySettings())}
    aggregate = ClusterConfig()
    clusters["default.default.standard~fallbacks"].cluster_type.typed_config.Unpack(aggregate)
    assert list(aggregate.clusters) == ["default.default.standard", "default.default.capable"]
    endpoint = clusters["default.default.capable"].load_assignment.endpoints[0]
    metadata = endpoint.lb_endpoints[0].metadata.filter_metadata["switchyard"]
    assert metadata["backend"] == "default.default.capable"
    routes = build_route_config(config, GatewaySettings()).virtual_hosts[0].routes
    standard = next(r for r in routes if r.name == "default.default.standard")
    assert standard.route.cluster == "default.default.standard~fallbacks"
    light = next(r for r in routes if r.name == "default.default.light")
    assert light.route.cluster == "default.default.light"  # its fallback lacks pii
    retry = standard.route.retry_policy
    assert {"connect-failure", "5xx", "retriable-status-codes"} <= set(retry.retry_on.split(","))
    assert list(retry.retriable_status_codes) == [429]
    assert retry.num_retries.value >= 1


def test_lua_strings_escape_everything_unusual() -> None:
    assert _lua_string('a"b\\c') == '"a\\034b\\092c"'
    assert _lua_string("é\n") == '"\\195\\169\\010"'
