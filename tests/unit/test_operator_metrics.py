"""The operator's metrics: ACK/NACK counting over real gRPC streams, client series that follow
the streams, apply outcomes, clients behind, policy states, and the /metrics endpoint."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest
from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest
from google.rpc.status_pb2 import Status
from prometheus_client.parser import text_string_to_metric_families

from switchyard.api.v1 import config_stream_pb2 as cs
from switchyard.api.v1 import config_stream_pb2_grpc as cs_grpc
from switchyard.api.v1 import routing_pb2 as pb
from switchyard.operator.compiler import compile_config
from switchyard.operator.control_plane import ApplyResult, ControlPlane
from switchyard.operator.envoy_config import GatewaySettings
from switchyard.operator.metrics import (
    MAX_CLIENT_LABEL,
    ROUTING_CONFIG,
    MetricsServer,
    OperatorMetrics,
    client_label,
)
from switchyard.operator.policy import parse_policy
from switchyard.operator.xds_server import CLUSTER

RESPONSES = "switchyard_operator_xds_responses_total"
CONNECTED = "switchyard_operator_connected_clients"


def _value(metrics: OperatorMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


class _Peer:
    """One client stream: requests go in through ``send``, responses come out of ``recv``."""

    def __init__(self, call: Any, requests: asyncio.Queue[Any]) -> None:
        self.call, self.requests = call, requests

    async def send(self, message: Any) -> None:
        await self.requests.put(message)

    async def recv(self) -> Any:
        return await asyncio.wait_for(self.call.read(), 5)

    async def close(self) -> None:
        await self.requests.put(None)
        self.call.cancel()


async def _open(method: Any) -> _Peer:
    requests: asyncio.Queue[Any] = asyncio.Queue()

    async def iterate() -> AsyncIterator[Any]:
        while (message := await requests.get()) is not None:
            yield message

    return _Peer(method(iterate()), requests)


async def _until(condition: Any) -> None:
    async with asyncio.timeout(5):
        while not condition():
            await asyncio.sleep(0.005)


@pytest.fixture
async def plane(policy_doc: dict[str, Any]) -> AsyncIterator[tuple[ControlPlane, grpc.aio.Channel]]:
    """A started ControlPlane with a config primed, and a channel to it."""
    control = ControlPlane(GatewaySettings(), ack_timeout_s=2)
    await control.prime(compile_config([parse_policy(policy_doc)]))
    port = await control.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield control, channel
    await channel.close()
    await control.stop()


async def test_acks_and_nacks_are_counted_per_client_and_type(
    plane: tuple[ControlPlane, grpc.aio.Channel],
) -> None:
    control, channel = plane
    metrics = control.metrics
    assert _value(metrics, "switchyard_operator_config_generation") == 1
    ads = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
    envoy = await _open(ads.StreamAggregatedResources)
    await envoy.send(DiscoveryRequest(node=Node(id="gw-0"), type_url=CLUSTER))
    clusters = await envoy.recv()
    await _until(lambda: _value(metrics, CONNECTED, kind="envoy") == 1)
    assert _value(metrics, "switchyard_operator_clients_behind", kind="envoy") == 0  # not scraped
    metrics.observe()
    assert _value(metrics, "switchyard_operator_clients_behind", kind="envoy") == 1
    ack = DiscoveryRequest(
        type_url=CLUSTER, version_info=clusters.version_info, response_nonce=clusters.nonce
    )
    await envoy.send(ack)
    await envoy.send(ack)  # a request repeating the last nonce counts again, as it is recorded
    nack = DiscoveryRequest(
        type_url=CLUSTER, response_nonce=clusters.nonce, error_detail=Status(message="no")
    )
    await envoy.send(nack)
    await envoy.send(DiscoveryRequest(type_url=CLUSTER, response_nonce="stale"))  # ignored
    series = {"client": "gw-0", "type_url": CLUSTER}
    await _until(lambda: _value(metrics, RESPONSES, **series, result="nack") == 1)
    assert _value(metrics, RESPONSES, **series, result="ack") == 2

    stream = cs_grpc.ConfigStreamStub(channel)
    replica = await _open(stream.Subscribe)
    await replica.send(cs.ConfigAck(node="pod-a/1"))
    config: pb.RoutingConfig = await replica.recv()
    await replica.send(cs.ConfigAck(node="pod-a/1", version=config.version))
    await replica.send(cs.ConfigAck(node="pod-a/1", version="x", error="bad regex"))
    extproc = {"client": "pod-a/1", "type_url": ROUTING_CONFIG}
    await _until(lambda: _value(metrics, RESPONSES, **extproc, result="nack") == 1)
    assert _value(metrics, RESPONSES, **extproc, result="ack") == 1
    assert _value(metrics, CONNECTED, kind="extproc") == 1
    metrics.observe()
    assert _value(metrics, "switchyard_operator_clients_behind", kind="extproc") == 0
    info = _value(metrics, "switchyard_operator_config_info", version=config.version)
    assert info == 1

    # A client's series leave with its stream (their number follows the connected pods).
    await envoy.close()
    await replica.close()
    await _until(lambda: _value(metrics, CONNECTED, kind="envoy") == 0)
    await _until(lambda: _value(metrics, CONNECTED, kind="extproc") == 0)
    assert _value(metrics, RESPONSES, **series, result="ack") is None
    assert _value(metrics, RESPONSES, **extproc, result="ack") is None


def test_series_of_a_client_stay_while_any_of_its_streams_is_open() -> None:
    metrics = OperatorMetrics()
    for _ in range(2):
        metrics.stream_opened("envoy")
        metrics.client_named("envoy", "gw-0", "")
    metrics.response("envoy", "gw-0", CLUSTER, acked=True)
    metrics.stream_closed("envoy", "gw-0")
    assert _value(metrics, RESPONSES, client="gw-0", type_url=CLUSTER, result="ack") == 1
    metrics.stream_closed("envoy", "gw-0")
    assert _value(metrics, RESPONSES, client="gw-0", type_url=CLUSTER, result="ack") is None
    assert metrics._streams == {} and metrics._labels == {}


def test_a_client_that_renames_itself_leaves_nothing_behind() -> None:
    metrics = OperatorMetrics()
    metrics.stream_opened("extproc")
    for previous, name in (("", "a"), ("a", "b"), ("b", "c")):
        metrics.client_named("extproc", name, previous)
        metrics.response("extproc", name, ROUTING_CONFIG, acked=True)
    metrics.stream_closed("extproc", "c")
    assert metrics._streams == {}
    assert not any(s.name == RESPONSES for f in metrics.registry.collect() for s in f.samples)


def test_long_client_ids_are_cut_in_the_label() -> None:
    long = "n" * 10_000
    assert client_label("gw-0") == "gw-0"
    assert len(client_label(long)) == MAX_CLIENT_LABEL and client_label(long).endswith("...")
    metrics = OperatorMetrics()
    for client in (long, long + "2"):
        metrics.stream_opened("envoy")
        metrics.client_named("envoy", client, "")
        metrics.response("envoy", client, CLUSTER, acked=False)
    label = client_label(long)
    assert _value(metrics, RESPONSES, client=label, type_url=CLUSTER, result="nack") == 2
    metrics.stream_closed("envoy", long)
    assert _value(metrics, RESPONSES, client=label, type_url=CLUSTER, result="nack") == 2
    metrics.stream_closed("envoy", long + "2")
    assert _value(metrics, RESPONSES, client=label, type_url=CLUSTER, result="nack") is None


def test_apply_outcomes() -> None:
    metrics = OperatorMetrics()
    metrics.applied(ApplyResult("v1", True, True, 0.2))
    metrics.applied(ApplyResult("v2", True, True, 3.0))
    metrics.applied(ApplyResult("v3", False, False, 0.1, rejected="gw-0 rejected Cluster: no"))
    metrics.applied(ApplyResult("v4", True, False, 5.0))
    applies = "switchyard_operator_config_applies_total"
    assert _value(metrics, applies, result="acked") == 2
    assert _value(metrics, applies, result="rejected") == 1
    assert _value(metrics, applies, result="timeout") == 1
    seconds = "switchyard_operator_config_apply_seconds"
    assert _value(metrics, seconds + "_count") == 2  # acked applies only
    assert _value(metrics, seconds + "_sum") == pytest.approx(3.2)
    assert _value(metrics, seconds + "_bucket", le="0.25") == 1


def test_policy_states_and_reconcile_errors() -> None:
    metrics = OperatorMetrics()
    metrics.reconciled("ns/a", True, "Programmed")
    metrics.reconciled("ns/b", False, "InvalidSpec")
    metrics.reconciled("ns/b", False, "InvalidSpec")
    metrics.reconciled("ns/c", False, "CompileError")
    assert _value(metrics, "switchyard_operator_policies", state="ready") == 1
    assert _value(metrics, "switchyard_operator_policies", state="not_ready") == 2
    errors = "switchyard_operator_reconcile_errors_total"
    assert _value(metrics, errors, reason="InvalidSpec") == 2
    assert _value(metrics, errors, reason="CompileError") == 1
    metrics.policy_state("ns/b", True)
    metrics.policy_deleted("ns/c")
    metrics.policy_deleted("ns/unknown")
    assert _value(metrics, "switchyard_operator_policies", state="ready") == 2
    assert _value(metrics, "switchyard_operator_policies", state="not_ready") == 0


async def test_the_endpoint_serves_the_text_format_and_nothing_else(
    plane: tuple[ControlPlane, grpc.aio.Channel],
) -> None:
    control, _ = plane
    server = MetricsServer(control.metrics, "127.0.0.1:0")
    port = await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            response = await client.get("/metrics")
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/plain")
            families = {f.name: f for f in text_string_to_metric_families(response.text)}
            (generation,) = families["switchyard_operator_config_generation"].samples
            assert generation.value == 1
            assert "process_cpu_seconds" in families
            scraped = await asyncio.gather(*(client.get("/metrics") for _ in range(8)))
            assert {r.status_code for r in scraped} == {200}
            assert (await client.get("/")).status_code == 404
            assert (await client.post("/metrics")).status_code == 405
            openmetrics = await client.get(
                "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
            )
            assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
            assert openmetrics.text.endswith("# EOF\n")
    finally:
        await server.stop()
