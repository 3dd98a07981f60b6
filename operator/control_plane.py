"""The control plane's delivery side: one gRPC server with ADS (for Envoy) and the config
stream (for ext_proc replicas), fed with compiled RoutingConfigs.

Applying a config is ordered so that no request ever meets a half-applied change:
1. the new listener, routes and clusters are pushed together with the old config's backend
   routes and clusters (make before break), so both configs' decisions are served;
2. once every Envoy has ACKed that, the ext_proc replicas get the new RoutingConfig, so no
   decision names a route Envoy does not know yet. Envoy matches a request against the route
   table it had when the request's headers arrived, so when the change adds routes, requests
   that arrived before it are first given time to reach the ext_proc (the ext_proc message
   timeout; only a body still uploading after that can meet the old table);
3. once they have ACKed, and a decision begun under the old config can no longer arrive (the
   ext_proc message timeout), the routes and clusters nothing uses any more are removed.
A rejection (an Envoy NACK in step 1, an ext_proc NACK in step 2) restores the previous config
everywhere and is returned. Waiting is bounded: a node that never answers delays a change by at
most ``ack_timeout_s``.

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
from switchyard.operator.metrics import OperatorMetrics
from switchyard.operator.xds_server import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    AdsServer,
    Resources,
    backend_routes,
    bridge,
    build_snapshot,
    pack,
)
from switchyard.tls import TlsFiles

log = logging.getLogger(__name__)


@dataclass
class ApplyResult:
    """How one apply went; ``seconds`` runs from the call until the ext_proc ACKs."""

    version: str
    envoy_acked: bool
    extproc_acked: bool
    seconds: float
    rejected: str = ""
    """Why Envoy or an ext_proc rejected the config (then the previous one was restored
    everywhere); empty when none did."""


class ControlPlane:
    """Serves ADS and the config stream on one port."""

    def __init__(
        self,
        settings: GatewaySettings,
        ack_timeout_s: float = 5.0,
        on_envoy_nack: Callable[[str, str, str, str], None] | None = None,
        on_extproc_nack: Callable[[str, str, str], None] | None = None,
        api_keys: ApiKeys | None = None,
        metrics: OperatorMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.api_keys = api_keys
        self.ack_timeout_s = ack_timeout_s
        self.metrics = metrics or OperatorMetrics()
        self.ads = AdsServer(on_envoy_nack, self.metrics)
        self.stream = ConfigStreamServer(on_extproc_nack, self.metrics)
        self.metrics.follow(self.ads, self.stream)
        self._server: grpc.aio.Server | None = None
        self._lock = asyncio.Lock()
        self._extproc_endpoints: Resources | None = None
        if settings.extproc_eds:
            self._extproc_endpoints = self._endpoints_resource([])
        self.port = 0

    async def start(self, address: str = "127.0.0.1:0", tls: TlsFiles | None = None) -> int:
        """Listen on ``address`` (mTLS with ``tls``: client certificates required); returns
        the bound port."""
        server = grpc.aio.server()
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self.ads, server)
        cs_grpc.add_ConfigStreamServicer_to_server(self.stream, server)
        if tls is None:
            self.port = server.add_insecure_port(address)
        else:
            self.port = server.add_secure_port(address, tls.grpc_server_credentials())
        await server.start()
        self._server = server
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=1.0)

    @staticmethod
    def _endpoints_resource(endpoints: list[tuple[str, int]]) -> Resources:
        return pack([extproc_load_assignment(endpoints)])

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
            self.metrics.config_started()
            await self._publish(build_snapshot(config, self.settings, self.api_keys))
            await self.stream.publish(config)

    async def apply(self, config: pb.RoutingConfig) -> ApplyResult:
        """Deliver ``config`` to every Envoy and ext_proc, in the order described above."""
        result = await self._apply(config)
        self.metrics.applied(result)
        return result

    async def _apply(self, config: pb.RoutingConfig) -> ApplyResult:
        async with self._lock:
            self.metrics.config_started()
            started = time.monotonic()
            final = build_snapshot(config, self.settings, self.api_keys)
            previous, previous_config = self.ads.snapshot, self.stream.config
            bridged = bridge(previous, final)
            self._forget_rejections(bridged, config.version)
            await self._publish(bridged)
            envoy_ok = await self._wait(
                lambda: self._envoy_has(bridged) or bool(self._rejection(bridged))
            )
            rejection = self._rejection(bridged)
            if rejection:
                # Envoy keeps its last good config; so must everything else, or the ext_procs
                # would choose routes Envoy does not have.
                await self._publish(previous)
                seconds = time.monotonic() - started
                return ApplyResult(config.version, False, False, seconds, rejection)
            if backend_routes(final) - backend_routes(previous):
                await self._drain()
            await self.stream.publish(config)
            extproc_ok = await self._wait(
                lambda: (
                    self.stream.acked_everywhere(config.version)
                    or bool(self._extproc_rejection(config.version))
                )
            )
            seconds = time.monotonic() - started
            rejection = self._extproc_rejection(config.version)
            if rejection:
                await self._restore(previous, previous_config)
                return ApplyResult(config.version, envoy_ok, False, seconds, rejection)
            if bridged is not final:
                await self._drain()
                await self._publish(final)
                envoy_ok = await self._wait(lambda: self._envoy_has(final)) and envoy_ok
            return ApplyResult(config.version, envoy_ok, extproc_ok, seconds)

    async def _drain(self) -> None:
        """Wait out the requests an ext_proc may be deciding right now (the longest Envoy
        waits for a decision)."""
        await asyncio.sleep(self.settings.extproc_message_timeout_ms / 1000)

    async def _restore(self, snapshot: dict[str, Resources], config: pb.RoutingConfig) -> None:
        """An ext_proc rejected a config: every replica back to ``config``, then Envoy back to
        ``snapshot`` (which still has every route the replicas may choose meanwhile)."""
        if config.version:
            await self.stream.publish(config)
            await self._wait(lambda: self.stream.acked_everywhere(config.version))
        await self._publish(snapshot)
        if snapshot:
            await self._wait(lambda: self._envoy_has(snapshot))

    def _forget_rejections(self, snapshot: dict[str, Resources], version: str) -> None:
        """Drop NACKs of the versions about to be sent, so a config rejected once and sent
        again (say, after a missing file appeared) is judged by its new answers."""
        for status in self.ads.nodes.values():
            for type_url, (nacked, _message) in list(status.nacked.items()):
                if type_url in snapshot and snapshot[type_url].version == nacked:
                    del status.nacked[type_url]
        for node, (nacked, _message) in list(self.stream.nacked.items()):
            if nacked == version:
                del self.stream.nacked[node]

    def _extproc_rejection(self, version: str) -> str:
        """The first NACK any ext_proc sent for ``version``."""
        for node, (nacked, message) in self.stream.nacked.items():
            if nacked == version:
                return f"ext_proc {node} rejected routing config {version}: {message}"
        return ""

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
