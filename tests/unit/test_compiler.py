from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from envoy.extensions.filters.http.ext_proc.v3.ext_proc_pb2 import ExternalProcessor
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from switchyard.headers import EXTPROC_FILTER
from switchyard.operator.compiler import CompileError, compile_config, duration_ms
from switchyard.operator.envoy_config import GatewaySettings, build_listener, build_route_config
from switchyard.operator.policy import parse_policy


def test_version_is_a_content_hash(policy_doc: dict[str, Any]) -> None:
    first = compile_config([parse_policy(policy_doc)])
    again = compile_config([parse_policy(copy.deepcopy(policy_doc))])
    assert first.version == again.version
    policy_doc["spec"]["models"][0]["pricing"]["inputPer1M"] = 0.06
    assert compile_config([parse_policy(policy_doc)]).version != first.version


def test_headers_routing_reads_are_listed(policy_doc: dict[str, Any]) -> None:
    policy_doc["spec"]["match"]["headers"] = {"X-Team": "a"}
    config = compile_config([parse_policy(policy_doc)])
    assert list(config.request_headers) == [
        "x-priority",
        "x-session-id",
        "x-switchyard-data-class",
        "x-team",
    ]
    listener = build_listener(config, GatewaySettings())
    hcm = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    ext_proc = ExternalProcessor()
    next(f for f in hcm.http_filters if f.name == EXTPROC_FILTER).typed_config.Unpack(ext_proc)
    assert "request.headers['x-team']" in ext_proc.request_attributes


@pytest.mark.parametrize(
    ("text", "ms"), [("300s", 300_000), ("1m30s", 90_000), ("250ms", 250), ("1.5s", 1500)]
)
def test_durations(text: str, ms: int) -> None:
    assert duration_ms(text) == ms


def test_retries_and_timeout_reach_the_routes(policy_doc: dict[str, Any]) -> None:
    policy_doc["spec"]["retries"] = {
        "attempts": 3,
        "perTryTimeout": "20s",
        "on": ["reset", "429", "5xx"],
    }
    policy_doc["spec"]["timeout"] = "2m"
    config = compile_config([parse_policy(policy_doc)])
    routes = build_route_config(config, GatewaySettings()).virtual_hosts[0].routes
    light = next(r for r in routes if r.name == "default.default.light")
    assert light.route.timeout.ToMilliseconds() == 120_000
    retry = light.route.retry_policy
    assert retry.retry_on == "reset,refused-stream,5xx,retriable-status-codes"
    assert retry.num_retries.value == 3
    assert retry.per_try_timeout.ToMilliseconds() == 20_000
    assert list(retry.retriable_status_codes) == [429]
    models = next(r for r in routes if r.name == "models")
    ids = {m["id"] for m in json.loads(models.direct_response.body.inline_string)["data"]}
    assert {"auto", "light", "default/default/light"} <= ids


def test_fail_open_model_must_be_unique(policy_doc: dict[str, Any]) -> None:
    config = compile_config([parse_policy(policy_doc)], "standard")
    assert config.fail_open_backend == "default.default.standard"
    with pytest.raises(CompileError, match="failOpenModel"):
        compile_config([parse_policy(policy_doc)], "nope")
