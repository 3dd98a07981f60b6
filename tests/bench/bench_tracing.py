"""CPU per routed request of one ext_proc worker in process (HTTP/2 + processor + engine), with
tracing off, and on with Envoy's ``traceparent`` sampled or not. No Envoy, no sockets.

Envoy-like reads (a warm-HPACK header block, plus a ``traceparent`` literal when traced, and
one ProcessingRequest: the example policy's chat body with its path attribute) are fed to
``GrpcConnection.data_received``. Prints CPU µs per request (time.process_time: every thread,
so a traced round includes the span exporter's thread; each round ends with a flush).

    .venv/bin/python tests/bench/bench_tracing.py [--mode off|unsampled|sampled] \
        [--otlp-endpoint 127.0.0.1:4317]

To compare with another revision run it with PYTHONPATH pointing at that revision's tree
(``git archive REV extproc switchyard operator | tar -x -C DIR``) and ``--mode off``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import yaml
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

sys.path.insert(0, str(Path(__file__).parent))
from bench_h2grpc import FIRST_BLOCK, METHOD, PREFACE, WARM_BLOCK, Transport, frame

from switchyard.extproc.config import build_config
from switchyard.extproc.h2grpc import GrpcConnection
from switchyard.extproc.processor import Processor
from switchyard.extproc.scoring import HeuristicScorer
from switchyard.extproc.state import RuntimeState
from switchyard.operator.compiler import compile_config
from switchyard.operator.policy import parse_policy

REPO = Path(__file__).resolve().parents[2]


def state() -> RuntimeState:
    doc = yaml.safe_load((REPO / "examples" / "policy.yaml").read_text())
    config = build_config(compile_config([parse_policy(doc)], ""))
    runtime = RuntimeState(scorer_loader=lambda _bundle: HeuristicScorer())
    runtime.swap((config, {b: HeuristicScorer() for b in config.router_bundles}))
    return runtime


def message() -> bytes:
    body = {"model": "auto", "messages": [{"role": "user", "content": "Explain HTTP/2 " * 20}]}
    request = ep.ProcessingRequest(request_body=ep.HttpBody(body=orjson.dumps(body)))
    request.attributes["envoy.filters.http.ext_proc"].fields[
        "request.path"
    ].string_value = "/v1/chat/completions"
    payload = request.SerializeToString()
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


def _traceparent(i: int, flags: str) -> bytes:
    """A literal never indexed (RFC 7541 6.2.3): each request's value differs."""
    value = f"00-{i + 1:032x}-{i + 1:016x}-{flags}".encode()
    name = b"traceparent"
    return b"\x10" + bytes([len(name)]) + name + bytes([len(value)]) + value


def reads(requests: int, per_read: int, flags: str | None) -> list[bytes]:
    window = 256 * 1024 * 1024
    settings = frame(4, 0, 0, (4).to_bytes(2, "big") + window.to_bytes(4, "big"))
    out = [PREFACE + settings + frame(8, 0, 0, (window - 65535).to_bytes(4, "big"))]
    body = message()
    stream = 1
    for start in range(0, requests, per_read):
        chunk = bytearray()
        ids = []
        for _ in range(min(per_read, requests - start)):
            block = FIRST_BLOCK if stream == 1 else WARM_BLOCK
            if flags is not None:
                block += _traceparent(stream, flags)
            chunk += frame(1, 0x4, stream, block) + frame(0, 0, stream, body)
            ids.append(stream)
            stream += 2
        out.append(bytes(chunk))
        out.append(b"".join(frame(3, 0, i, bytes(4)) for i in ids))
    return out


def one_round(processor: Any, data: list[bytes], flush: Any) -> float:
    conn = GrpcConnection(METHOD, processor)
    transport = Transport()
    conn.connection_made(transport)
    start = time.process_time()
    for chunk in data:
        conn.data_received(chunk)
    flush()
    elapsed = time.process_time() - start
    assert transport.written > 0
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("off", "unsampled", "sampled"), default="off")
    parser.add_argument("--otlp-endpoint", default="", help="export spans here (else dropped)")
    parser.add_argument("--requests", type=int, default=5_000)
    parser.add_argument("--per-read", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    processor: Any = Processor(state())
    flush: Any = lambda: None  # noqa: E731
    exported: list[int] = []
    if args.mode != "off":
        from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

        from switchyard.extproc import tracing

        class Drop(SpanExporter):
            def export(self, spans: Any) -> SpanExportResult:
                exported.append(len(spans))
                return SpanExportResult.SUCCESS

        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": args.otlp_endpoint} if args.otlp_endpoint else {}
        tracer = tracing.from_environment(env, None if args.otlp_endpoint else Drop())
        assert tracer is not None
        processor = Processor(state(), tracer)
        flush = tracer.provider.force_flush
    flags = {"off": None, "unsampled": "00", "sampled": "01"}[args.mode]
    data = reads(args.requests, args.per_read, flags)

    async def run() -> list[float]:
        one_round(processor, data, flush)  # warm up
        return [one_round(processor, data, flush) / args.requests * 1e6 for _ in range(args.rounds)]

    per_request = asyncio.run(run())
    print(
        f"mode={args.mode} export={args.otlp_endpoint or 'dropped'}: {args.requests} requests, "
        f"{args.rounds} rounds: CPU µs per request min {min(per_request):.1f} "
        f"median {statistics.median(per_request):.1f}"
        + (f"; {sum(exported)} spans" if exported else "")
    )


if __name__ == "__main__":
    main()
