"""https model backends: Envoy speaks TLS with SNI and verifies the certificate, against the
backend's own `caBundle` or else the system CAs, and for the URL's host name."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from certs import cert_pem, issue_cert, key_pem, new_key, x509_name
from gateway_harness import REPO, Gateway, start_gateway

from switchyard.local.ports import free_port_block
from switchyard.local.runner import port_open, wait_until

MODELS = ("trusted", "unknown-ca", "wrong-host")


def _write_server(directory: Path, name: str, ca: Any, ca_key: Any, host: str) -> list[str]:
    key = new_key()
    cert = issue_cert(x509_name(host), key, ca.subject, ca_key, server=True, hosts=[host])
    (directory / f"{name}.crt").write_bytes(cert_pem(cert))
    (directory / f"{name}.key").write_bytes(key_pem(key))
    return [
        "--tls-cert",
        str(directory / f"{name}.crt"),
        "--tls-key",
        str(directory / f"{name}.key"),
    ]


@pytest.fixture(scope="module")
def tls_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("tls")
    ca_key, stranger_key = new_key(), new_key()
    ca = issue_cert(x509_name("test-ca"), ca_key, x509_name("test-ca"), ca_key, ca=True)
    stranger = issue_cert(
        x509_name("stranger-ca"), stranger_key, x509_name("stranger-ca"), stranger_key, ca=True
    )
    first = free_port_block(len(MODELS))
    ports = {name: first + i for i, name in enumerate(MODELS)}
    tls_args = {
        "trusted": _write_server(directory, "trusted", ca, ca_key, "localhost"),
        "unknown-ca": _write_server(directory, "unknown-ca", stranger, stranger_key, "localhost"),
        "wrong-host": _write_server(directory, "wrong-host", ca, ca_key, "api.example.com"),
    }
    cli = [sys.executable, "-m", "switchyard.cli", "demo-upstream"]
    upstreams = [
        subprocess.Popen([*cli, "--name", name, "--port", str(port), *tls_args[name]], cwd=REPO)
        for name, port in ports.items()
    ]
    try:
        for port in ports.values():
            wait_until(lambda p=port: port_open("127.0.0.1", p), 30, "TLS demo upstream")
        yield from _gateway(directory, ports, cert_pem(ca).decode())
    finally:
        for upstream in upstreams:
            upstream.terminate()
            upstream.wait(timeout=20)


def _gateway(directory: Path, ports: dict[str, int], ca_pem: str) -> Iterator[Gateway]:
    policy = {
        "apiVersion": "switchyard.dev/v1alpha1",
        "kind": "RoutePolicy",
        "metadata": {"name": "tls", "namespace": "default"},
        "spec": {
            "match": {"models": ["auto"]},
            "models": [
                {
                    "name": name,
                    "backend": {
                        "url": f"https://localhost:{port}",
                        # unknown-ca trusts the system CAs only, which never signed its cert.
                        **({} if name == "unknown-ca" else {"caBundle": ca_pem}),
                    },
                    "upstreamModel": name,
                    "pricing": {"inputPer1M": 1, "outputPer1M": 1},
                }
                for name, port in ports.items()
            ],
            "strategy": {"type": "rules", "default": "trusted"},
        },
    }
    (directory / "gateway").mkdir()
    gateway = start_gateway(directory / "gateway", policy)
    yield gateway
    assert gateway.stop() == 0, "".join(gateway.output)


def _ask(gateway: Gateway, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}]}
    return httpx.post(f"{gateway.base_url}/chat/completions", json=body, timeout=10)


def test_a_backend_signed_by_its_ca_bundle_is_served_over_tls(tls_gateway: Gateway) -> None:
    response = _ask(tls_gateway, "auto")
    assert response.status_code == 200, response.text
    assert response.headers["x-demo-upstream"] == "trusted"
    assert response.json()["model"] == "trusted"


@pytest.mark.parametrize("model", ["unknown-ca", "wrong-host"])
def test_an_unverifiable_backend_is_never_sent_the_request(
    tls_gateway: Gateway, model: str
) -> None:
    response = _ask(tls_gateway, model)
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["type"] and error["message"]
    assert "x-demo-upstream" not in response.headers
