"""Envoy's per-attempt fallback and client keys, through the real gateway: when the routed
model's upstream fails, a key that may use the fallback model gets it, and a key that may not
never reaches it (the ext_proc picks the model's route without fallback)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import yaml
from gateway_harness import Gateway, start_gateway, url_model

from switchyard.local.ports import free_port_block
from switchyard.operator.clientkeys import hash_key

NARROW = "sk-switchyard-narrow-4c1d9e"
WIDE = "sk-switchyard-wide-8b2f7a"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("keyfallback")
    first = free_port_block(2)
    ports = {"flaky": first, "steady": first + 1}
    policy = {
        "apiVersion": "switchyard.dev/v1alpha1",
        "kind": "RoutePolicy",
        "metadata": {"name": "guarded", "namespace": "default"},
        "spec": {
            "match": {"models": ["auto"]},
            "models": [
                url_model("flaky", ports["flaky"], (1, 1), fallbacks=["steady"]),
                url_model("steady", ports["steady"], (5, 5)),
            ],
            "strategy": {"type": "rules", "default": "flaky"},
        },
    }
    keys: dict[str, Any] = {
        "apiVersion": "switchyard.dev/v1alpha1",
        "kind": "ClientKeys",
        "spec": {
            "tenants": [{"name": "team"}],
            "keys": [
                {
                    "name": "narrow",
                    "tenant": "team",
                    "sha256": hash_key(NARROW),
                    "models": ["flaky"],
                },
                {"name": "wide", "tenant": "team", "sha256": hash_key(WIDE)},
            ],
        },
    }
    (directory / "keys.yaml").write_text(yaml.safe_dump(keys))
    running = start_gateway(
        directory,
        policy,
        demoUpstreams=[
            {"name": "flaky", "port": ports["flaky"], "failureRate": 1.0},
            {"name": "steady", "port": ports["steady"]},
        ],
        extprocWorkers=1,
    )
    running.demo_ports.update(ports)
    yield running
    assert running.stop() == 0, "".join(running.output)


def ask(gateway: Gateway, key: str, text: str) -> Any:
    client = openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0)
    return client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": text}]
    )


def steady_saw(gateway: Gateway) -> str:
    port = gateway.demo_ports["steady"]
    seen = httpx.get(f"http://127.0.0.1:{port}/_demo/last_request").json()
    return str(seen)


def test_a_key_allowed_the_fallback_gets_it(gateway: Gateway) -> None:
    reply = ask(gateway, WIDE, "wide-marker-31")
    assert reply.headers["x-switchyard-model"] == "steady"
    assert "wide-marker-31" in steady_saw(gateway)


def test_a_key_not_allowed_the_fallback_never_reaches_it(gateway: Gateway) -> None:
    with pytest.raises(openai.InternalServerError) as raised:
        ask(gateway, NARROW, "narrow-marker-47")
    assert raised.value.status_code == 503
    assert raised.value.response.headers["x-switchyard-model"] == "flaky"
    assert "narrow-marker-47" not in steady_saw(gateway)
