"""The ext_proc's Kubernetes probes on its metrics port: /healthz unless a worker keeps
exiting, /readyz only once every worker serves with a routing config, /metrics unchanged; a
killed worker is restarted on its port."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import httpx
import pytest
import yaml
from gateway_harness import EXAMPLE_POLICY, REPO

from switchyard.api.v1 import config_stream_pb2_grpc as cs_grpc
from switchyard.api.v1 import routing_pb2 as pb
from switchyard.local.ports import free_port_block
from switchyard.local.runner import port_open, wait_until
from switchyard.operator.compiler import compile_config
from switchyard.operator.config_stream import ConfigStreamServer
from switchyard.operator.policy import parse_policy

T = TypeVar("T")


def example_config(version: str) -> pb.RoutingConfig:
    proto = compile_config([parse_policy(yaml.safe_load(EXAMPLE_POLICY.read_text()))], "")
    proto.version = version
    return proto


@dataclass
class ExtProc:
    process: subprocess.Popen[str]
    config_source: str
    log: Path
    worker_ports: list[int]
    metrics_port: int

    def probe(self, path: str) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=5)


@contextmanager
def running_extproc(config_source: str, workers: int, directory: Path) -> Iterator[ExtProc]:
    first, metrics = free_port_block(workers), free_port_block()
    log = directory / "extproc.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "switchyard.cli", "extproc", "--config", config_source,
             "--listen", f"127.0.0.1:{first}", "--workers", str(workers),
             "--metrics-port", str(metrics)],
            cwd=REPO, stdout=output, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    try:
        yield ExtProc(process, config_source, log, [first + i for i in range(workers)], metrics)
    except BaseException:
        print(f"ext_proc output:\n{log.read_text()}")  # shown with the failure
        raise
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()


class StreamServer:
    """The control plane's config stream, served from a thread of the test process."""

    def __init__(self) -> None:
        self.port = free_port_block()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server, self.stream = self._call(self._start())

    async def _start(self) -> tuple[grpc.aio.Server, ConfigStreamServer]:
        stream, server = ConfigStreamServer(), grpc.aio.server()
        cs_grpc.add_ConfigStreamServicer_to_server(stream, server)
        server.add_insecure_port(f"127.0.0.1:{self.port}")
        await server.start()
        return server, stream

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)

    def publish(self, config: pb.RoutingConfig) -> None:
        self._call(self.stream.publish(config))

    def close(self) -> None:
        self._call(self._server.stop(0))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


@pytest.fixture(params=[1, 2], ids=["in-process", "two-workers"])
def extproc(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ExtProc]:
    """An ext_proc watching a routing.pb that does not exist yet (``write_config``)."""
    with running_extproc(str(tmp_path / "routing.pb"), request.param, tmp_path) as running:
        yield running


def write_config(extproc: ExtProc) -> None:
    """The example policy compiled, written atomically (the watcher never sees half)."""
    config = Path(extproc.config_source)
    partial = config.with_suffix(".tmp")
    partial.write_bytes(example_config("health-1").SerializeToString())
    partial.replace(config)


def _listening(extproc: ExtProc) -> bool:
    return all(port_open("127.0.0.1", p) for p in [extproc.metrics_port, *extproc.worker_ports])


def _workers(parent: int) -> list[int]:
    """The worker processes of ``parent`` (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [
        int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


def _output(extproc: ExtProc) -> str:
    return extproc.log.read_text()


def test_ready_only_once_every_worker_has_a_config(extproc: ExtProc) -> None:
    wait_until(lambda: _listening(extproc), 60, "the workers and the metrics port")
    assert extproc.probe("/healthz").status_code == 200
    before = extproc.probe("/readyz")
    assert before.status_code == 503, before.text
    assert "no routing config" in before.text
    write_config(extproc)
    wait_until(lambda: extproc.probe("/readyz").status_code == 200, 60, "readiness")
    assert extproc.probe("/healthz").status_code == 200
    metrics = extproc.probe("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    extproc.process.send_signal(signal.SIGTERM)
    assert extproc.process.wait(timeout=30) == 0, _output(extproc)


@pytest.mark.parametrize("extproc", [2], indirect=True, ids=["two-workers"])
def test_a_killed_worker_is_restarted_on_its_port(extproc: ExtProc) -> None:
    """The parent starts a killed worker again on the same port; the probes pass again once it
    serves; stopping the parent still stops every worker (none is orphaned)."""
    write_config(extproc)
    wait_until(lambda: _listening(extproc), 60, "the workers and the metrics port")
    wait_until(lambda: extproc.probe("/readyz").status_code == 200, 60, "readiness")
    workers = _workers(extproc.process.pid)
    assert len(workers) == 2, workers
    os.kill(workers[0], signal.SIGKILL)

    def replaced() -> bool:
        now = _workers(extproc.process.pid)
        return len(now) == 2 and workers[0] not in now and workers[1] in now

    wait_until(replaced, 60, "a new worker in the killed one's place")
    current = _workers(extproc.process.pid)
    wait_until(lambda: extproc.probe("/readyz").status_code == 200, 60, "readiness again")
    assert extproc.probe("/healthz").status_code == 200
    assert _listening(extproc)
    assert f"(pid {workers[0]}) was killed by SIGKILL" in _output(extproc)
    assert "restarting in 0.1 s" in _output(extproc)
    extproc.process.send_signal(signal.SIGTERM)
    assert extproc.process.wait(timeout=30) == 0, _output(extproc)
    wait_until(lambda: not any(Path(f"/proc/{p}").exists() for p in current), 30, "workers' exit")


def test_ready_once_the_config_stream_delivered_to_every_worker(tmp_path: Path) -> None:
    """Over the config stream a worker listens only once it has a config: until then only the
    metrics port answers, and /readyz says no."""
    server = StreamServer()
    try:
        with running_extproc(f"grpc://127.0.0.1:{server.port}", 2, tmp_path) as extproc:
            wait_until(lambda: port_open("127.0.0.1", extproc.metrics_port), 60, "metrics port")
            wait_until(lambda: len(_workers(extproc.process.pid)) == 2, 60, "two workers")
            before = extproc.probe("/readyz")
            assert before.status_code == 503 and "no routing config" in before.text
            server.publish(example_config("stream-1"))
            wait_until(lambda: extproc.probe("/readyz").status_code == 200, 60, "readiness")
            acked = server.stream.acked
            wait_until(lambda: len(acked) == 2, 30, "both workers' ACKs")
            assert server.stream.acked_everywhere("stream-1")
            assert _listening(extproc)
    finally:
        server.close()
