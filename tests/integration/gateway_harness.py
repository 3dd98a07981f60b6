"""Start the real local gateway (`switchyard up`: Envoy + ext_proc + demo upstreams) for tests."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from switchyard.local.ports import free_port_block

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_POLICY = REPO / "examples" / "policy.yaml"
DEMO_NAMES = ("demo-light", "demo-standard", "demo-capable")
_EOF = "\0eof"


@dataclass
class Gateway:
    """A running `switchyard up` and where to reach it."""

    directory: Path
    process: subprocess.Popen[str]
    port: int
    admin_port: int
    demo_ports: dict[str, int]
    output: list[str] = field(default_factory=list)
    _lines: queue.Queue[str] = field(default_factory=queue.Queue)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def policy_file(self) -> Path:
        return self.directory / "policy.yaml"

    def wait_for_output(self, text: str, timeout: float = 60) -> str:
        """Block until a line containing ``text`` is printed; return it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line == _EOF:
                break
            if text in line:
                return line
        raise AssertionError(f"no output line with {text!r}; got:\n{''.join(self.output)}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=30)


def _pump(gateway: Gateway) -> None:
    assert gateway.process.stdout is not None
    for line in gateway.process.stdout:
        gateway.output.append(line)
        gateway._lines.put(line)
    gateway._lines.put(_EOF)


def policy_for_ports(demo_ports: dict[str, int]) -> dict[str, Any]:
    """The example policy with its backends pointed at this run's demo upstream ports."""
    policy = yaml.safe_load(EXAMPLE_POLICY.read_text())
    for model, name in zip(policy["spec"]["models"], DEMO_NAMES, strict=True):
        model["backend"]["url"] = f"http://127.0.0.1:{demo_ports[name]}"
    return policy


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def url_model(name: str, port: int, prices: tuple[float, float], **extra: Any) -> dict[str, Any]:
    """A RoutePolicy model served at 127.0.0.1:``port`` as ``<name>-v1``, at ``prices``
    (input, output) USD per million tokens."""
    return {
        "name": name,
        "backend": {"url": f"http://127.0.0.1:{port}"},
        "upstreamModel": f"{name}-v1",
        "pricing": {"inputPer1M": prices[0], "outputPer1M": prices[1]},
        **extra,
    }


def start_gateway(
    directory: Path, policy: dict[str, Any] | None = None, **gateway_spec: Any
) -> Gateway:
    """Write a LocalGateway and a policy into ``directory`` and run `switchyard up`.

    Without ``policy``: the example policy, served by three demo upstreams.
    """
    first_demo = free_port_block(len(DEMO_NAMES))
    demo_ports = {name: first_demo + i for i, name in enumerate(DEMO_NAMES)}
    port, admin, extproc = free_port_block(), free_port_block(), free_port_block(2)
    spec = {
        "port": port,
        "adminPort": admin,
        "extprocPort": extproc,
        "extprocWorkers": 2,
        "envoyConcurrency": 1,
        "demoUpstreams": []
        if policy is not None
        else [{"name": n, "port": p} for n, p in demo_ports.items()],
        **gateway_spec,
    }
    local = {"apiVersion": "switchyard.dev/v1alpha1", "kind": "LocalGateway", "spec": spec}
    (directory / "gateway.yaml").write_text(yaml.safe_dump(local))
    (directory / "policy.yaml").write_text(yaml.safe_dump(policy or policy_for_ports(demo_ports)))
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "switchyard.cli",
            "up",
            "-f",
            str(directory),
            "--state-dir",
            str(directory / "state"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    gateway = Gateway(directory, process, port, admin, demo_ports)
    threading.Thread(target=_pump, args=(gateway,), daemon=True).start()
    try:
        gateway.wait_for_output("gateway on http://")
    except AssertionError:
        gateway.stop()
        raise
    return gateway
