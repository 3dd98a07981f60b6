"""CPU per ext_proc request of the HTTP/2 server alone, in process (no Envoy, no sockets).

Envoy-like request bytes (a warm-HPACK header block, one gRPC message of about 1 KB, then the
RST_STREAM Envoy sends once our trailers end the call) are fed to
``GrpcConnection.data_received`` with a fake transport and a handler that answers at once.
Prints the CPU µs per request (time.process_time) of several rounds: min and median.

    .venv/bin/python tests/bench/bench_h2grpc.py [--module /path/to/old/h2grpc.py]

``--module`` loads ``GrpcConnection`` from another copy of h2grpc.py, to compare versions.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import struct
import time
from typing import Any

METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_HEADER = struct.Struct(">HBBBI")


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    size = len(payload)
    return _HEADER.pack(size >> 8, size & 0xFF, kind, flags, stream_id) + payload


def _indexed_literal(name: bytes, value: bytes) -> bytes:
    """Literal with incremental indexing, new name (RFC 7541 6.2.1), short strings."""
    return b"\x40" + bytes([len(name)]) + name + bytes([len(value)]) + value


# What Envoy sends: the first block fills the dynamic table, later ones only index it.
_FIELDS = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", METHOD.encode()),
    (b":authority", b"extproc"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
    (b"x-envoy-internal", b"true"),
    (b"x-forwarded-for", b"10.0.0.1"),
]
FIRST_BLOCK = b"".join(_indexed_literal(n, v) for n, v in _FIELDS)
WARM_BLOCK = bytes(0x80 | (62 + i) for i in reversed(range(len(_FIELDS))))
MESSAGE = b"\x00" + (1000).to_bytes(4, "big") + b"x" * 1000


class Handler:
    def open(self) -> None:
        return None

    async def message(self, _: None, payload: bytes) -> tuple[bytes, bool]:
        return b"r" * 200, True


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = 0

    def write(self, data: Any) -> None:
        self.written += len(data)

    def close(self) -> None:
        pass


def reads(requests: int, per_read: int) -> list[bytes]:
    """The client's reads: per_read requests each, then RST_STREAM of the answered ones."""
    window = 256 * 1024 * 1024  # Envoy's default stream and connection windows
    settings = frame(4, 0, 0, (4).to_bytes(2, "big") + window.to_bytes(4, "big"))
    out = [PREFACE + settings + frame(8, 0, 0, (window - 65535).to_bytes(4, "big"))]
    stream = 1
    for start in range(0, requests, per_read):
        chunk = bytearray()
        ids = []
        for _ in range(min(per_read, requests - start)):
            block = FIRST_BLOCK if stream == 1 else WARM_BLOCK
            chunk += frame(1, 0x4, stream, block) + frame(0, 0, stream, MESSAGE)
            ids.append(stream)
            stream += 2
        out.append(bytes(chunk))
        out.append(b"".join(frame(3, 0, i, bytes(4)) for i in ids))
    return out


def one_round(module: Any, data: list[bytes]) -> float:
    conn = module.GrpcConnection(METHOD, Handler())
    transport = Transport()
    conn.connection_made(transport)
    start = time.process_time()
    for chunk in data:
        conn.data_received(chunk)
    elapsed = time.process_time() - start
    assert transport.written > 0
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--module", help="path of an h2grpc.py to measure instead")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--per-read", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    if args.module:
        spec = importlib.util.spec_from_file_location("h2grpc_under_test", args.module)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        from switchyard.extproc import h2grpc as module  # type: ignore[no-redef]
    data = reads(args.requests, args.per_read)
    one_round(module, data)  # warm up
    per_request = [one_round(module, data) / args.requests * 1e6 for _ in range(args.rounds)]
    print(
        f"{args.module or 'switchyard.extproc.h2grpc'}: {args.requests} requests, "
        f"{args.per_read} per read, {args.rounds} rounds: CPU µs per request "
        f"min {min(per_request):.2f} median {statistics.median(per_request):.2f}"
    )


if __name__ == "__main__":
    main()
