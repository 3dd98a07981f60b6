"""A model whose upstream fails is retried on its fallback models, per attempt, through real
Envoy: each attempt carries the fallback's own model id and API key, and the response names the
model that answered. Fallbacks that would break a hard constraint are never used for this."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from gateway_harness import Gateway, start_gateway

from switchyard.local.ports import free_port_block

NAMES = ("failing", "steady", "narrow")


def _model(name: str, port: int, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "backend": {"url": f"http://127.0.0.1:{port}", "apiKeyEnv": f"SY_TEST_{name.upper()}_KEY"},
        "upstreamModel": f"{name}-v1",
        "pricing": {"inputPer1M": 1, "outputPer1M": 1},
        "dataClasses": ["public", "internal"],
        **extra,
    }


@pytest.fixture(scope="module")
def fallback_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    first = free_port_block(len(NAMES) + 1)
    ports = {name: first + i for i, name in enumerate(NAMES)}
    dead = first + len(NAMES)  # nothing listens there
    for name in NAMES:
        os.environ[f"SY_TEST_{name.upper()}_KEY"] = f"key-of-{name}"
    os.environ["SY_TEST_DEAD_KEY"] = "key-of-dead"
    policy = {
        "apiVersion": "switchyard.dev/v1alpha1",
        "kind": "RoutePolicy",
        "metadata": {"name": "resilient", "namespace": "default"},
        "spec": {
            "match": {"models": ["auto"]},
            "models": [
                _model("failing", ports["failing"], fallbacks=["narrow", "steady"]),
                _model("steady", ports["steady"], fallbacks=["failing"]),
                # Fewer data classes than "failing": never a failover target for it.
                _model("narrow", ports["narrow"], dataClasses=["public"]),
                _model("dead", dead, fallbacks=["steady"]),
                _model("alone", dead),
            ],
            "strategy": {"type": "rules", "default": "failing"},
        },
    }
    demo = [
        {"name": "failing", "port": ports["failing"], "failureRate": 1.0},
        {"name": "steady", "port": ports["steady"]},
        {"name": "narrow", "port": ports["narrow"]},
    ]
    gateway = start_gateway(tmp_path_factory.mktemp("fallback"), policy, demoUpstreams=demo)
    gateway.demo_ports.update(ports)
    yield gateway
    assert gateway.stop() == 0, "".join(gateway.output)


def _ask(gateway: Gateway, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hello there"}]}
    return httpx.post(f"{gateway.base_url}/chat/completions", json=body, timeout=10)


def _seen_by(gateway: Gateway, name: str) -> dict[str, Any]:
    port = gateway.demo_ports[name]
    return dict(httpx.get(f"http://127.0.0.1:{port}/_demo/last_request", timeout=5).json())


@pytest.mark.parametrize("model", ["auto", "failing", "dead"])
def test_a_failing_upstream_falls_back_to_the_next_model(
    fallback_gateway: Gateway, model: str
) -> None:
    response = _ask(fallback_gateway, model)
    assert response.status_code == 200, response.text
    assert response.headers["x-demo-upstream"] == "steady"
    assert response.headers["x-switchyard-model"] == "steady"
    assert response.headers["x-switchyard-upstream-model"] == "steady-v1"
    seen = _seen_by(fallback_gateway, "steady")
    assert seen["body"]["model"] == "steady-v1"
    assert seen["body"]["messages"][0]["content"] == "hello there"
    # The fallback gets its own key, never the failed model's.
    assert seen["headers"]["authorization"] == "Bearer key-of-steady"


def test_a_fallback_that_breaks_a_constraint_is_skipped(fallback_gateway: Gateway) -> None:
    before = _seen_by(fallback_gateway, "narrow")
    assert _ask(fallback_gateway, "failing").headers["x-demo-upstream"] == "steady"
    assert _seen_by(fallback_gateway, "narrow") == before  # "narrow" was never tried


def test_without_fallbacks_the_failure_reaches_the_client_as_openai_error(
    fallback_gateway: Gateway,
) -> None:
    response = _ask(fallback_gateway, "alone")
    assert response.status_code == 503
    assert response.json()["error"]["type"]


@pytest.mark.parametrize("model", ["narrow", "steady"])  # without and with fallbacks
def test_a_healthy_model_is_served_by_itself(fallback_gateway: Gateway, model: str) -> None:
    response = _ask(fallback_gateway, model)
    assert response.status_code == 200
    assert response.headers["x-switchyard-model"] == model
    seen = _seen_by(fallback_gateway, model)
    assert seen["body"]["model"] == f"{model}-v1"
    assert seen["headers"]["authorization"] == f"Bearer key-of-{model}"
    assert not any(h.startswith("x-switchyard") for h in seen["headers"])
