"""Fixtures that start real parts: Envoy, the ext_proc workers and demo upstreams."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "infra"))

from gateway_harness import REPO, Gateway, start_gateway
from kube import KubeControlPlane
from kube_fixtures import kube, namespace, remote_kube  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One local gateway per test module; stopping it with Ctrl-C must exit 0."""
    running = start_gateway(tmp_path_factory.mktemp("gateway"))
    yield running
    assert running.stop() == 0, "".join(running.output)
    assert "switchyard: stopped" in "".join(running.output)


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.OpenAI:
    """The official OpenAI client pointed at the gateway."""
    return openai.OpenAI(base_url=gateway.base_url, api_key="not-needed", max_retries=0)


@pytest.fixture(scope="session")
def routepolicy_crd(kube: KubeControlPlane) -> KubeControlPlane:  # noqa: F811
    """The cluster with the RoutePolicy CRD installed and established."""
    kube.kubectl("apply", "-f", str(REPO / "deploy" / "crds" / "routepolicy.yaml"))
    kube.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s",
        "crd/routepolicies.switchyard.dev",
    )  # fmt: skip
    return kube
