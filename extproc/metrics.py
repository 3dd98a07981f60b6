"""Prometheus metrics of the ext_proc, served on ``--metrics-port`` at ``/metrics``.

* ``switchyard_decisions_total{policy, model, kind}``: routed requests; ``kind`` is how the
  model was chosen (classifier, rule, default, weighted, direct), without the free-text detail.
  Its rate is the requests-per-second signal the operator's HPAs scale on (through a metrics
  adapter; see the Helm chart's values).
* ``switchyard_rejections_total{status, code}``: requests the ext_proc answered itself with an
  OpenAI-style error.

Workers are separate processes. With more than one, prometheus_client runs in multiprocess
mode: the parent points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before it starts the
workers (each records into its own memory-mapped file) and serves their sum. Recording is a
labelled counter increment: no I/O on the event loop.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from prometheus_client import CollectorRegistry, Counter, multiprocess, start_http_server

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

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


def decision_kind(reason: str) -> str:
    """'classifier: difficulty 0.12 <= 0.16' -> 'classifier' (bounded label values)."""
    return reason.split(":", 1)[0].split(",", 1)[0].strip() or "unknown"


class MetricsServer:
    """The /metrics endpoint of one ext_proc (all its workers)."""

    def __init__(self, port: int, address: str = "0.0.0.0", workers: int = 1) -> None:
        self.port = port
        self.address = address
        self._directory: str | None = None
        if workers > 1:
            # Before any worker starts: they inherit the variable and write their files there.
            self._directory = tempfile.mkdtemp(prefix="switchyard-metrics-")
            os.environ[MULTIPROC_ENV] = self._directory

    def start(self) -> None:
        """Serve on a daemon thread (scrapes never run on a worker's event loop)."""
        registry = None
        if self._directory is not None:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self._directory)  # type: ignore[no-untyped-call]
        if registry is None:
            start_http_server(self.port, self.address)
        else:
            start_http_server(self.port, self.address, registry=registry)

    def worker_exited(self, pid: int) -> None:
        if self._directory is not None:
            multiprocess.mark_process_dead(pid, self._directory)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
