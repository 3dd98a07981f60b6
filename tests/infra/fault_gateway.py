"""The local gateway with handles to break it: `switchyard up`'s own LocalGateway, run in this
process (so its in-process control plane can be restarted), with demo upstreams this process
starts, kills and reconfigures (POST /_demo/faults).

Three interchangeable models, each the others' fallback, so every single fault has a healthy
fallback: ``fast`` (the default of ``auto``), ``steady`` and ``spare``. A per-try timeout makes a
slow upstream fail over too. The ext_proc workers listen on TCP, each on its own port; a killed
worker is started again there by the ext_proc's parent.
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
        self.kills: list[float] = []  # when each ext_proc worker was killed (monotonic)
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
        for process in self.upstreams.values():
            _end(process)
        self.gateway.stop()
        if self._watcher.is_alive():
            self._watcher.join(timeout=5)

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
    def kill_worker(self, index: int) -> None:
        """SIGKILL ext_proc worker ``index``; returns once its parent has started a new worker
        that listens on the same port (it listens only once it has a routing config)."""
        port = self.extproc_port + index
        extproc = next(c for c in self.gateway.children if "extproc" in str(c.args))
        workers = _spawned_children(extproc.pid)
        assert len(workers) == WORKERS, workers
        victim = _listening_pid(port, workers)
        assert victim is not None, f"no worker listens on {port}"
        self.kills.append(time.monotonic())
        os.kill(victim, signal.SIGKILL)

        def replaced() -> bool:
            now = [pid for pid in _spawned_children(extproc.pid) if pid != victim]
            return len(now) == WORKERS and _listening_pid(port, now) not in (None, victim)

        wait_until(replaced, 60, f"the parent to restart ext_proc worker {index}")

    def extproc_stats(self) -> dict[str, int]:
        """Envoy's counters of the ext_proc cluster that tell how dead workers were avoided:
        retries, refused connections, outlier ejections, health checks."""
        url = f"http://127.0.0.1:{self.admin_port}/stats?filter=^cluster.switchyard_extproc."
        wanted = (
            "upstream_rq_retry", "upstream_cx_connect_fail", "upstream_rq_total",
            "ejections_enforced_total", "health_check.failure", "health_check.attempt",
        )  # fmt: skip
        stats = {}
        for line in httpx.get(url, timeout=5).text.splitlines():
            name, _, value = line.partition(": ")
            short = name.removeprefix("cluster.switchyard_extproc.")
            if value.isdigit() and any(short.endswith(w) or w in short for w in wanted):
                stats[short] = int(value)
        return stats

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


def _listening_pid(port: int, pids: list[int]) -> int | None:
    """Which of ``pids`` listens on TCP ``port`` (127.0.0.1), if one does."""
    sockets = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rpartition(":")[2], 16) == port:  # 0A: LISTEN
                sockets.add(f"socket:[{inode}]")
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) in sockets:
                    return pid
            except OSError:
                continue
    return None


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
