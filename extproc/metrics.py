"""Prometheus metrics of the ext_proc, served on ``--metrics-port`` at ``/metrics``, beside
the Kubernetes probes ``/healthz`` (200 while every worker runs) and ``/readyz`` (200 once every
worker serves with a routing config; 503 with the reason until then).

* ``switchyard_decisions_total{policy, model, kind}``: routed requests; ``kind`` is how the
  model was chosen (classifier, rule, default, weighted, direct), without the free-text detail.
  Its rate is the requests-per-second signal the operator's HPAs scale on (through a metrics
  adapter; see the Helm chart's values).
* ``switchyard_rejections_total{status, code}``: requests the ext_proc answered itself with an
  OpenAI-style error.
* ``switchyard_responses_total{policy, model, outcome}``: routed requests whose response
  ended, by the model that answered; ``outcome`` is complete, incomplete (the client hung up or
  the upstream failed mid-body) or error (an HTTP error status).
* ``switchyard_tokens_total{policy, model, direction}``: tokens (``direction`` input or
  output) as the provider reported them, or estimated for incomplete responses.
* ``switchyard_cost_usd_total{policy, model}``: those tokens at the policy's prices.
* ``switchyard_fallbacks_total{policy, from_model, to_model}``: responses from another model
  than the one the ext_proc chose (Envoy retried on a fallback).
* ``switchyard_decision_duration_seconds{policy}`` and
  ``switchyard_classifier_duration_seconds{bundle}``: time to route a request (from its body
  to the decision) and the router model's share of it.

The full table, with Envoy's own series, is in docs/architecture.md ("Metrics").

Workers are separate processes. With more than one, prometheus_client runs in multiprocess
mode: the parent points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before it starts the
workers (each records into its own memory-mapped file) and serves their sum. Recording is a
labelled counter increment: no I/O on the event loop.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    make_wsgi_app,
    multiprocess,
)
from prometheus_client.exposition import ThreadingWSGIServer

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

Probe = Callable[[], str | None]
"""None when healthy, else the reason (sent with a 503)."""
StartResponse = Callable[[str, list[tuple[str, str]]], Any]

DECISIONS = Counter(
    "switchyard_decisions",
    "Requests routed, by policy, model and how the model was chosen.",
    ["policy", "model", "kind"],
)
REJECTIONS = Counter(
    "switchyard_rejections",
    "Requests the ext_proc answered itself with an error, by HTTP status and error code.",
    ["status", "code"],
)


RESPONSES = Counter(
    "switchyard_responses",
    "Routed requests whose response ended, by policy, answering model and outcome.",
    ["policy", "model", "outcome"],
)
TOKENS = Counter(
    "switchyard_tokens",
    "Tokens of routed requests, by policy, answering model and direction (input, output).",
    ["policy", "model", "direction"],
)
COST = Counter(
    "switchyard_cost_usd",
    "Cost of routed requests in US dollars at the policy's prices, by policy and model.",
    ["policy", "model"],
)
FALLBACKS = Counter(
    "switchyard_fallbacks",
    "Responses from a fallback model instead of the chosen one.",
    ["policy", "from_model", "to_model"],
)
_LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
)
DECISION_SECONDS = Histogram(
    "switchyard_decision_duration_seconds",
    "Time from a request's body to its routing decision in the ext_proc.",
    ["policy"],
    buckets=_LATENCY_BUCKETS,
)
CLASSIFIER_SECONDS = Histogram(
    "switchyard_classifier_duration_seconds",
    "Time the router model took to score one request (batching included).",
    ["bundle"],
    buckets=_LATENCY_BUCKETS,
)


def decision_kind(reason: str) -> str:
    """'classifier: difficulty 0.12 <= 0.16' -> 'classifier' (bounded label values)."""
    return reason.split(":", 1)[0].split(",", 1)[0].strip() or "unknown"


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds
        pass


class _Server6(ThreadingWSGIServer):
    address_family = socket.AF_INET6


class MetricsServer:
    """The /metrics, /healthz and /readyz endpoints of one ext_proc (all its workers)."""

    def __init__(
        self,
        port: int,
        address: str = "0.0.0.0",
        workers: int = 1,
        alive: Probe | None = None,
        ready: Probe | None = None,
    ) -> None:
        self.port = port
        self.address = address
        self._alive = alive or _healthy
        self._ready = ready or _healthy
        self._server: WSGIServer | None = None
        self._directory: str | None = None
        if workers > 1:
            # Before any worker starts: they inherit the variable and write their files there.
            self._directory = tempfile.mkdtemp(prefix="switchyard-metrics-")
            os.environ[MULTIPROC_ENV] = self._directory

    def start(self) -> None:
        """Serve on a daemon thread (scrapes never run on a worker's event loop)."""
        registry = REGISTRY
        if self._directory is not None:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self._directory)  # type: ignore[no-untyped-call]
        metrics = make_wsgi_app(registry)

        def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
            probe = {"/healthz": self._alive, "/readyz": self._ready}.get(environ["PATH_INFO"])
            if probe is None:
                return metrics(environ, start_response)  # type: ignore[no-any-return]
            reason = probe()
            status = "200 OK" if reason is None else "503 Service Unavailable"
            start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
            return [f"{reason or 'ok'}\n".encode()]

        server_class = _Server6 if ":" in self.address else ThreadingWSGIServer
        self._server = make_server(
            self.address, self.port, app, server_class, handler_class=_QuietHandler
        )
        threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True).start()

    def worker_exited(self, pid: int) -> None:
        if self._directory is not None:
            multiprocess.mark_process_dead(pid, self._directory)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)


def _healthy() -> str | None:
    return None
