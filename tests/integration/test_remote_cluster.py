"""Multi-cluster: a second kube-apiserver plays a remote cluster. The operator reads it from a
kubeconfig Secret, watches its EndpointSlices, and programs Envoy with priorities so traffic
stays on the local cluster's endpoints and fails over to the remote ones when they go away.

EndpointSlices may not hold loopback addresses, so both "clusters'" model servers listen on this
machine's own non-loopback address (a demo upstream each, told apart by `x-demo-upstream`).
"""

from __future__ import annotations

import base64
import copy
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml
from kube import KubeControlPlane
from operator_harness import Cluster

from switchyard.local.ports import free_port_block
from switchyard.local.runner import port_open, wait_until

REQUESTS = 20


def host_address() -> str:
    """This machine's primary non-loopback IPv4 address (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.254", 9))
        address = str(probe.getsockname()[0])
    assert not address.startswith("127."), "the tests need a non-loopback IPv4 address"
    return address


def _slice(name: str, address: str, port: int) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": name, "labels": {"kubernetes.io/service-name": "llm"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [address], "conditions": {"ready": True}}],
        }
    )


class TwoClusters:
    """The operator (cluster "home", region eu) with a remote cluster "west" (region us)."""

    def __init__(self, kube: KubeControlPlane, remote: KubeControlPlane) -> None:
        self.home = Cluster(kube, "mc", ["--cluster-name", "home", "--region", "eu"])
        self.remote = remote
        self.ns = ["-n", self.home.namespace]
        remote.kubectl("create", "namespace", self.home.namespace)
        self.address = host_address()
        first = free_port_block(2)
        self.local_port, self.remote_port = first, first + 1
        self.local_llm = self.home.start_demo("home-llm", self.local_port, self.address)
        self.home.start_demo("west-llm", self.remote_port, self.address)
        self.policy: dict[str, Any] = {
            "apiVersion": "switchyard.dev/v1alpha1",
            "kind": "RoutePolicy",
            "metadata": {"name": "shared", "namespace": self.home.namespace},
            "spec": {
                "match": {"models": ["auto"]},
                "models": [
                    {
                        "name": "in-house",
                        "backend": {"service": {"name": "llm", "port": 8000}},
                        "upstreamModel": "llama-3.1-8b",
                        "pricing": {"inputPer1M": 0.02, "outputPer1M": 0.02},
                    }
                ],
                "strategy": {"type": "rules", "default": "in-house"},
            },
        }

    def connect_remote(self) -> None:
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": "west-kubeconfig",
                "labels": {"switchyard.dev/cluster": "west", "switchyard.dev/region": "us"},
            },
            "data": {
                "kubeconfig": base64.b64encode(self.remote.kubeconfig_path.read_bytes()).decode()
            },
        }
        self.home.kube.kubectl("apply", *self.ns, "-f", "-", stdin=yaml.safe_dump(secret))

    def endpoints(self) -> dict[str, Any]:
        models = self.home.status("shared").get("models", [])
        return next((m for m in models if m["name"] == "in-house"), {})

    def served_by(self) -> list[str]:
        """Who answered each of REQUESTS requests (a failed request shows as its status)."""
        out = []
        for _ in range(REQUESTS):
            response = self.home.post()
            out.append(
                response.headers.get("x-demo-upstream", "")
                if response.status_code == 200
                else str(response.status_code)
            )
        return out


@pytest.fixture(scope="module")
def clusters(
    routepolicy_crd: KubeControlPlane, remote_kube: KubeControlPlane
) -> Iterator[TwoClusters]:
    running = TwoClusters(routepolicy_crd, remote_kube)
    yield running
    running.home.close()


def test_remote_endpoints_are_discovered_and_local_ones_preferred(clusters: TwoClusters) -> None:
    home, ns = clusters.home, clusters.ns
    home.kube.kubectl(
        "apply", *ns, "-f", "-", stdin=_slice("llm-home", clusters.address, clusters.local_port)
    )
    clusters.remote.kubectl(
        "apply", *ns, "-f", "-", stdin=_slice("llm-west", clusters.address, clusters.remote_port)
    )
    home.apply(clusters.policy)
    wait_until(lambda: home.condition("shared").get("status") == "True", 60, "Ready")
    wait_until(lambda: clusters.endpoints().get("clusters") == {"home": 1}, 30, "local only")
    clusters.connect_remote()
    wait_until(
        lambda: clusters.endpoints().get("clusters") == {"home": 1, "west": 1}, 30, "remote seen"
    )
    assert clusters.endpoints()["endpoints"] == 2
    wait_until(lambda: port_open("127.0.0.1", home.port), 30, "gateway listener")
    wait_until(lambda: home.post().status_code == 200, 30, "routing")
    assert set(clusters.served_by()) == {"home-llm"}
    # The kubeconfig (client key included) never reaches the policy's status or events.
    key = yaml.safe_load(clusters.remote.kubeconfig_path.read_text())["users"][0]["user"]
    secret_bits = key["client-key-data"][:40]
    assert secret_bits not in home.kube.kubectl("get", "rp", "shared", *ns, "-o", "yaml")
    assert secret_bits not in home.kube.kubectl("get", "events", *ns, "-o", "yaml")


def test_region_constraint_keeps_traffic_in_region(clusters: TwoClusters) -> None:
    home = clusters.home
    us_only = copy.deepcopy(clusters.policy)
    us_only["spec"]["models"][0]["region"] = "us"
    home.apply(us_only)
    wait_until(lambda: clusters.endpoints().get("clusters") == {"west": 1}, 30, "us only")
    wait_until(lambda: home.post().headers.get("x-demo-upstream") == "west-llm", 30, "rerouted")
    assert set(clusters.served_by()) == {"west-llm"}  # though the local endpoint is up
    home.apply(clusters.policy)
    wait_until(
        lambda: clusters.endpoints().get("clusters") == {"home": 1, "west": 1}, 30, "both again"
    )
    wait_until(lambda: home.post().headers.get("x-demo-upstream") == "home-llm", 30, "home again")


def test_fails_over_when_the_local_endpoint_slice_goes(clusters: TwoClusters) -> None:
    home, ns = clusters.home, clusters.ns
    home.kube.kubectl("delete", "endpointslice", "llm-home", *ns)
    served: list[str] = []

    def moved() -> bool:
        served.extend(clusters.served_by())
        return served[-1] == "west-llm"

    wait_until(moved, 30, "failover to the remote cluster")
    assert set(served) <= {"home-llm", "west-llm"}, "a request failed during the failover"
    assert set(clusters.served_by()) == {"west-llm"}
    assert clusters.endpoints()["clusters"] == {"west": 1}
    home.kube.kubectl(
        "apply", *ns, "-f", "-", stdin=_slice("llm-home", clusters.address, clusters.local_port)
    )
    wait_until(lambda: home.post().headers.get("x-demo-upstream") == "home-llm", 30, "failback")


def test_fails_over_when_the_local_server_dies(clusters: TwoClusters) -> None:
    # The slice still lists the dead server: Envoy's retry moves to the next priority at once,
    # and its health check takes the host out of the pool.
    clusters.local_llm.terminate()
    clusters.local_llm.wait(timeout=20)
    assert set(clusters.served_by()) == {"west-llm"}


def test_forgetting_the_remote_cluster_removes_its_endpoints(clusters: TwoClusters) -> None:
    clusters.home.kube.kubectl("delete", "secret", "west-kubeconfig", *clusters.ns)
    wait_until(lambda: clusters.endpoints().get("clusters") == {"home": 1}, 30, "remote gone")
    assert httpx.get(f"http://127.0.0.1:{clusters.home.admin}/ready").status_code == 200
