"""pytest plugin: real Kubernetes control planes (etcd + kube-apiserver, built from the Go module
proxy by tests/infra/build_k8s.sh on first use, then cached by version outside the repository).

Register it once, from tests/integration/conftest.py::

    pytest_plugins = ["kube_fixtures"]

(a test module may also name it in its own ``pytest_plugins``; the plugin is registered once
either way, so session fixtures are shared).

Fixtures:
  kube         session: the local cluster's control plane (cluster-admin kubeconfig).
  remote_kube  session: a second, independent control plane playing a remote cluster.
  namespace    function: a fresh namespace in ``kube`` (namespaces never finish deleting
               without a controller-manager, so they are not deleted).
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

_INFRA = str(Path(__file__).resolve().parents[1] / "infra")
if _INFRA not in sys.path:
    sys.path.insert(0, _INFRA)

from kube import KubeControlPlane, k8s_bin_dir  # noqa: E402


@pytest.fixture(scope="session")
def kube() -> Iterator[KubeControlPlane]:
    """A real kube-apiserver + etcd for the whole session: the local cluster."""
    with KubeControlPlane(k8s_bin_dir(), "local") as plane:
        yield plane


@pytest.fixture(scope="session")
def remote_kube() -> Iterator[KubeControlPlane]:
    """A second, independent kube-apiserver + etcd: a remote cluster (own CA, etcd, ports)."""
    with KubeControlPlane(k8s_bin_dir(), "remote", service_cluster_ip_range="10.1.0.0/24") as plane:
        yield plane


@pytest.fixture
def namespace(kube: KubeControlPlane) -> str:
    """A fresh namespace in ``kube`` for one test."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    kube.kubectl("create", "namespace", name)
    return name
