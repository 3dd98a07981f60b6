"""Local mode's control plane: the operator's ControlPlane (ADS for Envoy, the config stream
for the ext_proc workers) on a loopback port, run on its own event-loop thread so the
synchronous runner and tests can drive it. With a metrics port it serves the operator's
Prometheus metrics too (switchyard/operator/metrics.py), the reloads of the policy files
standing in for the operator's reconciles."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from envoy.extensions.resource_monitors.downstream_connections.v3 import (
    downstream_connections_pb2,
)
from google.protobuf import json_format, struct_pb2

from switchyard.api.v1 import routing_pb2 as pb
from switchyard.operator.control_plane import ApplyResult, ControlPlane
from switchyard.operator.envoy_config import GatewaySettings
from switchyard.operator.envoy_tls import EnvoyMtls
from switchyard.operator.metrics import MetricsServer
from switchyard.operator.xds_server import ads_bootstrap_message
from switchyard.operator.xds_types import packed
from switchyard.tls import TlsFiles

T = TypeVar("T")
NODE_ID = "switchyard-local"
ACK_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 50000


class LocalControlPlane:
    """A ControlPlane serving on 127.0.0.1 (a free port) from a background thread."""

    def __init__(
        self,
        settings: GatewaySettings,
        ack_timeout_s: float = ACK_TIMEOUT_S,
        tls: TlsFiles | None = None,
    ) -> None:
        self.plane = ControlPlane(settings, ack_timeout_s)
        self.tls = tls
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="control-plane", daemon=True
        )
        self.port = 0
        self._metrics_server: MetricsServer | None = None
        self._policies: set[str] = set()
        """The policy keys the metrics count (read and written on the loop)."""

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        # Bounded by the plane's own waits: one apply waits for ACKs at most five times.
        timeout = 5 * self.plane.ack_timeout_s + 30
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def start(self, config: pb.RoutingConfig, metrics_port: int = 0) -> int:
        """Listen and serve ``config`` to whoever connects (and GET /metrics on 127.0.0.1's
        ``metrics_port`` unless 0); returns the port."""
        self._thread.start()
        if metrics_port:
            self._metrics_server = MetricsServer(self.plane.metrics, f"127.0.0.1:{metrics_port}")
            try:
                self._run(self._metrics_server.start())
            except OSError as exc:  # the runner reports RuntimeErrors and exits 1
                raise RuntimeError(f"controlPlaneMetricsPort {metrics_port}: {exc}") from None
        self.port = self._run(self.plane.start("127.0.0.1:0", self.tls))
        self._run(self.plane.prime(config))
        return self.port

    def policies_served(self, config: pb.RoutingConfig, left_out: dict[str, str]) -> None:
        """Record the policies of ``config`` as ready, but those in ``left_out`` (the policies
        gauge); the reconciler does this in the operator."""
        keys = {f"{p.namespace}/{p.name}" for p in config.policies} | set(left_out)

        def record() -> None:
            metrics = self.plane.metrics
            for key in self._policies - keys:
                metrics.policy_deleted(key)
            for key in sorted(keys):
                metrics.policy_state(key, key not in left_out)
            self._policies = keys

        self._loop.call_soon_threadsafe(record)

    def reconcile_error(self, reason: str) -> None:
        """An edit that did not go live (``reason`` as the operator's Ready condition's)."""
        counter = self.plane.metrics.reconcile_errors.labels(reason)
        self._loop.call_soon_threadsafe(counter.inc)

    @property
    def config_source(self) -> str:
        """The ext_proc's ``--config`` for this control plane."""
        return f"grpc://127.0.0.1:{self.port}"

    def apply(self, config: pb.RoutingConfig) -> ApplyResult:
        """Deliver ``config`` in the control plane's order; see ControlPlane.apply."""
        return self._run(self.plane.apply(config))

    def left_out(self, version: str) -> dict[str, str]:
        """Policy key → why, for the policies an ext_proc worker did not load from ``version``
        (the others are served)."""
        rejected = self.plane.stream.rejected_policies(version)
        return {key: sorted(set(why.values()))[0] for key, why in sorted(rejected.items())}

    def write_bootstrap(
        self,
        directory: Path,
        admin_port: int,
        tls: EnvoyMtls | None = None,
        trace_flush_ms: int | None = None,
    ) -> Path:
        """Envoy's bootstrap: everything but the control plane itself comes over ADS (over
        mTLS with ``tls``). ``trace_flush_ms``: how often Envoy exports its buffered spans
        (its default is 5 s)."""
        bootstrap = ads_bootstrap_message(NODE_ID, admin_port, "127.0.0.1", self.port, tls)
        if trace_flush_ms is not None:
            runtime = struct_pb2.Struct()
            runtime.update({"tracing.opentelemetry.flush_interval_ms": trace_flush_ms})
            bootstrap.layered_runtime.layers.add(name="static", static_layer=runtime)
        limit = downstream_connections_pb2.DownstreamConnectionsConfig(
            max_active_downstream_connections=MAX_CONNECTIONS
        )
        bootstrap.overload_manager.resource_monitors.add(
            name="envoy.resource_monitors.global_downstream_max_connections",
            typed_config=packed(limit),
        )
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "bootstrap.json"
        path.write_text(json_format.MessageToJson(bootstrap, preserving_proto_field_name=True))
        return path

    def stop(self) -> None:
        if self._thread.is_alive():
            if self._metrics_server is not None:
                self._run(self._metrics_server.stop())
            self._run(self.plane.stop())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            if not self._thread.is_alive():
                self._loop.close()
