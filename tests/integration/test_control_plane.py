"""Real Envoy on ADS and a real ext_proc on the config stream, both fed by the ControlPlane."""

from __future__ import annotations

import asyncio
import copy
import json
import shutil
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import onnx
import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from gateway_harness import DEMO_NAMES, REPO, policy_for_ports
from google.protobuf import json_format
from onnx import numpy_helper

from switchyard.api.v1 import routing_pb2 as pb
from switchyard.extproc.router.bundle import resolve
from switchyard.local.ports import free_port_block
from switchyard.local.runner import EnvoyAdmin, envoy_binary, port_open, wait_until
from switchyard.operator.compiler import compile_config
from switchyard.operator.control_plane import ApplyResult, ControlPlane
from switchyard.operator.envoy_config import GatewaySettings
from switchyard.operator.policy import parse_policy
from switchyard.operator.xds_server import CLUSTER, ads_bootstrap, pack

T = TypeVar("T")
SHORT = {"model": "auto", "messages": [{"role": "user", "content": "Say hello to my friend."}]}


class Harness:
    """A ControlPlane on its own event-loop thread, plus Envoy, one ext_proc and demo models."""

    def __init__(self, directory: Path) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        first_demo = free_port_block(3)
        self.demo_ports = {n: first_demo + i for i, n in enumerate(DEMO_NAMES)}
        self.port, self.admin, self.extproc = (
            free_port_block(),
            free_port_block(),
            free_port_block(),
        )
        self.nacks: list[tuple[str, ...]] = []
        settings = GatewaySettings(
            listen_port=self.port, extproc_endpoints=[("127.0.0.1", self.extproc)]
        )
        self.plane = ControlPlane(
            settings,
            ack_timeout_s=10,
            on_envoy_nack=lambda *a: self.nacks.append(("envoy", *a)),
            on_extproc_nack=lambda *a: self.nacks.append(("extproc", *a)),
        )
        xds_port = self.run(self.plane.start())
        self.policy = policy_for_ports(self.demo_ports)
        self.run(self.plane.stream.publish(self.compile(self.policy)))
        self.children = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "switchyard.cli",
                    "demo-upstream",
                    "--name",
                    name,
                    "--port",
                    str(port),
                ],
                cwd=REPO,
            )
            for name, port in self.demo_ports.items()
        ]
        self.children.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "switchyard.cli",
                    "extproc",
                    "--config",
                    f"grpc://127.0.0.1:{xds_port}",
                    "--listen",
                    f"127.0.0.1:{self.extproc}",
                ],
                cwd=REPO,
            )
        )
        bootstrap = directory / "bootstrap.json"
        bootstrap.write_text(
            json.dumps(ads_bootstrap("test-envoy", self.admin, "127.0.0.1", xds_port))
        )
        self.children.append(
            subprocess.Popen(
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
        )
        self.apply(self.policy)
        for port in [*self.demo_ports.values(), self.extproc, self.port]:
            wait_until(lambda p=port: port_open("127.0.0.1", p), 60, f"port {port}")
        wait_until(EnvoyAdmin(self.admin).ready, 60, "envoy")

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=60)

    @staticmethod
    def compile(*policies: dict[str, Any]) -> pb.RoutingConfig:
        return compile_config([parse_policy(p) for p in policies])

    def apply(self, *policies: dict[str, Any]) -> ApplyResult:
        return self.run(self.plane.apply(self.compile(*policies)))

    def post(self, body: dict[str, Any] = SHORT) -> httpx.Response:
        return httpx.post(
            f"http://127.0.0.1:{self.port}/v1/chat/completions", json=body, timeout=10
        )

    def clusters(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/clusters") as response:
            return str(response.read().decode())

    def close(self) -> None:
        for child in self.children:
            child.terminate()
        for child in self.children:
            child.wait(timeout=10)
        self.run(self.plane.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    running = Harness(tmp_path_factory.mktemp("control-plane"))
    yield running
    running.close()


def test_envoy_on_ads_routes_as_the_policy_says(harness: Harness) -> None:
    response = harness.post()
    assert response.status_code == 200, response.text
    assert response.headers["x-switchyard-model"] == "light"
    assert response.json()["model"] == "demo-light-8b"
    assert harness.plane.ads.nodes["test-envoy"].acked[CLUSTER]


def test_edit_applies_within_a_second_without_failed_requests(harness: Harness) -> None:
    edited = copy.deepcopy(harness.policy)
    edited["spec"]["strategy"] = {"type": "rules", "default": "capable"}
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                url = f"http://127.0.0.1:{harness.port}/v1/chat/completions"
                statuses.append(client.post(url, json=SHORT).status_code)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        wait_until(lambda: len(statuses) >= 20, 30, "requests before the edit")
        result = harness.apply(edited)
        after = len(statuses)
        wait_until(lambda: len(statuses) >= after + 20, 30, "requests after the edit")
    finally:
        stop.set()
        worker.join()
    assert result.envoy_acked and result.extproc_acked
    assert result.seconds < 1.0
    assert harness.post().headers["x-switchyard-model"] == "capable"
    assert statuses and set(statuses) == {200}
    harness.apply(harness.policy)
    assert harness.post().headers["x-switchyard-model"] == "light"


def test_deleting_the_policy_removes_its_routes_and_clusters(harness: Harness) -> None:
    assert "default.default.light" in harness.clusters()
    result = harness.apply()
    assert result.envoy_acked and result.extproc_acked
    response = harness.post()
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    assert "default.default.light" not in harness.clusters()
    harness.apply(harness.policy)
    assert harness.post().status_code == 200


def test_rejected_configs_are_reported_and_the_last_good_one_serves(harness: Harness) -> None:
    # An Envoy NACK: a STATIC cluster whose endpoint is not an IP address.
    bad_cluster = {
        "name": "broken",
        "type": "STATIC",
        "load_assignment": {
            "cluster_name": "broken",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "not-an-ip", "port_value": 1}
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }
    good = harness.plane.ads.snapshot
    harness.run(
        harness.plane.ads.publish(
            {**good, CLUSTER: pack([json_format.ParseDict(bad_cluster, Cluster())])}
        )
    )
    wait_until(lambda: any(n[0] == "envoy" for n in harness.nacks), 10, "envoy nack")
    harness.run(harness.plane.ads.publish(good))
    # A policy the ext_proc cannot load (a rule regex the compiler would refuse) is left out on
    # its own and listed in the ACK; its alias answers 503 policy_unavailable, not 404.
    config = harness.compile(harness.policy)
    config.policies[0].strategy.rules[0].when.regex = "("
    config.version = "bad-regex"
    harness.run(harness.plane.stream.publish(config))
    stream = harness.plane.stream
    wait_until(lambda: stream.rejected_policies("bad-regex"), 10, "ext_proc policy error")
    (error,) = stream.rejected_policies("bad-regex")["default/default"].values()
    assert error.startswith("strategy.rules[0].when.regex:") and "missing )" in error
    response = harness.post({**SHORT, "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 503  # its body: see tests/integration/test_blast_radius.py
    harness.apply(harness.policy)


def _always_hard_bundle(directory: Path) -> Path:
    """A copy of the default bundle whose difficulty head is pushed to 1 for every prompt."""
    bundle = directory / "always-hard"
    shutil.copytree(resolve("builtin:default"), bundle)
    model = onnx.load(str(bundle / "model.onnx"))
    bias = next(t for t in model.graph.initializer if t.name.startswith("bd_"))
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + np.float32(50), bias.name))
    onnx.save(model, str(bundle / "model.onnx"))
    return bundle


def test_a_policy_switches_router_bundles_without_a_restart(
    harness: Harness, tmp_path: Path
) -> None:
    assert harness.post().headers["x-switchyard-model"] == "light"
    switched = copy.deepcopy(harness.policy)
    switched["spec"]["strategy"]["router"]["bundle"] = str(_always_hard_bundle(tmp_path))
    result = harness.apply(switched)
    assert result.envoy_acked and result.extproc_acked
    assert harness.post().headers["x-switchyard-model"] == "capable"

    # a bundle that does not load leaves out that policy alone, named in the ACK (the
    # reconciler then rolls an edit back to the previous generation: tests/unit)
    missing = copy.deepcopy(harness.policy)
    missing["spec"]["strategy"]["router"]["bundle"] = str(tmp_path / "no-such-bundle")
    result = harness.apply(missing)
    assert result.extproc_acked
    (error,) = harness.plane.stream.rejected_policies(result.version)["default/default"].values()
    assert "no-such-bundle" in error and "no such directory" in error
    assert harness.post().status_code == 503

    result = harness.apply(harness.policy)
    assert result.extproc_acked
    assert harness.post().headers["x-switchyard-model"] == "light"
