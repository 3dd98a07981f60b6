"""The operator follows the ext_proc Service's EndpointSlices and feeds its ready pods to Envoy
over EDS: a pod that joins gets streams at once, one that leaves gets none, with no restart.

The bare test apiserver has no controller-manager, so the test writes the EndpointSlice the
EndpointSlice controller would write; the real-node end-to-end test covers that part."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kube import KubeControlPlane
from operator_harness import CLI, Cluster

from switchyard.local.runner import EnvoyAdmin, envoy_binary, port_open, wait_until
from switchyard.operator.envoy_config import GatewaySettings, extproc_cluster
from switchyard.operator.xds_server import ads_bootstrap

SECOND = "127.0.0.2"  # a second ext_proc "pod": same port, another loopback address


@pytest.fixture(scope="module")
def cluster(routepolicy_crd: KubeControlPlane) -> Iterator[Cluster]:
    running = Cluster(routepolicy_crd, prefix="eds", operator_args=_eds_args())
    yield running
    running.close()


def _eds_args() -> list[str]:
    # The port is the harness's ext_proc port, known only once it exists; the operator reads
    # it from the slice when the Service has a single port, so any value matches here.
    return ["--extproc-service", "extproc", "--extproc-port", "1"]


def _slice(cluster: Cluster, *addresses: str) -> None:
    manifest = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "extproc-x1",
            "namespace": cluster.namespace,
            "labels": {"kubernetes.io/service-name": "extproc"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "grpc", "port": cluster.extproc, "protocol": "TCP"}],
        "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses],
    }
    cluster.kube.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(manifest))


def _streams_per_host(cluster: Cluster) -> dict[str, int]:
    """Requests Envoy sent to each ext_proc host (its per-host stats)."""
    text = EnvoyAdmin(cluster.admin)._get("/clusters").decode()
    counts = {}
    for line in text.splitlines():
        parts = line.split("::")
        if parts[0] == "switchyard_extproc" and len(parts) == 4 and parts[2] == "rq_total":
            counts[parts[1].rsplit(":", 1)[0]] = int(parts[3])
    return counts


def test_extproc_pods_come_and_go_through_endpointslices(cluster: Cluster) -> None:
    _slice(cluster, "127.0.0.1")
    cluster.apply(cluster.policy)
    wait_until(lambda: cluster.condition("assistant").get("status") == "True", 60, "Ready")
    wait_until(lambda: port_open("127.0.0.1", cluster.port), 30, "gateway listener")
    wait_until(lambda: cluster.model() == "light", 30, "routing through the first ext_proc")
    assert set(_streams_per_host(cluster)) == {"127.0.0.1"}

    second = subprocess.Popen(
        [*CLI, "extproc", "--config", f"grpc://127.0.0.1:{cluster.xds}",
         "--listen", f"{SECOND}:{cluster.extproc}"]
    )  # fmt: skip
    cluster.children.append(second)
    wait_until(lambda: port_open(SECOND, cluster.extproc), 60, "second ext_proc")
    _slice(cluster, "127.0.0.1", SECOND)
    wait_until(lambda: SECOND in _streams_per_host(cluster), 30, "Envoy sees the new pod")
    before = _streams_per_host(cluster)
    models = [cluster.model() for _ in range(40)]
    after = _streams_per_host(cluster)
    assert models == ["light"] * 40
    assert after[SECOND] - before[SECOND] >= 10, (before, after)
    assert after["127.0.0.1"] - before["127.0.0.1"] >= 10, (before, after)

    _slice(cluster, SECOND)
    wait_until(lambda: set(_streams_per_host(cluster)) == {SECOND}, 30, "the first pod leaves")
    before = _streams_per_host(cluster)
    assert [cluster.model() for _ in range(10)] == ["light"] * 10
    assert _streams_per_host(cluster)[SECOND] - before[SECOND] == 10


@pytest.mark.parametrize(
    "settings",
    [
        GatewaySettings(extproc_endpoints=[("sy-extproc.switchyard.svc", 9002)]),
        GatewaySettings(extproc_endpoints=[("127.0.0.1", 9002), ("127.0.0.2", 9003)]),
        GatewaySettings(extproc_eds=True),
    ],
    ids=["service-name", "addresses", "eds"],
)
def test_envoy_accepts_the_extproc_cluster(settings: GatewaySettings, tmp_path: Path) -> None:
    """The chart once passed a Service name, which made a STATIC cluster Envoy rejects."""
    cluster = {k: v for k, v in extproc_cluster(settings).items() if k != "@type"}
    bootstrap = ads_bootstrap("validate", 0, "127.0.0.1", 18000)
    bootstrap["static_resources"]["clusters"].append(cluster)
    path = tmp_path / "bootstrap.json"
    path.write_text(json.dumps(bootstrap))
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "-l", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
