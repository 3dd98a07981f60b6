"""Micro-benchmark: the server-side CPU that TLS adds per request on a long-lived connection,
the ext_proc worker's situation (Envoy keeps its HTTP/2 connections open, so handshakes are
amortised and the per-record cost is what remains). A uvloop server answers 600 bytes to each
700-byte message (about an ext_proc request and its reply) on 16 connections, plaintext and
TLS (the worker's own server context), in alternating rounds; prints the server's CPU µs per
request. Not a test. Run: python tests/bench/bench_tls_frames.py
"""

from __future__ import annotations

import asyncio
import multiprocessing
import ssl
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "infra"))

from certs import ThrowawayCA

from switchyard.tls import TlsFiles

REQUEST, REPLY = b"q" * 700, b"a" * 600
CONNECTIONS, PER_CONNECTION, ROUNDS = 16, 2000, 3


class Answer(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.pending = 0

    def data_received(self, data: bytes) -> None:
        self.pending += len(data)
        while self.pending >= len(REQUEST):
            self.pending -= len(REQUEST)
            self.transport.write(REPLY)  # type: ignore[attr-defined]


def serve(
    tls_dir: str | None,
    port: multiprocessing.Queue,
    asked: multiprocessing.Queue,
    cpu: multiprocessing.Queue,
) -> None:
    import uvloop

    async def main() -> None:
        context = TlsFiles.from_dir(tls_dir).server_context() if tls_dir else None
        server = await asyncio.get_running_loop().create_server(Answer, "127.0.0.1", 0, ssl=context)
        port.put(server.sockets[0].getsockname()[1])
        while True:  # each request for a CPU reading gets the process time so far
            await asyncio.to_thread(asked.get)
            cpu.put(time.process_time())

    uvloop.run(main())


async def client(port: int, files: TlsFiles | None) -> None:
    context = None
    if files is not None:
        context = ssl.create_default_context(cafile=str(files.ca))
        context.load_cert_chain(files.cert, files.key)
        context.set_alpn_protocols(["h2"])
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="localhost" if context else None
    )
    for _ in range(PER_CONNECTION):
        writer.write(REQUEST)
        await reader.readexactly(len(REPLY))
    writer.close()


def main() -> int:
    import uvloop

    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        tls_dir = ThrowawayCA.new().write_dir(Path(tmp) / "tls")
        files = TlsFiles.from_dir(tls_dir)
        servers = {}
        for name, directory in (("plaintext", None), ("tls", str(tls_dir))):
            port_q, asked_q, cpu_q = ctx.Queue(), ctx.Queue(), ctx.Queue()
            proc = ctx.Process(target=serve, args=(directory, port_q, asked_q, cpu_q), daemon=True)
            proc.start()
            servers[name] = (port_q.get(timeout=30), asked_q, cpu_q, proc)

        def cpu(name: str) -> float:
            servers[name][1].put(None)
            return float(servers[name][2].get(timeout=10))

        results: dict[str, list[float]] = {"plaintext": [], "tls": []}
        for _ in range(ROUNDS):
            for name in results:
                port = servers[name][0]
                tls = files if name == "tls" else None

                async def load(port: int = port, tls: TlsFiles | None = tls) -> None:
                    await asyncio.gather(*(client(port, tls) for _ in range(CONNECTIONS)))

                before = cpu(name)
                uvloop.run(load())
                used = cpu(name) - before
                results[name].append(1e6 * used / (CONNECTIONS * PER_CONNECTION))
        for *_, proc in servers.values():
            proc.kill()
    for name, values in results.items():
        print(f"{name:<10} server CPU µs/request: {', '.join(f'{v:.1f}' for v in values)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
