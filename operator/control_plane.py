"""The control plane's delivery side: one gRPC server with ADS (for Envoy) and the config
stream (for ext_proc replicas), fed with compiled RoutingConfigs.

Applying a config is ordered so that no request ever meets a half-applied change:
1. clusters the new config adds are pushed together with every cluster still in use
   (make before break), with the new routes and listener;
2. once every Envoy has ACKed that, the ext_proc replicas get the new RoutingConfig, so no
   decision names a route Envoy does not know yet;
3. once they have ACKed, clusters nothing uses any more are removed.
Waiting is bounded: a node that never answers delays a change by at most ``ack_timeout_s``.

The ext_proc endpoints (EDS, Kubernetes) are not part of that order: they change with the
ext_proc pods, not with policies, and every snapshot published carries the latest ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc

from switchyard.api.v1 import config_stream_pb2_grpc as cs_grpc
from switchyard.api.v1 import routing_pb2 as pb
from switchyard.operator.config_stream import ConfigStreamServer
from switchyard.operator.envoy_config import ApiKeys, GatewaySettings, extproc_load_assignment
from switchyard.operator.xds_server import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    AdsServer,
    Resources,
    build_snapshot,
    merge_clusters,
    pack,
)

log = logging.getLogger(__name__)


@dataclass
class ApplyResult:
    """How one apply went; ``seconds`` runs from the call until the ext_proc ACKs."""

    version: str
    envoy_acked: bool
    extproc_acked: bool
    seconds: float
    rejected: str = ""
    """Why Envoy rejected the config (then nothing changed anywhere); empty when it did not."""


class ControlPlane:
    """Serves ADS and the config stream on one port."""

    def __init__(
        self,
        settings: GatewaySettings,
        ack_timeout_s: float = 5.0,
        on_envoy_nack: Callable[[str, str, str, str], None] | None = None,
        on_extproc_nack: Callable[[str, str, str], None] | None = None,
        api_keys: ApiKeys | None = None,
    ) -> None:
        self.settings = settings
        self.api_keys = api_keys
        self.ack_timeout_s = ack_timeout_s
        self.ads = AdsServer(on_envoy_nack)
        self.stream = ConfigStreamServer(on_extproc_nack)
        self._server: grpc.aio.Server | None = None
        self._lock = asyncio.Lock()
        self._extproc_endpoints: Resources | None = None
        if settings.extproc_eds:
            self._extproc_endpoints = self._endpoints_resource([])
        self.port = 0

    async def start(self, address: str = "127.0.0.1:0") -> int:
        """Listen on ``address``; returns the bound port."""
        server = grpc.aio.server()
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self.ads, server)
        cs_grpc.add_ConfigStreamServicer_to_server(self.stream, server)
        self.port = server.add_insecure_port(address)
        await server.start()
        self._server = server
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=1.0)

    @staticmethod
    def _endpoints_resource(endpoints: list[tuple[str, int]]) -> Resources:
        return pack([{"@type": ENDPOINT, **extproc_load_assignment(endpoints)}])

    async def set_extproc_endpoints(self, endpoints: list[tuple[str, int]]) -> None:
        """The ready ext_proc pods changed: push them to every Envoy now (EDS)."""
        if self._extproc_endpoints is None:
            raise RuntimeError("the ext_proc endpoints are static (GatewaySettings.extproc_eds)")
        self._extproc_endpoints = self._endpoints_resource(sorted(set(endpoints)))
        if self.ads.snapshot:
            await self._publish(self.ads.snapshot)

    async def _publish(self, snapshot: dict[str, Resources]) -> None:
        """Publish with the latest ext_proc endpoints, whenever ``snapshot`` was built."""
        if self._extproc_endpoints is not None:
            snapshot = {**snapshot, ENDPOINT: self._extproc_endpoints}
        await self.ads.publish(snapshot)

    async def prime(self, config: pb.RoutingConfig) -> None:
        """The first config, published before any Envoy or ext_proc is connected (no
        ordering to keep, nobody to wait for)."""
        async with self._lock:
            await self._publish(build_snapshot(config, self.settings, self.api_keys))
            await self.stream.publish(config)

    async def apply(self, config: pb.RoutingConfig) -> ApplyResult:
        """Deliver ``config`` to every Envoy and ext_proc, in the order described above."""
        async with self._lock:
            started = time.monotonic()
            final = build_snapshot(config, self.settings, self.api_keys)
            bridge = merge_clusters(self.ads.snapshot, final)
            previous = self.ads.snapshot
            await self._publish(bridge)
            envoy_ok = await self._wait(
                lambda: self._envoy_has(bridge) or bool(self._rejection(bridge))
            )
            rejection = self._rejection(bridge)
            if rejection:
                # Envoy keeps its last good config; so must everything else, or the ext_procs
                # would choose routes Envoy does not have.
                await self._publish(previous)
                seconds = time.monotonic() - started
                return ApplyResult(config.version, False, False, seconds, rejection)
            await self.stream.publish(config)
            extproc_ok = await self._wait(lambda: self.stream.acked_everywhere(config.version))
            seconds = time.monotonic() - started
            if bridge is not final:
                await self._publish(final)
                envoy_ok = await self._wait(lambda: self._envoy_has(final)) and envoy_ok
            return ApplyResult(config.version, envoy_ok, extproc_ok, seconds)

    def _rejection(self, snapshot: dict[str, Resources]) -> str:
        """The first NACK message any Envoy sent for this snapshot's versions."""
        for node, status in self.ads.nodes.items():
            for type_url, (version, message) in status.nacked.items():
                if type_url in snapshot and snapshot[type_url].version == version:
                    return f"{node} rejected {type_url.rsplit('.', 1)[-1]}: {message}"
        return ""

    def _envoy_has(self, snapshot: dict[str, Resources]) -> bool:
        return all(
            self.ads.acked_everywhere(t, snapshot[t].version) for t in (CLUSTER, LISTENER, ROUTE)
        )

    async def _wait(self, condition: Callable[[], bool]) -> bool:
        deadline = time.monotonic() + self.ack_timeout_s
        while not condition():
            if time.monotonic() > deadline:
                log.warning("gave up waiting for ACKs after %.1fs", self.ack_timeout_s)
                return False
            await asyncio.sleep(0.005)
        return True
