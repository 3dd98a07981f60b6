"""The operator running as the Helm chart's ServiceAccount (its rendered RBAC, a real token from
the API server's TokenRequest), watching one namespace: with only what the chart grants it
serves a RoutePolicy and a ClientKeys resource whose key is in a Secret, and follows a
rotation of that Secret. The rest of the ClientKeys behaviour runs as cluster-admin in
test_client_keys_operator.py."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube import KubeControlPlane, k8s_bin_dir
from operator_harness import Cluster
from test_client_keys_operator import (
    _works,
    apply,
    clients_doc,
    ready,
    secret,
    status_code,
)

from switchyard.local.runner import port_open, wait_until

CHART = Path(__file__).resolve().parents[2] / "helm" / "switchyard"
RELEASE = "switchyard"
KEY = "sk-switchyard-rbac-" + os.urandom(6).hex()
ROTATED = "sk-switchyard-rbac-rotated-" + os.urandom(6).hex()


class AsServiceAccount:
    """The control plane as the operator sees it through ``kubeconfig_path`` (the chart's
    ServiceAccount); ``kubectl`` stays cluster-admin (the test's own hands)."""

    def __init__(self, kube: KubeControlPlane, namespace: str, kubeconfig: Path) -> None:
        self.kube = kube
        self.namespace = namespace
        self.kubeconfig_path = kubeconfig

    def kubectl(self, *args: str, **kwargs: Any) -> str:
        if args == ("create", "namespace", self.namespace):
            return ""  # made first, for the chart's RoleBinding
        return self.kube.kubectl(*args, **kwargs)


def _service_account_kubeconfig(kube: KubeControlPlane, namespace: str, path: Path) -> None:
    rbac = subprocess.run(
        [str(k8s_bin_dir() / "helm"), "template", RELEASE, str(CHART), "--namespace", namespace,
         "--set", f"operator.watchNamespaces={{{namespace}}}", "--show-only",
         "templates/rbac.yaml"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    kube.kubectl("apply", "-f", "-", stdin=rbac)
    token = kube.kubectl(
        "create", "token", f"{RELEASE}-operator", "-n", namespace, "--duration=2h"
    ).strip()
    config = yaml.safe_load(kube.kubeconfig_path.read_text())
    config["users"] = [{"name": "admin", "user": {"token": token}}]
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)


@pytest.fixture(scope="module")
def cluster(
    routepolicy_crd: KubeControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    kube = routepolicy_crd
    kube.kubectl("apply", "-f", str(CHART / "crds" / "clientkeys.yaml"))
    kube.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/clientkeys.switchyard.dev"
    )
    namespace = f"rbac-{os.getpid()}"
    kube.kubectl("create", "namespace", namespace)
    kubeconfig = tmp_path_factory.mktemp("rbac") / "operator.kubeconfig"
    _service_account_kubeconfig(kube, namespace, kubeconfig)
    sa = f"system:serviceaccount:{namespace}:{RELEASE}-operator"
    denied = kube.kubectl_result("auth", "can-i", "get", "secrets", "-n", "default", "--as", sa)
    assert denied.stdout.strip() == "no"
    running = Cluster(AsServiceAccount(kube, namespace, kubeconfig), prefix="rbac")  # type: ignore[arg-type]
    assert running.namespace == namespace
    yield running
    running.close()


def test_the_charts_permissions_serve_keys_from_a_secret(cluster: Cluster) -> None:
    ns = cluster.namespace
    cluster.apply(cluster.policy)
    wait_until(lambda: cluster.condition("assistant").get("status") == "True", 60, "policy Ready")
    wait_until(lambda: port_open("127.0.0.1", cluster.port), 30, "gateway listener")
    apply(cluster.kube, ns, secret("alice-key", KEY))  # type: ignore[arg-type]
    assert apply(cluster.kube, ns, clients_doc(ns))[0]  # type: ignore[arg-type]
    wait_until(lambda: ready(cluster, "clients").get("status") == "True", 30, "ClientKeys Ready")
    assert status_code(cluster, None) == 401 and _works(cluster, KEY)
    apply(cluster.kube, ns, secret("alice-key", ROTATED))  # type: ignore[arg-type]
    wait_until(lambda: _works(cluster, ROTATED), 10, "rotated key")
    assert not _works(cluster, KEY)
    cluster.log.flush()
    logged = Path(cluster.log.name).read_text()
    assert "Forbidden" not in logged and "403" not in logged, logged[-2000:]
    assert KEY not in logged and ROTATED not in logged
