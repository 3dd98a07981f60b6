"""ControlPlane.apply's ordering contract, against a fake Envoy and ext_proc that answer at once."""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from envoy.config.route.v3.route_pb2 import RouteConfiguration

from switchyard.api.v1 import routing_pb2 as pb
from switchyard.operator.compiler import compile_config
from switchyard.operator.control_plane import ControlPlane
from switchyard.operator.envoy_config import GatewaySettings
from switchyard.operator.policy import parse_policy
from switchyard.operator.xds_server import CLUSTER, LISTENER, ROUTE, NodeStatus, Resources

Event = tuple[str, Any]
DRAIN_MS = 50


def _backend_routes(snapshot: dict[str, Resources]) -> set[str]:
    config = RouteConfiguration()
    snapshot[ROUTE].resources[0].Unpack(config)
    return {r.name for r in config.virtual_hosts[0].routes if r.match.dynamic_metadata}


@pytest.fixture
async def plane() -> AsyncIterator[tuple[ControlPlane, list[Event], set[str], list[float]]]:
    """A plane whose one Envoy ACKs every snapshot and whose one ext_proc ACKs every config
    but the versions in the returned set (it NACKs those); every publish is recorded, with
    its time."""
    settings = GatewaySettings(extproc_message_timeout_ms=DRAIN_MS)
    plane = ControlPlane(settings, ack_timeout_s=2)
    events: list[Event] = []
    times: list[float] = []
    rejected: set[str] = set()
    publish_envoy, publish_config = plane.ads.publish, plane.stream.publish

    async def to_envoy(snapshot: dict[str, Resources]) -> None:
        events.append(("envoy", snapshot))
        times.append(time.monotonic())
        await publish_envoy(snapshot)

    async def to_extproc(config: pb.RoutingConfig) -> None:
        events.append(("ext_proc", config.version))
        times.append(time.monotonic())
        await publish_config(config)

    plane.ads.publish = to_envoy  # type: ignore[method-assign]
    plane.stream.publish = to_extproc  # type: ignore[method-assign]

    async def answer() -> None:
        envoy = plane.ads.nodes.setdefault("envoy", NodeStatus())
        while True:
            for type_url, resources in plane.ads.snapshot.items():
                envoy.acked[type_url] = resources.version
            version = plane.stream.config.version
            if version in rejected:
                plane.stream.nacked["ext_proc"] = (version, "bundle missing")
            elif version:
                plane.stream.acked["ext_proc"] = version
            await asyncio.sleep(0.001)

    peer = asyncio.create_task(answer())
    yield plane, events, rejected, times
    peer.cancel()


def _config(doc: dict[str, Any]) -> pb.RoutingConfig:
    return compile_config([parse_policy(doc)])


def _renamed(doc: dict[str, Any]) -> dict[str, Any]:
    renamed = copy.deepcopy(doc)
    renamed["spec"]["models"][0]["name"] = "lite"
    renamed["spec"]["strategy"]["tiers"][0]["model"] = "lite"
    renamed["spec"]["strategy"]["rules"][0]["route"] = "lite"
    return renamed


async def test_old_routes_leave_only_after_the_extprocs_switched(
    plane: tuple[ControlPlane, list[Event], set[str], list[float]], policy_doc: dict[str, Any]
) -> None:
    control, events, _, times = plane
    await control.prime(_config(policy_doc))
    events.clear()
    times.clear()
    new = _config(_renamed(policy_doc))
    result = await control.apply(new)
    assert result.envoy_acked and result.extproc_acked and not result.rejected
    assert [kind for kind, _ in events] == ["envoy", "ext_proc", "envoy"]
    bridge, final = events[0][1], events[2][1]
    assert {"default.default.light", "default.default.lite"} <= _backend_routes(bridge)
    assert "default.default.light" not in _backend_routes(final)
    assert events[1][1] == new.version
    # New routes: requests that arrived before them get to their decision first, and the
    # old routes stay until decisions begun under the old config are done.
    assert times[1] - times[0] >= DRAIN_MS / 1000
    assert times[2] - times[1] >= DRAIN_MS / 1000


async def test_an_extproc_rejection_restores_the_previous_config_everywhere(
    plane: tuple[ControlPlane, list[Event], set[str], list[float]], policy_doc: dict[str, Any]
) -> None:
    control, events, rejected, _ = plane
    old = _config(policy_doc)
    await control.prime(old)
    before = control.ads.snapshot
    events.clear()
    bad = _config(_renamed(policy_doc))
    rejected.add(bad.version)
    result = await control.apply(bad)
    assert not result.extproc_acked
    assert "rejected routing config" in result.rejected and "bundle missing" in result.rejected
    kinds = [(kind, value if kind == "ext_proc" else None) for kind, value in events]
    assert kinds == [("envoy", None), ("ext_proc", bad.version), ("ext_proc", old.version),
                     ("envoy", None)]  # fmt: skip
    restored = events[-1][1]
    assert all(restored[t] == before[t] for t in (CLUSTER, LISTENER, ROUTE))
    # The same version, sent again once the cause is gone, is judged afresh.
    rejected.clear()
    assert (await control.apply(bad)).extproc_acked
