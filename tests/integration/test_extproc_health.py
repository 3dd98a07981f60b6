"""The ext_proc's Kubernetes probes on its metrics port: /healthz while every worker runs,
/readyz only once every worker serves with a routing config, /metrics unchanged."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from gateway_harness import EXAMPLE_POLICY, REPO

from switchyard.local.ports import free_port_block
from switchyard.local.runner import port_open, wait_until
from switchyard.operator.compiler import compile_config
from switchyard.operator.policy import parse_policy


@dataclass
class ExtProc:
    process: subprocess.Popen[str]
    config: Path
    worker_ports: list[int]
    metrics_port: int

    def probe(self, path: str) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=5)

    def write_config(self) -> None:
        """The example policy compiled, written atomically (the watcher never sees half)."""
        proto = compile_config([parse_policy(yaml.safe_load(EXAMPLE_POLICY.read_text()))], "")
        proto.version = "health-1"
        partial = self.config.with_suffix(".tmp")
        partial.write_bytes(proto.SerializeToString())
        partial.replace(self.config)


@pytest.fixture(params=[1, 2], ids=["in-process", "two-workers"])
def extproc(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ExtProc]:
    workers: int = request.param
    first, metrics = free_port_block(workers), free_port_block()
    config = tmp_path / "routing.pb"  # written by the test: none at start
    process = subprocess.Popen(
        [sys.executable, "-m", "switchyard.cli", "extproc", "--config", str(config),
         "--listen", f"127.0.0.1:{first}", "--workers", str(workers),
         "--metrics-port", str(metrics)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    running = ExtProc(process, config, [first + i for i in range(workers)], metrics)
    try:
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()


def _listening(extproc: ExtProc) -> bool:
    return all(port_open("127.0.0.1", p) for p in [extproc.metrics_port, *extproc.worker_ports])


def _workers(parent: int) -> list[int]:
    """The worker processes of ``parent`` (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [
        int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


def _output(extproc: ExtProc) -> str:
    if extproc.process.poll() is None:
        extproc.process.kill()
    assert extproc.process.stdout is not None
    return extproc.process.stdout.read()


def test_ready_only_once_every_worker_has_a_config(extproc: ExtProc) -> None:
    wait_until(lambda: _listening(extproc), 60, "the workers and the metrics port")
    assert extproc.probe("/healthz").status_code == 200
    before = extproc.probe("/readyz")
    assert before.status_code == 503, before.text
    assert "no routing config" in before.text
    extproc.write_config()
    wait_until(lambda: extproc.probe("/readyz").status_code == 200, 60, "readiness")
    assert extproc.probe("/healthz").status_code == 200
    metrics = extproc.probe("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    extproc.process.send_signal(signal.SIGTERM)
    assert extproc.process.wait(timeout=30) == 0, _output(extproc)


@pytest.mark.parametrize("extproc", [2], indirect=True, ids=["two-workers"])
def test_a_dead_worker_fails_both_probes(extproc: ExtProc) -> None:
    """The parent never restarts a worker: only a pod restart brings the capacity back."""
    extproc.write_config()
    wait_until(lambda: _listening(extproc), 60, "the workers and the metrics port")
    wait_until(lambda: extproc.probe("/readyz").status_code == 200, 60, "readiness")
    workers = _workers(extproc.process.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)
    wait_until(lambda: extproc.probe("/healthz").status_code == 503, 30, "liveness failing")
    assert "exited" in extproc.probe("/healthz").text
    assert extproc.probe("/readyz").status_code == 503
