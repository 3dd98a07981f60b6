"""Fixtures that start real parts: Envoy, the ext_proc workers and demo upstreams."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import openai
import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "infra"))

from gateway_harness import REPO, Gateway, start_gateway
from kube import KubeControlPlane
from kube_fixtures import kube, namespace, remote_kube  # noqa: F401 (fixtures)
from prometheus import Prometheus
from prometheus import build as build_prometheus

StartPrometheus = Callable[..., Prometheus]
"""start(jobs, **Prometheus keyword arguments) -> a ready Prometheus."""


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


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    """Prometheus, built from the Go module proxy once (tests/infra/build_prometheus.sh)."""
    return build_prometheus()


@pytest.fixture
def prometheus(
    prometheus_binary: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StartPrometheus]:
    """Start a real Prometheus scraping ``{job: [host:port, ...]}`` every second (it is ready
    when returned); every one started is stopped after the test."""
    started: list[Prometheus] = []

    def start(jobs: Mapping[str, Sequence[str]], **kwargs: Any) -> Prometheus:
        directory = tmp_path_factory.mktemp("prometheus")
        started.append(Prometheus.start(prometheus_binary, directory, jobs, **kwargs))
        return started[-1]

    yield start
    for running in started:
        running.stop()
