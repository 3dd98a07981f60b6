"""Client API keys through the real local gateway (Envoy + ext_proc + demo upstreams) with the
official ``openai`` client: 401s, 403s, both headers, the key never forwarded upstream nor
shown anywhere, and rotation/revocation by editing the ClientKeys file (no restart)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from gateway_harness import Gateway, start_gateway

from switchyard.local.ports import free_port_block
from switchyard.operator.clientkeys import hash_key

VALID = "sk-switchyard-valid-7d3f9c1e2b"
LIMITED = "sk-switchyard-limited-a81c44e0"
REVOKED = "sk-switchyard-revoked-5e2a90f7"
EXPIRED = "sk-switchyard-expired-c0ffee11"
ROTATED = "sk-switchyard-rotated-0b5e77aa"
HI = [{"role": "user", "content": "hi"}]


def keys_doc(revoke_valid: bool = False, rotated: bool = False) -> dict[str, Any]:
    keys: list[dict[str, Any]] = [
        {"name": "valid", "tenant": "alice", "sha256": hash_key(VALID), "revoked": revoke_valid},
        {"name": "limited", "tenant": "alice", "sha256": hash_key(LIMITED), "models": ["capable"]},
        {"name": "revoked", "tenant": "alice", "sha256": hash_key(REVOKED), "revoked": True},
        {
            "name": "expired",
            "tenant": "alice",
            "sha256": hash_key(EXPIRED),
            "expiresAt": "2021-01-01T00:00:00Z",
        },
    ]
    if rotated:
        keys.append({"name": "rotated", "tenant": "alice", "sha256": hash_key(ROTATED)})
    return {
        "apiVersion": "switchyard.dev/v1alpha1",
        "kind": "ClientKeys",
        "metadata": {"name": "clients"},
        "spec": {
            "tenants": [{"name": "team"}, {"name": "alice", "parent": "team"}],
            "keys": keys,
        },
    }


def write_keys(path: Path, doc: dict[str, Any]) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(yaml.safe_dump(doc))
    os.replace(temporary, path)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("keys")
    write_keys(directory / "keys.yaml", keys_doc())
    running = start_gateway(
        directory, extprocWorkers=1, metricsPort=free_port_block(), failOpenModel="light"
    )
    yield running
    assert running.stop() == 0, "".join(running.output)


def client(gateway: Gateway, key: str, **extra: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0, **extra)


def test_missing_unknown_revoked_expired_keys_get_401(gateway: Gateway) -> None:
    with httpx.Client() as plain:
        reply = plain.post(f"{gateway.base_url}/chat/completions", json={"model": "auto"})
    assert reply.status_code == 401
    assert reply.json()["error"]["code"] == "invalid_api_key"
    for key, word in (("sk-unknown-1", "unknown"), (REVOKED, "revoked"), (EXPIRED, "expired")):
        with pytest.raises(openai.AuthenticationError) as raised:
            client(gateway, key).chat.completions.create(model="auto", messages=HI)
        assert word in raised.value.message and key not in raised.value.message
        assert raised.value.code == "invalid_api_key"


def test_outside_the_allowance_is_403(gateway: Gateway) -> None:
    with pytest.raises(openai.PermissionDeniedError) as raised:
        client(gateway, LIMITED).chat.completions.create(model="light", messages=HI)
    assert raised.value.code == "permission_denied" and "light" in raised.value.message
    # "hi" routes to the light model; this key may only use capable, so it gets capable.
    reply = client(gateway, LIMITED).chat.completions.with_raw_response.create(
        model="auto", messages=HI
    )
    assert reply.headers["x-switchyard-model"] == "capable"
    free = client(gateway, VALID).chat.completions.with_raw_response.create(
        model="auto", messages=HI
    )
    assert free.headers["x-switchyard-model"] == "light"


def test_models_list_needs_a_key_and_shows_what_it_may_use(gateway: Gateway) -> None:
    with httpx.Client() as plain:
        refused = plain.get(f"{gateway.base_url}/models")
    assert refused.status_code == 401, refused.text
    assert refused.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(gateway, REVOKED).models.list()
    everything = {m.id for m in client(gateway, VALID).models.list()}
    assert {"auto", "light", "standard", "capable"} <= everything
    limited = [m.id for m in client(gateway, LIMITED).models.list()]
    assert "capable" in limited and "light" not in limited and "standard" not in limited


def test_valid_key_by_bearer_and_x_api_key_never_reaches_the_upstream(gateway: Gateway) -> None:
    reply = client(gateway, VALID).chat.completions.with_raw_response.create(
        model="auto", messages=HI
    )
    assert reply.http_response.status_code == 200
    model = reply.headers["x-switchyard-model"]
    port = gateway.demo_ports[f"demo-{model}"]
    seen = httpx.get(f"http://127.0.0.1:{port}/_demo/last_request").json()["headers"]
    assert "authorization" not in seen and VALID not in str(seen)
    # x-api-key alone (the Anthropic-style header): the openai client sends no Authorization.
    with httpx.Client() as plain:
        reply2 = plain.post(
            f"{gateway.base_url}/chat/completions",
            headers={"x-api-key": VALID},
            json={"model": "auto", "messages": HI},
        )
    assert reply2.status_code == 200, reply2.text
    seen = httpx.get(f"http://127.0.0.1:{port}/_demo/last_request").json()["headers"]
    assert "x-api-key" not in seen and VALID not in str(seen)


def test_the_key_appears_in_no_reply_metric_stat_or_log(gateway: Gateway) -> None:
    for key in (VALID, LIMITED, "sk-unknown-leak-check"):
        with httpx.Client() as plain:
            reply = plain.post(
                f"{gateway.base_url}/chat/completions",
                headers={"authorization": f"Bearer {key}"},
                json={"model": "auto", "messages": HI},
            )
        assert key not in reply.text and key not in str(reply.headers)
    spec = yaml.safe_load((gateway.directory / "gateway.yaml").read_text())["spec"]
    metrics = httpx.get(f"http://127.0.0.1:{spec['metricsPort']}/metrics").text
    stats = httpx.get(f"http://127.0.0.1:{gateway.admin_port}/stats").text
    output = "".join(gateway.output)
    for key in (VALID, LIMITED, "sk-unknown-leak-check"):
        assert key not in metrics and key not in stats and key not in output


def test_rotation_and_revocation_within_two_seconds(gateway: Gateway) -> None:
    def status(key: str) -> int:
        with httpx.Client() as plain:
            return plain.post(
                f"{gateway.base_url}/chat/completions",
                headers={"authorization": f"Bearer {key}"},
                json={"model": "auto", "messages": HI},
            ).status_code

    assert (status(VALID), status(ROTATED)) == (200, 401)
    path = gateway.directory / "keys.yaml"
    written = time.monotonic()
    write_keys(path, keys_doc(revoke_valid=True, rotated=True))
    try:
        while (status(VALID), status(ROTATED)) != (401, 200):
            assert time.monotonic() - written < 2.0, "rotation not live within 2 s"
        assert (status(VALID), status(ROTATED)) == (401, 200)
    finally:
        write_keys(path, keys_doc())
        deadline = time.monotonic() + 10
        while status(VALID) != 200:
            assert time.monotonic() < deadline
