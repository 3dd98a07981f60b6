"""Prometheus metrics of the operator, served on ``--metrics-listen`` at ``/metrics``.

What an on-call person reads to see whether config delivery works or is stuck (the table in
docs/architecture.md, "Metrics", lists every series):

* ``switchyard_operator_config_generation`` rises with every config the control plane starts
  to deliver; ``switchyard_operator_config_info{version}`` is the RoutingConfig version served.
* ``switchyard_operator_xds_responses_total{client, type_url, result}``: ACKs and NACKs per
  Envoy node and ext_proc replica. A client's series go when its last stream ends, so their
  number follows the connected pods, whatever ids hostile or restarting clients send.
* ``switchyard_operator_connected_clients{kind}`` and ``switchyard_operator_clients_behind{kind}``
  (connected, but not on the current config: stuck when it stays above 0).
* ``switchyard_operator_config_applies_total{result}`` and the histogram
  ``switchyard_operator_config_apply_seconds`` (from the apply until every ACK).
* ``switchyard_operator_reconcile_errors_total{reason}`` and
  ``switchyard_operator_policies{state}``.
* ``switchyard_operator_spend_reads_total{result}``: reads of the budget counters in Redis for
  the ClientKeys spend status (``ok`` or ``unavailable``).

Recording runs on the event loop and is a dict update or a locked float increment. The server
runs on the same loop (aiohttp, as kopf's probes): a scrape counts the clients behind there,
where the control plane's state is consistent, and renders the text on a thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Protocol

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder

from switchyard.api.v1 import routing_pb2 as pb

log = logging.getLogger(__name__)

ENVOY, EXTPROC = "envoy", "extproc"
ROUTING_CONFIG = "type.googleapis.com/" + pb.RoutingConfig.DESCRIPTOR.full_name
"""The ``type_url`` label of the config stream's ACKs and NACKs (ext_proc replicas)."""
MAX_CLIENT_LABEL = 128
"""Client ids are chosen by the client: a longer one is cut (and marked) in the label."""
APPLY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
READY, NOT_READY = "ready", "not_ready"


class _NodeStatus(Protocol):
    acked: dict[str, str]


class _Versioned(Protocol):
    version: str


class _Ads(Protocol):
    nodes: dict[str, _NodeStatus]

    @property
    def snapshot(self) -> Mapping[str, _Versioned]: ...


class _Stream(Protocol):
    acked: dict[str, str]

    @property
    def config(self) -> pb.RoutingConfig: ...


class _Applied(Protocol):
    envoy_acked: bool
    extproc_acked: bool
    seconds: float
    rejected: str


class OperatorMetrics:
    """The operator's series, in their own registry (one per ControlPlane)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        r = self.registry
        self.generation = Gauge(
            "switchyard_operator_config_generation",
            "Configs the control plane started to deliver since it started (prime and applies).",
            registry=r,
        )
        self.info = Info(
            "switchyard_operator_config", "The RoutingConfig version served.", registry=r
        )
        self.responses = Counter(
            "switchyard_operator_xds_responses",
            "ACKs and NACKs of pushed config, per Envoy node or ext_proc replica and type.",
            ["client", "type_url", "result"],
            registry=r,
        )
        self.connected = Gauge(
            "switchyard_operator_connected_clients",
            "Open ADS (envoy) and config stream (extproc) streams.",
            ["kind"],
            registry=r,
        )
        self.behind = Gauge(
            "switchyard_operator_clients_behind",
            "Connected clients that have not ACKed the current config (at scrape time).",
            ["kind"],
            registry=r,
        )
        self.applies = Counter(
            "switchyard_operator_config_applies",
            "Config applies by outcome: acked (everywhere), rejected (a NACK; the previous "
            "config was restored) or timeout (some client did not answer in time).",
            ["result"],
            registry=r,
        )
        self.apply_seconds = Histogram(
            "switchyard_operator_config_apply_seconds",
            "Seconds from an apply until every Envoy and ext_proc ACKed it (acked applies).",
            buckets=APPLY_BUCKETS,
            registry=r,
        )
        self.reconcile_errors = Counter(
            "switchyard_operator_reconcile_errors",
            "RoutePolicy reconciles that did not end Ready, by the Ready condition's reason.",
            ["reason"],
            registry=r,
        )
        self.policies = Gauge(
            "switchyard_operator_policies",
            "RoutePolicies by the state of their Ready condition (ready, not_ready).",
            ["state"],
            registry=r,
        )
        self.spend_reads = Counter(
            "switchyard_operator_spend_reads",
            "Reads of the ClientKeys budget counters in Redis for the spend status, by result: "
            "ok, or unavailable (Redis did not answer; the statuses keep their figures).",
            ["result"],
            registry=r,
        )
        for result in ("ok", "unavailable"):
            self.spend_reads.labels(result)
        for kind in (ENVOY, EXTPROC):
            self.connected.labels(kind)
            self.behind.labels(kind)
        for result in ("acked", "rejected", "timeout"):
            self.applies.labels(result)
        for state in (READY, NOT_READY):
            self.policies.labels(state)
        self._open = {ENVOY: 0, EXTPROC: 0}
        self._streams: dict[tuple[str, str], int] = {}
        """(kind, client) → open streams that named that client."""
        self._labels: dict[tuple[str, str], set[tuple[str, str]]] = {}
        """(kind, client label) → its (type_url, result) series, removed when it leaves."""
        self._ready: dict[str, bool] = {}
        self._follow: tuple[_Ads, _Stream] | None = None

    # The control plane, on the event loop.

    def config_started(self) -> None:
        """The control plane starts to deliver a config: one more generation."""
        self.generation.inc()

    def config_current(self, version: str) -> None:
        """``version`` is the RoutingConfig the ext_procs are sent now."""
        self.info.info({"version": version})

    def stream_opened(self, kind: str) -> None:
        """A stream opened; it is named "" until its first message names its client."""
        self._open[kind] += 1
        self.connected.labels(kind).set(self._open[kind])
        self._hold(kind, "")

    def client_named(self, kind: str, client: str, previous: str) -> None:
        """A stream named its client ``client`` (it was ``previous``)."""
        self._release(kind, previous)
        self._hold(kind, client)

    def stream_closed(self, kind: str, client: str) -> None:
        """A stream named ``client`` ended; the client's series go with its last stream."""
        self._open[kind] -= 1
        self.connected.labels(kind).set(self._open[kind])
        self._release(kind, client)

    def _hold(self, kind: str, client: str) -> None:
        key = (kind, client)
        self._streams[key] = self._streams.get(key, 0) + 1

    def _release(self, kind: str, client: str) -> None:
        key = (kind, client)
        left = self._streams.pop(key, 1) - 1
        if left > 0:
            self._streams[key] = left
            return
        label = client_label(client)
        if label != client and any(
            k == kind and client_label(c) == label for k, c in self._streams
        ):
            return  # another long id cut to the same label is still connected
        for type_url, result in self._labels.pop((kind, label), ()):
            self.responses.remove(label, type_url, result)

    def response(self, kind: str, client: str, type_url: str, acked: bool) -> None:
        """One ACK (or NACK) of pushed config."""
        label, result = client_label(client), "ack" if acked else "nack"
        self._labels.setdefault((kind, label), set()).add((type_url, result))
        self.responses.labels(label, type_url, result).inc()

    def applied(self, result: _Applied) -> None:
        """An apply finished (ControlPlane.apply)."""
        if result.rejected:
            self.applies.labels("rejected").inc()
        elif result.envoy_acked and result.extproc_acked:
            self.applies.labels("acked").inc()
            self.apply_seconds.observe(result.seconds)
        else:
            self.applies.labels("timeout").inc()

    def follow(self, ads: _Ads, stream: _Stream) -> None:
        """Count the clients behind these servers' current config at each scrape."""
        self._follow = (ads, stream)

    def observe(self) -> None:
        """Set the gauges computed at scrape time (on the event loop)."""
        if self._follow is None:
            return
        ads, stream = self._follow
        snapshot = {t: r.version for t, r in ads.snapshot.items()}
        envoys = sum(
            all(n.acked.get(t) == v for t, v in snapshot.items()) for n in ads.nodes.values()
        )
        version = stream.config.version
        extprocs = sum(v == version for v in stream.acked.values()) if version else None
        for kind, current in ((ENVOY, envoys), (EXTPROC, extprocs)):
            behind = 0 if current is None else max(0, self._open[kind] - current)
            self.behind.labels(kind).set(behind)

    # The reconciler.

    def reconciled(self, key: str, ready: bool, reason: str) -> None:
        """A policy's Ready condition was written (``reason`` counts when not ready)."""
        if not ready:
            self.reconcile_errors.labels(reason).inc()
        self.policy_state(key, ready)

    def policy_state(self, key: str, ready: bool) -> None:
        self._ready[key] = ready
        self._count_policies()

    def policy_deleted(self, key: str) -> None:
        if self._ready.pop(key, None) is not None:
            self._count_policies()

    def _count_policies(self) -> None:
        ready = sum(self._ready.values())
        self.policies.labels(READY).set(ready)
        self.policies.labels(NOT_READY).set(len(self._ready) - ready)


def client_label(client: str) -> str:
    if len(client) <= MAX_CLIENT_LABEL:
        return client
    return client[: MAX_CLIENT_LABEL - 3] + "..."


class MetricsServer:
    """GET /metrics of one OperatorMetrics, on the running event loop."""

    def __init__(self, metrics: OperatorMetrics, listen: str) -> None:
        host, _, port = listen.rpartition(":")
        self.host, self.port = host.strip("[]") or "0.0.0.0", int(port)
        self._metrics = metrics
        self._runner: web.AppRunner | None = None
        self._rendering = asyncio.Lock()

    async def start(self) -> int:
        """Listen; returns the bound port (``listen`` may name port 0)."""
        app = web.Application()
        app.router.add_get("/metrics", self._scrape)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        log.info("metrics on %s:%d/metrics", self.host, self.port)
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _scrape(self, request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        registry = self._metrics.registry
        async with self._rendering:  # one rendering thread at a time, however many scrapers
            self._metrics.observe()
            body = await asyncio.to_thread(encoder, registry)
        return web.Response(body=body, headers={"Content-Type": content_type})
