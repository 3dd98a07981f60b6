"""A local Jaeger for `switchyard up --jaeger`: the all-in-one binary (OTLP/gRPC receiver,
in-memory trace store, HTTP query API) on loopback ports, started before and stopped after the
gateway that exports to it.

The binary is not a Python dependency. It is ``$SWITCHYARD_JAEGER`` when set, else the one
``build_jaeger.sh`` (beside this file) built from the Go module proxy into the cache shared with
the project's other Go tools, building it first when missing (minutes, once; needs Go).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

from switchyard.local.ports import free_port_block

JAEGER_VERSION = "v1.76.0"  # build_jaeger.sh's default; the cache is stamped with it
BINARY_ENV = "SWITCHYARD_JAEGER"
CACHE_ENV = "SWITCHYARD_CACHE"
BUILD_SCRIPT = Path(__file__).with_name("build_jaeger.sh")
STATE_FILE = "jaeger.json"
"""In the state directory while a gateway's Jaeger runs: its query URL and OTLP endpoint, so
that `switchyard traces` finds it."""
MAX_TRACES = 10000
_PLACEHOLDER = b"This is not the Jaeger UI"


class JaegerUnavailable(RuntimeError):
    """No Jaeger binary, and none can be built here."""


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "switchyard") / "bin"


def cached_binary() -> Path | None:
    """The cache's Jaeger when it is the pinned version."""
    binary, stamp = cache_dir() / "jaeger", cache_dir() / ".jaeger.version"
    try:
        fresh = stamp.read_text().strip() == JAEGER_VERSION
    except OSError:
        return None
    return binary if fresh and os.access(binary, os.X_OK) else None


GO_FALLBACKS: tuple[str, ...] = ("/usr/local/go/bin/go",)
"""Where Go's own installer puts it, when ``go`` is not on PATH."""


def _go() -> str | None:
    """The go command: ``$GO``, else ``go`` on PATH, else a usual install location."""
    named = os.environ.get("GO")
    if named:
        return named if os.access(named, os.X_OK) else None
    found = shutil.which("go")
    if found:
        return found
    return next((path for path in GO_FALLBACKS if os.access(path, os.X_OK)), None)


def jaeger_binary(say: Callable[[str], None]) -> str:
    """``$SWITCHYARD_JAEGER``, the cached build, or a new build (``say`` tells a person it takes
    minutes); JaegerUnavailable when none of them can be had."""
    named = os.environ.get(BINARY_ENV)
    if named:
        if not os.access(named, os.X_OK):
            raise JaegerUnavailable(f"{BINARY_ENV}={named}: not an executable file")
        return named
    cached = cached_binary()
    if cached is not None:
        return str(cached)
    go = _go()
    if go is None:
        raise JaegerUnavailable(
            f"Jaeger {JAEGER_VERSION} is not built yet and building it needs Go "
            f"(https://go.dev/dl), which is not installed; install Go, or set {BINARY_ENV} "
            "to a jaeger binary (v2 all-in-one)"
        )
    say(
        f"building Jaeger {JAEGER_VERSION} from the Go module proxy into {cache_dir()} "
        "(once; this takes several minutes)"
    )
    built = subprocess.run(
        ["bash", str(BUILD_SCRIPT)],
        stdout=subprocess.PIPE,
        stderr=None,  # the build's progress goes to the person's terminal
        text=True,
        env={**os.environ, "GO": go, "JAEGER_VERSION": JAEGER_VERSION},
        check=False,
    )
    lines = built.stdout.strip().splitlines()
    if built.returncode != 0 or not lines or not os.access(lines[-1], os.X_OK):
        raise JaegerUnavailable(f"building Jaeger failed: {BUILD_SCRIPT} exited {built.returncode}")
    return lines[-1]


@dataclass(frozen=True)
class JaegerPorts:
    """Loopback ports: OTLP/gRPC in, the HTTP query API (and UI), the query gRPC API."""

    otlp: int
    query: int
    query_grpc: int

    @classmethod
    def pick(cls, query: int = 0) -> JaegerPorts:
        """Free ports; ``query`` fixes the query port (0: a free one too)."""
        first = free_port_block(3 if query == 0 else 2)
        if query == 0:
            return cls(first, first + 1, first + 2)
        return cls(first, query, first + 1)


def config(ports: JaegerPorts, host: str = "127.0.0.1", max_traces: int = MAX_TRACES) -> Any:
    """The all-in-one's config: OTLP/gRPC into an in-memory store (the newest ``max_traces``
    traces), the query API over it; warnings only, no self-metrics."""
    return {
        "service": {
            "extensions": ["jaeger_storage", "jaeger_query"],
            "pipelines": {
                "traces": {"receivers": ["otlp"], "exporters": ["jaeger_storage_exporter"]}
            },
            "telemetry": {"metrics": {"level": "none"}, "logs": {"level": "warn"}},
        },
        "extensions": {
            "jaeger_storage": {"backends": {"memstore": {"memory": {"max_traces": max_traces}}}},
            "jaeger_query": {
                "storage": {"traces": "memstore"},
                "http": {"endpoint": f"{host}:{ports.query}"},
                "grpc": {"endpoint": f"{host}:{ports.query_grpc}"},
            },
        },
        "receivers": {"otlp": {"protocols": {"grpc": {"endpoint": f"{host}:{ports.otlp}"}}}},
        "exporters": {"jaeger_storage_exporter": {"trace_storage": "memstore"}},
    }


class LocalJaeger:
    """One Jaeger process with its config and log in ``directory``; while it runs,
    ``state_file`` (if given) records where it is for `switchyard traces`."""

    def __init__(self, directory: Path, ports: JaegerPorts, state_file: Path | None = None) -> None:
        self.directory = directory
        self.ports = ports
        self.state_file = state_file
        self.log_path = directory / "jaeger.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        """The HTTP query API (and UI) base URL."""
        return f"http://127.0.0.1:{self.ports.query}"

    @property
    def otlp_endpoint(self) -> str:
        return f"127.0.0.1:{self.ports.otlp}"

    def start(self, binary: str) -> None:
        """Write the config and start ``binary`` in a session of its own (a Ctrl-C meant for
        the gateway must not stop it before the gateway's last spans are in)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / "jaeger.yaml"
        path.write_text(yaml.safe_dump(config(self.ports)))
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [binary, "--config", f"file:{path}"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if self.state_file is not None:
            record = {"url": self.url, "otlpEndpoint": self.otlp_endpoint}
            self.state_file.write_text(json.dumps(record))

    def exited(self) -> int | None:
        """The exit status once the process has ended, else None."""
        return None if self.process is None else self.process.poll()

    def ready(self) -> bool:
        """Whether the query API answers (the receiver starts before it)."""
        try:
            with urllib.request.urlopen(f"{self.url}/api/services", timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def has_ui(self) -> bool:
        """Whether the binary carries the web UI (a build from the Go module proxy serves a
        placeholder page instead: the UI's assets are built from another repository)."""
        try:
            with urllib.request.urlopen(f"{self.url}/", timeout=2) as response:
                return _PLACEHOLDER not in response.read(65536)
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, lines: int = 10) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the process and remove the state file."""
        if self.state_file is not None:
            self.state_file.unlink(missing_ok=True)
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


def running_url(state_dir: Path) -> str | None:
    """The query URL of the Jaeger a `switchyard up` with this state directory runs, if any."""
    try:
        recorded = json.loads((state_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    url = recorded.get("url") if isinstance(recorded, dict) else None
    return url if isinstance(url, str) else None


def say(message: str) -> None:
    print(f"switchyard: {message}", file=sys.stderr, flush=True)
