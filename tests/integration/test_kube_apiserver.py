"""Smoke tests of the real control-plane test infrastructure (tests/infra): the built
kube-apiserver reports its version, kubectl works against it as cluster-admin, and two control
planes run side by side without sharing anything."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path

import pytest
from kube import BUILD_SCRIPT, KubeControlPlane, k8s_bin_dir


def _expected_version() -> str:
    if os.environ.get("K8S_VERSION"):
        return os.environ["K8S_VERSION"]
    found = re.search(r'K8S_VERSION="\$\{K8S_VERSION:-(v[0-9.]+)\}"', BUILD_SCRIPT.read_text())
    assert found, "build_k8s.sh has no default K8S_VERSION"
    return found.group(1)


def test_binaries_are_cached_by_version_outside_the_repo() -> None:
    bin_dir = k8s_bin_dir()
    version = _expected_version()
    assert bin_dir.parent.name == version
    assert Path(__file__).resolve().parents[2] not in bin_dir.resolve().parents
    # A second run finds everything built and only prints the directory.
    again = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, check=True, timeout=60
    )
    assert again.stdout.strip() == str(bin_dir)


def test_version_reports_the_built_version(kube: KubeControlPlane) -> None:
    version = _expected_version()
    served = kube.version()
    assert served["gitVersion"] == version
    assert served["major"] == "1"
    assert served["minor"] == version.split(".")[1]
    client = json.loads(kube.kubectl("version", "-o", "json"))
    assert client["clientVersion"]["gitVersion"] == version
    assert client["serverVersion"]["gitVersion"] == version


def test_kubectl_is_cluster_admin(kube: KubeControlPlane) -> None:
    assert kube.kubectl("auth", "can-i", "*", "*", "--all-namespaces").strip() == "yes"
    status, body = kube.get("/readyz")
    assert (status, body) == (200, b"ok")


def test_kubectl_creates_and_reads_a_namespace_and_a_configmap(
    kube: KubeControlPlane, namespace: str
) -> None:
    ns = json.loads(kube.kubectl("get", "namespace", namespace, "-o", "json"))
    assert ns["status"]["phase"] == "Active"
    kube.kubectl(
        "create", "configmap", "greeting", "-n", namespace,
        "--from-literal=hello=world", "--from-literal=answer=42",
    )  # fmt: skip
    cm = json.loads(kube.kubectl("get", "configmap", "greeting", "-n", namespace, "-o", "json"))
    assert cm["data"] == {"hello": "world", "answer": "42"}
    kube.kubectl("patch", "configmap", "greeting", "-n", namespace, "--type=merge",
                 "-p", '{"data":{"hello":"again"}}')  # fmt: skip
    assert (
        kube.kubectl("get", "cm", "greeting", "-n", namespace, "-o", "jsonpath={.data.hello}")
        == "again"
    )


def test_two_control_planes_run_at_once_and_are_independent(
    kube: KubeControlPlane, remote_kube: KubeControlPlane, namespace: str
) -> None:
    assert kube.running and remote_kube.running
    assert kube.server != remote_kube.server
    assert kube.etcd_port != remote_kube.etcd_port
    assert kube.dir != remote_kube.dir
    # Objects live in one cluster only.
    remote_kube.kubectl("create", "namespace", namespace)
    remote_kube.kubectl("create", "configmap", "only-remote", "-n", namespace, "--from-literal=k=v")
    assert "only-remote" in remote_kube.kubectl("get", "cm", "-n", namespace, "-o", "name")
    missing = kube.kubectl_result("get", "configmap", "only-remote", "-n", namespace)
    assert missing.returncode != 0
    assert "NotFound" in missing.stderr
    # Each has its own CA: one cluster's credentials are not accepted by the other.
    foreign = kube.kubectl_result(
        "--server", remote_kube.server, "get", "namespaces", "--request-timeout=10s"
    )
    assert foreign.returncode != 0
    assert "certificate" in foreign.stderr.lower()


def test_stop_terminates_etcd_and_the_apiserver() -> None:
    plane = KubeControlPlane(k8s_bin_dir(), "throwaway").start()
    processes = list(plane.processes)
    port, directory = plane.port, plane.dir
    assert plane.kubectl("get", "--raw", "/livez").strip() == "ok"
    plane.stop()
    assert all(proc.returncode is not None for proc in processes)
    assert not directory.exists()
    with socket.socket() as sock, pytest.raises(OSError):
        sock.settimeout(2)
        sock.connect(("127.0.0.1", port))
    plane.stop()  # idempotent
