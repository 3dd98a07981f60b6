"""The local gateway with handles to break it: `switchyard up`'s own LocalGateway, run in this
process (so its in-process control plane can be restarted), with demo upstreams this process
starts, kills and reconfigures (POST /_demo/faults).

Three interchangeable models, each the others' fallback, so every single fault has a healthy
fallback: ``fast`` (the default of ``auto``), ``steady`` and ``spare``. A per-try timeout makes a
slow upstream fail over too. The ext_proc workers listen on TCP so that one killed worker can be
replaced on its own address (the runner does not restart workers; see run_schedule).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from switchyard.api.v1 import routing_pb2 as pb
from switchyard.local.control import LocalControlPlane
from switchyard.local.documents import load_inputs
from switchyard.local.ports import free_port_block
from switchyard.local.runner import LocalGateway, port_open, wait_until

MODELS = ("fast", "steady", "spare")
WORKERS = 2
PER_TRY_TIMEOUT = "1s"
REPO = Path(__file__).resolve().parents[2]


def fault_policy(ports: dict[str, int], names: dict[str, str] | None = None) -> dict[str, Any]:
    """Every model falls back on the others; ``names`` renames (new name) or drops ("")."""
    names = names if names is not None else {m: m for m in MODELS}
    kept = [m for m in MODELS if names.get(m)]
    models = [
        {
            "name": names[m],
            "backend": {"url": f"http://127.0.0.1:{ports[m]}"},
            "upstreamModel": f"{m}-v1",
            "pricing": {"inputPer1M": 1, "outputPer1M": 1},
            "dataClasses": ["public", "internal"],
            "fallbacks": [names[f] for f in kept if f != m],
        }
        for m in kept
    ]
    return {
        "apiVersion": "switchyard.dev/v1alpha1",
        "kind": "RoutePolicy",
        "metadata": {"name": "faults", "namespace": "default"},
        "spec": {
            "match": {"models": ["auto"]},
            "models": models,
            "strategy": {"type": "rules", "default": names["fast"]},
            "retries": {
                "attempts": 2,
                "perTryTimeout": PER_TRY_TIMEOUT,
                "on": ["connect-failure", "reset", "429", "5xx"],
            },
        },
    }


class _PlaneAt(LocalControlPlane):
    """A LocalControlPlane that binds a given port: a restarted one where Envoy and the
    workers reconnect."""

    def start_at(self, config: pb.RoutingConfig, port: int) -> None:
        self._thread.start()
        self.port = self._run(self.plane.start(f"127.0.0.1:{port}"))
        self._run(self.plane.prime(config))


class FaultGateway:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        first = free_port_block(len(MODELS))
        self.ports = {m: first + i for i, m in enumerate(MODELS)}
        self.port, self.admin_port = free_port_block(), free_port_block()
        self.extproc_port = free_port_block(WORKERS)
        self.upstreams: dict[str, subprocess.Popen[bytes]] = {}
        self.replacements: list[subprocess.Popen[bytes]] = []
        self.workers: list[int] = []
        spec = {
            "port": self.port,
            "adminPort": self.admin_port,
            "extprocPort": self.extproc_port,
            "extprocTransport": "tcp",
            "extprocWorkers": WORKERS,
            "envoyConcurrency": 1,
        }
        local = {"apiVersion": "switchyard.dev/v1alpha1", "kind": "LocalGateway", "spec": spec}
        (directory / "gateway.yaml").write_text(yaml.safe_dump(local))
        self.write_policy(fault_policy(self.ports))
        for model in MODELS:
            self.start_upstream(model)
        paths = [str(directory)]
        self.gateway = LocalGateway(paths, load_inputs(paths), directory / "state", None)
        self._watcher = threading.Thread(target=self.gateway.watch, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> FaultGateway:
        try:
            self.gateway.start()
        except BaseException:
            self.stop()
            raise
        self._watcher.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        for process in [*self.replacements, *self.upstreams.values()]:
            _end(process)
        self.gateway.stop()
        if self._watcher.is_alive():
            self._watcher.join(timeout=5)
        # The ext_proc parent does not stop its other workers once one was killed (its SIGTERM
        # forwarding raises on the dead one), so stop them here.
        for pid in self.workers:
            _end_worker(pid)

    # Upstreams
    def start_upstream(self, model: str) -> None:
        port = self.ports[model]
        args = ["demo-upstream", "--name", model, "--port", str(port)]
        self.upstreams[model] = _spawn(args)
        wait_until(lambda: port_open("127.0.0.1", port), 30, f"upstream {model}")

    def kill_upstream(self, model: str) -> None:
        process = self.upstreams.pop(model)
        process.kill()
        process.wait(10)

    def set_faults(self, model: str, **faults: float) -> None:
        url = f"http://127.0.0.1:{self.ports[model]}/_demo/faults"
        httpx.post(url, json=faults, timeout=5).raise_for_status()

    # ext_proc workers
    def _worker_address(self, index: int) -> int:
        return self.extproc_port + index

    def kill_worker(self) -> int:
        """SIGKILL one ext_proc worker process; returns its index once its port refuses."""
        extproc = next(c for c in self.gateway.children if "extproc" in str(c.args))
        workers = _spawned_children(extproc.pid)
        assert len(workers) == WORKERS, workers
        self.workers = workers
        os.kill(workers[0], signal.SIGKILL)
        dead: list[int] = []

        def one_refuses() -> bool:
            dead[:] = [
                i for i in range(WORKERS) if not port_open("127.0.0.1", self._worker_address(i))
            ]
            return bool(dead)

        wait_until(one_refuses, 10, "the killed worker's port to refuse")
        return dead[0]

    def restart_worker(self, index: int) -> None:
        """A replacement worker on the dead one's address, from the same control plane."""
        port = self._worker_address(index)
        config = f"grpc://127.0.0.1:{self.gateway.control.port}"
        listen = f"127.0.0.1:{port}"
        self.replacements.append(
            _spawn(["extproc", "--config", config, "--listen", listen, "--workers", "1"])
        )
        wait_until(lambda: port_open("127.0.0.1", port), 60, "the replacement worker")

    # Control plane
    def stop_control_plane(self) -> None:
        """Stop the in-process control plane (Envoy and the workers keep their config)."""
        self.gateway.control.stop()

    def start_control_plane(self) -> float:
        """A new control plane on the old one's port; returns the seconds until Envoy and
        every worker have reconnected and ACKed the config."""
        started = time.monotonic()
        new = _PlaneAt(self.gateway.settings)
        new.start_at(self.gateway.config, self.gateway.control.port)
        self.gateway.control = new
        version = self.gateway.config.version
        wait_until(lambda: _all_acked(new, version), 60, "Envoy and the workers to reconnect")
        return time.monotonic() - started

    # Policy
    def write_policy(self, policy: dict[str, Any]) -> None:
        """Replace the policy file in one step, as an editor saving it does."""
        temporary = self.directory / "policy.tmp"
        temporary.write_text(yaml.safe_dump(policy))
        os.replace(temporary, self.directory / "policy.yaml")

    def edit_policy(self, policy: dict[str, Any]) -> None:
        """Write ``policy`` and wait until the runner has applied it."""
        before = self.gateway.config.version
        self.write_policy(policy)
        wait_until(lambda: self.gateway.config.version != before, 30, "the edit to apply")


def _all_acked(control: LocalControlPlane, version: str) -> bool:
    stream, ads = control.plane.stream, control.plane.ads
    envoy = list(ads.nodes.values())
    return (
        len(stream.acked) >= WORKERS
        and stream.acked_everywhere(version)
        and bool(envoy)
        and len(envoy[0].acked) >= 3
    )


def _spawn(args: list[str]) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "switchyard.cli", *args]
    return subprocess.Popen(command, cwd=REPO, start_new_session=True)


def _end(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _end_worker(pid: int) -> None:
    """SIGTERM ``pid`` if it is still a multiprocessing worker, then wait for it to go."""
    try:
        if b"spawn_main" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return
        os.kill(pid, signal.SIGTERM)
    except (OSError, ProcessLookupError):
        return
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), 10, f"worker {pid} to stop")


def _spawned_children(parent: int) -> list[int]:
    """The multiprocessing workers of ``parent``, oldest first."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        if ppid == parent and b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            found.append(int(entry.name))
    return sorted(found)
