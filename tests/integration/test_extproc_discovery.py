"""The operator follows the ext_proc Service's EndpointSlices and feeds its ready pods to Envoy
over EDS: a pod that joins is in Envoy's ext_proc cluster at once, one that leaves is gone, with
no restart and no cluster rebuild.

The bare test apiserver has no controller-manager (the test writes the EndpointSlices the
EndpointSlice controller would) and refuses loopback addresses in them, so the pods here are
documentation addresses that Envoy is given but never reaches; streams reaching real new pods
are checked on the real node (tests/e2e/test_kubernetes.py)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from kube import KubeControlPlane
from operator_harness import Cluster

from switchyard.local.runner import EnvoyAdmin, envoy_binary, wait_until
from switchyard.operator.envoy_config import GatewaySettings, extproc_cluster
from switchyard.operator.xds_server import ads_bootstrap

PORT = 9002


@pytest.fixture(scope="module")
def cluster(routepolicy_crd: KubeControlPlane) -> Iterator[Cluster]:
    args = ["--extproc-service", "extproc", "--extproc-port", str(PORT), "--extproc-workers", "2"]
    running = Cluster(routepolicy_crd, prefix="eds", operator_args=args)
    yield running
    running.close()


def _slice(cluster: Cluster, *addresses: str, ready: bool = True) -> None:
    manifest = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "extproc-x1",
            "namespace": cluster.namespace,
            "labels": {"kubernetes.io/service-name": "extproc"},
        },
        "addressType": "IPv4",
        # Two workers per pod: worker i on PORT + i; the metrics port is not a gRPC one.
        "ports": [
            {"name": "grpc", "port": PORT, "protocol": "TCP"},
            {"name": "grpc-1", "port": PORT + 1, "protocol": "TCP"},
            {"name": "metrics", "port": 9464, "protocol": "TCP"},
        ],
        "endpoints": [{"addresses": [a], "conditions": {"ready": ready}} for a in addresses],
    }
    cluster.kube.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(manifest))


def _extproc_hosts(cluster: Cluster) -> set[str]:
    """The hosts of Envoy's ext_proc cluster."""
    text = EnvoyAdmin(cluster.admin)._get("/clusters").decode()
    return {
        parts[1]
        for parts in (line.split("::") for line in text.splitlines())
        if parts[0] == "switchyard_extproc" and len(parts) == 4 and parts[2] == "cx_active"
    }


def test_extproc_pods_come_and_go_through_endpointslices(cluster: Cluster) -> None:
    # Before any policy: the operator has published its (empty) config, so Envoy is ready.
    wait_until(EnvoyAdmin(cluster.admin).ready, 60, "Envoy ready with no policy applied")
    _slice(cluster, "192.0.2.10")
    both = {f"192.0.2.10:{PORT}", f"192.0.2.10:{PORT + 1}"}
    wait_until(lambda: _extproc_hosts(cluster) == both, 30, "the first pod's two workers")
    clusters_version = EnvoyAdmin(cluster.admin).versions()[0]

    _slice(cluster, "192.0.2.10", "192.0.2.11")
    scaled = both | {f"192.0.2.11:{PORT}", f"192.0.2.11:{PORT + 1}"}
    wait_until(lambda: _extproc_hosts(cluster) == scaled, 30, "the second pod joins")
    _slice(cluster, "192.0.2.11")
    wait_until(lambda: all("192.0.2.10" not in h for h in _extproc_hosts(cluster)), 30, "leaves")
    _slice(cluster, "192.0.2.11", ready=False)
    wait_until(lambda: _extproc_hosts(cluster) == set(), 30, "a pod that is not ready")
    # Endpoints moved over EDS only: the cluster itself was never pushed again.
    assert EnvoyAdmin(cluster.admin).versions()[0] == clusters_version
    cluster.kube.kubectl("delete", "endpointslice", "extproc-x1", "-n", cluster.namespace)


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
    cluster = json_format.MessageToDict(extproc_cluster(settings), preserving_proto_field_name=True)
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
