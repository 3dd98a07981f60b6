"""JWT authentication delegated to Envoy's jwt_authn through the real local gateway (Envoy +
ext_proc + demo upstreams) with the official ``openai`` client: tokens signed here with an
RSA key whose JWKS is inline in the ClientKeys document; the tenant claim picks the tenant
(allowance, rate limit), invalid tokens are OpenAI-style 401s, keys still work beside them, and
a client cannot forge the verified-payload header."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import openai
import pytest
import yaml
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from gateway_harness import Gateway, start_gateway

from switchyard.headers import JWT_PAYLOAD_HEADER
from switchyard.local.ports import free_port_block
from switchyard.operator.clientkeys import hash_key

ISSUER = "https://idp.example.test"
AUDIENCE = "switchyard"
KEY = "sk-switchyard-jwt-side-key-3c9d"
HI = [{"role": "user", "content": "hi"}]
SIGNER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
STRANGER = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwks() -> str:
    numbers = SIGNER.public_key().public_numbers()
    n = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
    e = numbers.e.to_bytes(3, "big")
    jwk = {"kty": "RSA", "kid": "k1", "alg": "RS256", "use": "sig", "n": _b64(n), "e": _b64(e)}
    return json.dumps({"keys": [jwk]})


def token(key: rsa.RSAPrivateKey = SIGNER, **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "user-1", "iat": now, "exp": now + 600}
    payload.update(claims)
    head = _b64(json.dumps({"alg": "RS256", "kid": "k1", "typ": "JWT"}).encode())
    body = _b64(json.dumps(payload).encode())
    signature = key.sign(f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{head}.{body}.{_b64(signature)}"


def keys_doc(jwks: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "switchyard.dev/v1alpha1",
        "kind": "ClientKeys",
        "metadata": {"name": "clients"},
        "spec": {
            "tenants": [
                {"name": "org"},
                {"name": "research", "parent": "org", "models": ["capable"]},
                {"name": "free", "parent": "org"},
                {"name": "metered", "parent": "org", "limits": {"requestsPerMinute": 2}},
            ],
            "keys": [{"name": "side", "tenant": "free", "sha256": hash_key(KEY)}],
            "jwt": {
                "issuer": ISSUER,
                "audiences": [AUDIENCE],
                "jwks": jwks or {"inline": _jwks()},
                "tenantClaim": "team",
            },
        },
    }


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("jwt")
    (directory / "keys.yaml").write_text(yaml.safe_dump(keys_doc()))
    running = start_gateway(directory, extprocWorkers=1, metricsPort=free_port_block())
    yield running
    assert running.stop() == 0, "".join(running.output)


def client(gateway: Gateway, bearer: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=bearer, max_retries=0)


def test_a_valid_token_gets_its_tenants_allowance(gateway: Gateway) -> None:
    research = client(gateway, token(team="research"))
    # "hi" routes to the light model; research may only use capable, so it gets capable.
    reply = research.chat.completions.with_raw_response.create(model="auto", messages=HI)
    assert reply.http_response.status_code == 200
    assert reply.headers["x-switchyard-model"] == "capable"
    with pytest.raises(openai.PermissionDeniedError) as raised:
        research.chat.completions.create(model="light", messages=HI)
    assert raised.value.code == "permission_denied"
    free = client(gateway, token(team="free")).chat.completions.with_raw_response.create(
        model="auto", messages=HI
    )
    assert free.headers["x-switchyard-model"] == "light"
    # Neither the token nor its verified payload reaches the upstream.
    seen = httpx.get(f"http://127.0.0.1:{gateway.demo_ports['demo-light']}/_demo/last_request")
    headers = seen.json()["headers"]
    assert "authorization" not in headers and JWT_PAYLOAD_HEADER not in headers


@pytest.mark.parametrize(
    "bearer",
    [
        token(exp=int(time.time()) - 60, team="free"),
        token(iss="https://other.example.test", team="free"),
        token(STRANGER, team="free"),
        token(aud="someone-else", team="free"),
    ],
    ids=["expired", "wrong-issuer", "bad-signature", "wrong-audience"],
)
def test_an_invalid_token_is_an_openai_401(gateway: Gateway, bearer: str) -> None:
    with pytest.raises(openai.AuthenticationError) as raised:
        client(gateway, bearer).chat.completions.create(model="auto", messages=HI)
    assert raised.value.code == "invalid_api_key"
    assert isinstance(raised.value.body, dict) and raised.value.message
    assert bearer not in raised.value.message and bearer not in raised.value.response.text


def test_a_claim_naming_no_tenant_is_403_naming_the_claim(gateway: Gateway) -> None:
    for claims in ({"team": "nobody-here"}, {}):
        with pytest.raises(openai.PermissionDeniedError) as raised:
            client(gateway, token(**claims)).chat.completions.create(model="auto", messages=HI)
        assert "'team'" in raised.value.message and "nobody-here" not in raised.value.message


def test_keys_still_work_and_a_forged_payload_header_is_ignored(gateway: Gateway) -> None:
    reply = client(gateway, KEY).chat.completions.with_raw_response.create(
        model="auto", messages=HI
    )
    assert reply.http_response.status_code == 200
    forged = _b64(json.dumps({"iss": ISSUER, "team": "free", "sub": "mallory"}).encode())
    with httpx.Client() as plain:
        # No credentials but a forged payload: still no caller (401).
        bare = plain.post(
            f"{gateway.base_url}/chat/completions",
            headers={JWT_PAYLOAD_HEADER: forged},
            json={"model": "auto", "messages": HI},
        )
        assert bare.status_code == 401, bare.text
        assert bare.json()["error"]["code"] == "invalid_api_key"
        # A research token with a forged "free" payload: the verified research claims win.
        mixed = plain.post(
            f"{gateway.base_url}/chat/completions",
            headers={
                "authorization": f"Bearer {token(team='research')}",
                JWT_PAYLOAD_HEADER: forged,
            },
            json={"model": "light", "messages": HI},
        )
        assert mixed.status_code == 403, mixed.text


def test_a_tenant_rate_limit_applies_to_its_tokens(gateway: Gateway) -> None:
    metered = client(gateway, token(team="metered", sub="user-2"))
    for _ in range(2):
        metered.chat.completions.create(model="auto", messages=HI)
    # Another caller of the same tenant shares its limit.
    other = client(gateway, token(team="metered", sub="user-3"))
    with pytest.raises(openai.RateLimitError) as raised:
        other.chat.completions.create(model="auto", messages=HI)
    assert "metered" in raised.value.message


class _JwksServer(BaseHTTPRequestHandler):
    fetches = 0

    def do_GET(self) -> None:
        _JwksServer.fetches += 1
        body = _jwks().encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _JwksServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"
    directory = tmp_path_factory.mktemp("jwt-remote")
    (directory / "keys.yaml").write_text(yaml.safe_dump(keys_doc({"uri": uri})))
    running = start_gateway(directory, extprocWorkers=1, metricsPort=free_port_block())
    yield running
    assert running.stop() == 0, "".join(running.output)
    server.shutdown()


def test_a_remote_jwks_is_fetched_by_envoy(remote: Gateway) -> None:
    research = client(remote, token(team="research"))
    deadline = time.monotonic() + 20
    while True:  # the listener does not wait for the first fetch
        try:
            reply = research.chat.completions.with_raw_response.create(model="auto", messages=HI)
            break
        except openai.AuthenticationError:
            assert time.monotonic() < deadline, "the JWKS was never fetched"
            time.sleep(0.1)
    assert reply.headers["x-switchyard-model"] == "capable"
    assert _JwksServer.fetches >= 1
    with pytest.raises(openai.AuthenticationError) as raised:
        client(remote, token(STRANGER, team="research")).chat.completions.create(
            model="auto", messages=HI
        )
    assert raised.value.code == "invalid_api_key"
    # A client key still takes the key path.
    keyed = client(remote, KEY).chat.completions.with_raw_response.create(model="auto", messages=HI)
    assert keyed.http_response.status_code == 200
    # GET /v1/models takes the same paths: a verified token's tenant, or a key.
    assert "capable" in {m.id for m in research.models.list()}
    with pytest.raises(openai.AuthenticationError):
        client(remote, token(STRANGER, team="research")).models.list()


def test_no_token_appears_in_the_output_metrics_or_stats(gateway: Gateway) -> None:
    bearers = [token(team="free", sub="leak-check"), token(STRANGER, team="free")]
    for bearer in bearers:
        with httpx.Client() as plain:
            reply = plain.post(
                f"{gateway.base_url}/chat/completions",
                headers={"authorization": f"Bearer {bearer}"},
                json={"model": "auto", "messages": HI},
            )
        assert reply.status_code in (200, 401) and bearer not in reply.text
    spec = yaml.safe_load((gateway.directory / "gateway.yaml").read_text())["spec"]
    metrics = httpx.get(f"http://127.0.0.1:{spec['metricsPort']}/metrics").text
    stats = httpx.get(f"http://127.0.0.1:{gateway.admin_port}/stats").text
    output = "".join(gateway.output)
    for bearer in bearers:
        signature = bearer.rsplit(".", 1)[1]
        assert signature not in metrics and signature not in stats and signature not in output
