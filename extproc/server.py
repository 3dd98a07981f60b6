"""The ext_proc server: worker processes, each serving ext_proc on its own port.

Each worker runs the minimal HTTP/2 gRPC server of ``h2grpc`` on uvloop; Envoy balances
streams across the workers' ports. Each worker raises its flag in a shared ``WorkerReadiness``
once it serves with a routing config, which the metrics port's ``/readyz`` reports. The parent
restarts a worker that dies on the same address (``supervisor.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import signal
import socket
import ssl
import threading
import weakref
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from switchyard.api.v1 import routing_pb2 as pb
from switchyard.extproc import recording, shadow, tracing
from switchyard.extproc.config_client import ConfigStreamClient
from switchyard.extproc.h2grpc import GrpcConnection
from switchyard.extproc.health import ReadyFlag, WorkerReadiness
from switchyard.extproc.metrics import MetricsServer
from switchyard.extproc.processor import Processor
from switchyard.extproc.state import RuntimeState
from switchyard.extproc.supervisor import Supervisor
from switchyard.extproc.tally import TALLY
from switchyard.tls import TlsFiles

log = logging.getLogger(__name__)

POLL_SECONDS = 0.1
TLS_POLL_SECONDS = 30.0
# A peer gets this long to finish its TLS handshake (a stalled one holds a socket meanwhile).
TLS_HANDSHAKE_TIMEOUT_S = 10.0


PROCESS_METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"


class ConfigFileWatcher:
    """Loads a serialized RoutingConfig file and reloads it when it changes.

    Reading, parsing and scorer loading run on a thread; the swap runs on the event loop.
    A file that fails to parse is logged and ignored: the last good config keeps serving.
    ``on_load`` runs (on the watcher's thread) after each config that went live.
    """

    def __init__(self, path: Path, state: RuntimeState, loop: asyncio.AbstractEventLoop) -> None:
        self.path = path
        self.state = state
        self.loop = loop
        self.loaded = False
        self.on_load: Callable[[], None] | None = None
        self._seen: tuple[int, int] | None = None
        self._stop = threading.Event()

    def load_once(self) -> bool:
        """Apply the file if it changed since the last call; True when a new config went live."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return False
        signature = (stat.st_mtime_ns, stat.st_size)
        if signature == self._seen:
            return False
        self._seen = signature
        try:
            proto = pb.RoutingConfig.FromString(self.path.read_bytes())
            prepared = self.state.prepare(proto)
        except Exception:
            log.exception("ignoring unreadable routing config %s", self.path)
            return False
        done = asyncio.run_coroutine_threadsafe(self._swap(prepared), self.loop)
        done.result()
        self.loaded = True
        if self.on_load is not None:
            self.on_load()
        return True

    async def _swap(self, prepared: tuple[object, ...]) -> None:
        self.state.swap(prepared)  # type: ignore[arg-type]

    def run(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            self.load_once()

    def start(self) -> None:
        threading.Thread(target=self.run, name="config-watcher", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()


def replica_id() -> str:
    """This worker's name on the config stream (ACKs, operator metrics): unique across pods,
    whose process ids repeat."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}/{os.getpid()}"


async def serve(
    config_source: str,
    listen: str,
    ready: threading.Event | None = None,
    execution_provider: str = "cpu",
    configured: Callable[[], None] | None = None,
    tls: TlsFiles | None = None,
) -> None:
    """Run one worker until signalled. ``config_source``: a routing.pb file, or
    ``grpc://host:port`` of the control plane's config stream. ``ready`` is set once the worker
    listens; ``configured`` is called once it listens with a routing config loaded. With
    ``tls`` the worker serves mTLS (client certificate required) and uses it for the stream."""
    loop = asyncio.get_running_loop()
    state = RuntimeState(execution_provider=execution_provider)
    background: list[asyncio.Task[None]] = []
    watcher: ConfigFileWatcher | None = None
    if config_source.startswith("grpc://"):
        client = ConfigStreamClient(config_source.removeprefix("grpc://"), replica_id(), state, tls)
        background.append(asyncio.create_task(client.run()))
        # Serve only once a config is loaded, so no request meets an empty table.
        await client.first_config.wait()
    else:
        watcher = ConfigFileWatcher(Path(config_source), state, loop)
        await asyncio.to_thread(watcher.load_once)
    tracer = tracing.from_environment()  # None unless OTEL_EXPORTER_OTLP_ENDPOINT is set
    recorder = recording.from_environment()  # None unless SWITCHYARD_OUTCOMES_DIR is set
    if recorder is not None:
        recorder.start()
    # None unless recording and SWITCHYARD_GATEWAY_URL are set
    evaluator = shadow.from_environment(recorder)
    processor = Processor(state, tracer, recorder, evaluator)
    connections: weakref.WeakSet[GrpcConnection] = weakref.WeakSet()

    def connection() -> GrpcConnection:
        conn = GrpcConnection(PROCESS_METHOD, processor)
        connections.add(conn)
        return conn

    secure: dict[str, Any] = {}
    if tls is not None:
        context = tls.server_context()
        secure = {"ssl": context, "ssl_handshake_timeout": TLS_HANDSHAKE_TIMEOUT_S}
        background.append(asyncio.create_task(_reload_tls(tls, context)))
    if listen.startswith("unix:"):
        path = Path(listen.removeprefix("unix:"))
        path.unlink(missing_ok=True)  # left by a worker that was killed
        server = await loop.create_unix_server(connection, str(path), **secure)
    else:
        host, _, port = listen.rpartition(":")
        server = await loop.create_server(connection, host.strip("[]"), int(port), **secure)
    log.info("ext_proc worker %d serving on %s", os.getpid(), listen)
    # What start-up loaded (router sessions, tokenizers, protobuf descriptors: about 80k
    # objects) lives as long as the worker. Frozen, it is out of the collector's sight: a full
    # collection under load then stops the event loop for about 6 ms instead of about 40.
    gc.collect()
    gc.freeze()
    TALLY.start(loop)
    if ready is not None:
        ready.set()
    if watcher is not None:
        watcher.on_load = configured  # the file may appear later
        if watcher.loaded and configured is not None:
            configured()
        watcher.start()
    elif configured is not None:
        configured()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if watcher is not None:
        watcher.stop()
    for task in background:
        task.cancel()
    server.close()
    for conn in connections:
        conn.goaway()
    await asyncio.sleep(0.2)  # let in-flight streams answer
    with contextlib.suppress(TimeoutError):  # the last settlements of budgets and rate limits
        await asyncio.wait_for(processor.limiter.drain(), 1.0)
    TALLY.stop()
    if evaluator is not None:
        await evaluator.close()  # evaluations in flight are dropped
    if recorder is not None:
        await asyncio.to_thread(recorder.stop)  # write what is queued
    if tracer is not None:
        await asyncio.to_thread(tracer.shutdown)  # export the spans still queued


async def _reload_tls(tls: TlsFiles, context: ssl.SSLContext) -> None:
    """Load renewed certificate files into ``context`` (new handshakes use them); the
    connections Envoy holds keep theirs."""
    seen = await asyncio.to_thread(tls.signature)
    while True:
        await asyncio.sleep(TLS_POLL_SECONDS)
        try:
            signature = await asyncio.to_thread(tls.signature)
            if signature != seen:
                tls.load(context)
                seen = signature
                log.info("TLS certificate reloaded from %s", tls.cert.parent)
        except (OSError, ssl.SSLError) as error:  # mid-rotation: keep the last good one
            log.warning("keeping the current TLS certificate: %s", error)


def _worker(config_path: str, listen: str, execution_provider: str, flag: ReadyFlag) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s extproc %(message)s")
    import uvloop

    # TLS comes through the environment (the CLI sets it) so worker supervision passes nothing.
    tls = TlsFiles.from_environment()
    uvloop.run(serve(config_path, listen, None, execution_provider, flag.set, tls))


def worker_addresses(listen: str, workers: int) -> list[str]:
    """Each worker's address: consecutive ports from host:port, or ``unix:PATH.<i>``."""
    if listen.startswith("unix:"):
        return [f"{listen}.{i}" for i in range(workers)]
    host, _, port = listen.rpartition(":")
    return [f"{host}:{int(port) + i}" for i in range(workers)]


def run_workers(
    config_path: str,
    listen: str,
    workers: int,
    metrics_port: int = 0,
    execution_provider: str = "cpu",
) -> int:
    """Start ``workers`` processes, restart any that dies (``supervisor.py``), and stop them
    all on SIGINT/SIGTERM. One worker runs in this process (nothing restarts it). A
    ``metrics_port`` serves Prometheus metrics of all workers and the /healthz and /readyz
    probes. Router bundles load on ``execution_provider`` (auto, cpu, cuda)."""
    ctx = multiprocessing.get_context("spawn")
    readiness = WorkerReadiness(max(workers, 1), ctx)
    metrics = None
    if metrics_port:
        metrics = MetricsServer(
            metrics_port, workers=workers, alive=readiness.not_alive, ready=readiness.not_ready
        )
        metrics.start()
    try:
        return _run(config_path, listen, workers, execution_provider, readiness, metrics)
    finally:
        if metrics is not None:
            metrics.close()


def _run(
    config_path: str,
    listen: str,
    workers: int,
    execution_provider: str,
    readiness: WorkerReadiness,
    metrics: MetricsServer | None,
) -> int:
    if workers <= 1:
        _worker(config_path, worker_addresses(listen, 1)[0], execution_provider, readiness.flag(0))
        return 0
    ctx = multiprocessing.get_context("spawn")
    addresses = worker_addresses(listen, workers)

    def spawn(index: int) -> BaseProcess:
        args = (config_path, addresses[index], execution_provider, readiness.flag(index))
        return ctx.Process(target=_worker, args=args, daemon=False)

    exited = metrics.worker_exited if metrics is not None else (lambda _pid: None)
    return Supervisor(workers, spawn, readiness, exited).run()
