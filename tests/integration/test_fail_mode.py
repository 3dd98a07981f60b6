"""When the ext_proc is unreachable, Envoy fails open to a model or closed with a 503."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from gateway_harness import REPO, policy_for_ports

from switchyard.local.control import LocalControlPlane
from switchyard.local.ports import free_port_block
from switchyard.local.runner import EnvoyAdmin, envoy_binary, port_open, wait_until
from switchyard.operator.clientkeys import compile_client_keys
from switchyard.operator.compiler import compile_config
from switchyard.operator.envoy_config import GatewaySettings
from switchyard.operator.policy import parse_policy

BODY = {"model": "auto", "messages": [{"role": "user", "content": "hello"}]}


def _envoy_without_extproc(
    directory: Path, fail_open_model: str, keys: bool = False
) -> Iterator[tuple[int, int]]:
    """Envoy with the gateway's config whose ext_proc port has nothing listening (with client
    keys on when ``keys``)."""
    demo_port = free_port_block(3)
    ports = {"demo-light": demo_port, "demo-standard": demo_port + 1, "demo-capable": demo_port + 2}
    policy = parse_policy(policy_for_ports(ports))
    client_keys = compile_client_keys([]) if keys else None
    config = compile_config([policy], fail_open_model, client_keys=client_keys)
    port, admin, dead_extproc = free_port_block(), free_port_block(), free_port_block()
    settings = GatewaySettings(listen_port=port, extproc_endpoints=[("127.0.0.1", dead_extproc)])
    control = LocalControlPlane(settings)
    control.start(config)
    bootstrap = control.write_bootstrap(directory, admin)
    demo = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "switchyard.cli",
            "demo-upstream",
            "--name",
            "demo-light",
            "--port",
            str(demo_port),
        ],
        cwd=REPO,
    )
    envoy = subprocess.Popen(
        [
            envoy_binary(),
            "-c",
            str(bootstrap),
            "--use-dynamic-base-id",
            "--concurrency",
            "1",
            "-l",
            "error",
        ]
    )
    try:
        wait_until(EnvoyAdmin(admin).ready, 60, "envoy")
        wait_until(lambda: port_open("127.0.0.1", port), 60, "listener")
        wait_until(lambda: port_open("127.0.0.1", demo_port), 60, "demo upstream")
        yield port, demo_port
    finally:
        for proc in (envoy, demo):
            proc.terminate()
            proc.wait(timeout=10)
        control.stop()


@pytest.fixture
def fail_closed(tmp_path: Path) -> Iterator[tuple[int, int]]:
    yield from _envoy_without_extproc(tmp_path, "")


@pytest.fixture
def fail_open(tmp_path: Path) -> Iterator[tuple[int, int]]:
    yield from _envoy_without_extproc(tmp_path, "light")


@pytest.fixture
def keys_on(tmp_path: Path) -> Iterator[tuple[int, int]]:
    yield from _envoy_without_extproc(tmp_path, "", keys=True)


def test_with_keys_on_the_models_list_needs_the_ext_proc(keys_on: tuple[int, int]) -> None:
    port, _ = keys_on
    response = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10)
    assert response.status_code == 503, response.text
    assert "auto" not in response.text  # never the list unchecked
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "router_unavailable"), error


def test_fails_closed_with_openai_503(fail_closed: tuple[int, int]) -> None:
    port, _ = fail_closed
    response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=BODY, timeout=10)
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "router_unavailable"
    assert error["type"] == "server_error"
    # Requests Envoy answers from config still work without the ext_proc.
    models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()
    assert "auto" in {m["id"] for m in models["data"]}


def test_fails_open_to_the_configured_model(fail_open: tuple[int, int]) -> None:
    port, demo_port = fail_open
    response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=BODY, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["x-switchyard-model"] == "light"
    assert response.headers["x-switchyard-reason"] == "fail-open: router unavailable"
    assert response.json()["choices"][0]["message"]["content"].startswith("[demo:demo-light]")
    seen = httpx.get(f"http://127.0.0.1:{demo_port}/_demo/last_request").json()
    assert seen["body"]["messages"] == BODY["messages"]
    assert seen["body"]["model"] == "demo-light-8b"  # rewritten by the fail-open route


def test_invalid_local_config_is_rejected_with_the_field(tmp_path: Path) -> None:
    policy = policy_for_ports({"demo-light": 1, "demo-standard": 2, "demo-capable": 3})
    policy["spec"]["models"][1]["pricing"]["outputPer1M"] = "cheap"
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy))
    result = subprocess.run(
        [sys.executable, "-m", "switchyard.cli", "up", "-f", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 1
    assert "spec.models[1].pricing.outputPer1M" in result.stderr
