"""The operator's data plane around one namespace of a test apiserver: the kopf operator
(`switchyard operator`), a real Envoy on its ADS, an ext_proc on its config stream and demo
upstreams. Shared by the operator tests and `make bench-control-plane`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml
from gateway_harness import DEMO_NAMES, REPO, policy_for_ports
from kube import KubeControlPlane

from switchyard.local.ports import free_port_block
from switchyard.local.runner import envoy_binary, port_open, wait_until
from switchyard.operator.xds_server import ads_bootstrap

SHORT = {"model": "auto", "messages": [{"role": "user", "content": "Say hello to my friend."}]}
CLI = [sys.executable, "-m", "switchyard.cli"]


class Cluster:
    """Operator + Envoy + ext_proc + demo models around one namespace of the test apiserver."""

    def __init__(
        self,
        kube: KubeControlPlane,
        prefix: str = "op",
        operator_args: Sequence[str] = (),
        extproc_args: Sequence[str] = (),
    ) -> None:
        self.kube = kube
        self.namespace = f"{prefix}-{os.getpid()}"
        kube.kubectl("create", "namespace", self.namespace)
        first = free_port_block(3)
        self.demo_ports = {name: first + i for i, name in enumerate(DEMO_NAMES)}
        self.port, self.admin, self.extproc, xds = (free_port_block() for _ in range(4))
        self.xds = xds
        env = {**os.environ, "KUBECONFIG": str(kube.kubeconfig_path)}
        cli = CLI
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115
        self.children = [
            subprocess.Popen([*cli, "demo-upstream", "--name", name, "--port", str(port)], cwd=REPO)
            for name, port in self.demo_ports.items()
        ]
        self.children.append(
            subprocess.Popen(
                [*cli, "operator", "--xds-listen", f"127.0.0.1:{xds}",
                 "--gateway-port", str(self.port), "--extproc", f"127.0.0.1:{self.extproc}",
                 "--namespace", self.namespace, "--data-plane-namespace", self.namespace,
                 *operator_args],
                cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT,
            )
        )  # fmt: skip
        wait_until(lambda: port_open("127.0.0.1", xds), 60, "operator xDS port")
        self.children.append(
            subprocess.Popen(
                [*cli, "extproc", "--config", f"grpc://127.0.0.1:{xds}",
                 "--listen", f"127.0.0.1:{self.extproc}", *extproc_args],
                cwd=REPO,
            )
        )  # fmt: skip
        bootstrap = Path(self.log.name).with_suffix(".envoy.json")
        bootstrap.write_text(json.dumps(ads_bootstrap("gateway-0", self.admin, "127.0.0.1", xds)))
        self.children.append(
            subprocess.Popen(
                [envoy_binary(), "-c", str(bootstrap), "--use-dynamic-base-id",
                 "--concurrency", "1", "-l", "error"]
            )
        )  # fmt: skip
        self.policy = policy_for_ports(self.demo_ports)
        self.policy["metadata"] = {"name": "assistant", "namespace": self.namespace}

    def start_demo(self, name: str, port: int, host: str = "127.0.0.1") -> subprocess.Popen[bytes]:
        """One more demo upstream, stopped with the rest."""
        args = ["demo-upstream", "--name", name, "--port", str(port), "--host", host]
        child = subprocess.Popen([*CLI, *args], cwd=REPO)
        self.children.append(child)
        wait_until(lambda: port_open(host, port), 30, f"demo upstream {name}")
        return child

    def apply(self, policy: dict[str, Any]) -> None:
        self.kube.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(policy))

    def status(self, name: str = "assistant") -> dict[str, Any]:
        out = self.kube.kubectl("get", "rp", name, "-n", self.namespace, "-o", "json")
        return dict(json.loads(out).get("status", {}))

    def condition(self, name: str, kind: str = "Ready") -> dict[str, Any]:
        for condition in self.status(name).get("conditions", []):
            if condition["type"] == kind:
                return dict(condition)
        return {}

    def post(self) -> httpx.Response:
        url = f"http://127.0.0.1:{self.port}/v1/chat/completions"
        return httpx.post(url, json=SHORT, timeout=10)

    def model(self) -> str:
        response = self.post()
        return response.headers.get("x-switchyard-model", str(response.status_code))

    def close(self) -> None:
        for child in self.children:
            if child.poll() is None:
                child.terminate()
        for child in self.children:
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:  # a stuck shutdown must not fail the caller
                child.kill()
                child.wait(timeout=20)
