"""CPU per ext_proc request of the whole worker path in process: HTTP/2 server, Processor,
engine and the real router, no Envoy and no sockets. Not a test.

    PYTHONPATH=/tmp/before .venv/bin/python tests/bench/bench_extproc_inprocess.py
    PYTHONPATH=$PWD        .venv/bin/python tests/bench/bench_extproc_inprocess.py

Envoy-like bytes (as ``bench_h2grpc.py`` builds them: a warm HPACK block, one message, the
RST_STREAM Envoy sends after our trailers) carry a real ProcessingRequest: the benchmark's chat
completion as the body, the path attribute, for a classifier policy on ``builtin:default``; then
the answer's body (one chunk, the status and serving model as attributes), read for its usage.
``--per-read`` requests arrive per socket read, so the router batches as under load. Prints
the CPU µs per request (time.process_time) of several rounds, min and median. It uses only
what the ext_proc had before the HTTP/2 server was split (``GrpcConnection(method, handler)``,
``Processor(state)``), so the same command measures an older tree on PYTHONPATH; alternate
trees, a few runs each, to compare them.

``--record decisions|prompts`` turns request recording on (``spec.outcomes``; the message then
carries an ``x-request-id`` attribute, as Envoy sends it) and reports, beside the event loop's
CPU per request, the writer's CPU per record (run here after each round, not on its thread).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_gateway import COMPLETION, PROMPT
from bench_h2grpc import METHOD, PREFACE, _indexed_literal, frame
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from switchyard.extproc import h2grpc
from switchyard.extproc.processor import Processor
from switchyard.extproc.state import RuntimeState
from switchyard.headers import EXTPROC_FILTER, SERVED_MODEL_ATTRIBUTE, STATUS_ATTRIBUTE
from switchyard.operator.compiler import compile_config
from switchyard.operator.policy import parse_policy

_FIELDS = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", METHOD.encode()),
    (b":authority", b"switchyard_extproc"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
    (b"x-envoy-internal", b"true"),
    (b"x-forwarded-for", b"192.0.2.2"),
    (b"x-envoy-expected-rq-timeout-ms", b"500"),
]
FIRST_BLOCK = b"".join(_indexed_literal(n, v) for n, v in _FIELDS)
WARM_BLOCK = bytes(0x80 | (62 + i) for i in reversed(range(len(_FIELDS))))


def policy(record: str = "none") -> dict[str, object]:
    """bench_gateway's classifier policy: three tiers on ``builtin:default``."""
    models, tiers = [], []
    for i, (name, price) in enumerate([("light", 0.1), ("standard", 1.0), ("capable", 10.0)]):
        models.append(
            {
                "name": name,
                "backend": {"url": "http://127.0.0.1:9"},
                "upstreamModel": f"bench-{name}",
                "pricing": {"inputPer1M": price, "outputPer1M": price * 4},
                "contextWindow": 128000,
            }
        )
        tiers.append({"model": name, **({"maxDifficulty": 0.35 * (i + 1)} if i < 2 else {})})
    strategy = {"type": "classifier", "tiers": tiers, "router": {"bundle": "builtin:default"}}
    return {
        "apiVersion": "switchyard.dev/v1alpha1",
        "kind": "RoutePolicy",
        "metadata": {"name": "bench", "namespace": "default"},
        "spec": {
            "match": {"models": ["auto"]},
            "models": models,
            "strategy": strategy,
            **({"outcomes": {"record": record}} if record != "none" else {}),
        },
    }


def grpc_message(request_id: bool = False) -> bytes:
    body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": PROMPT}]})
    request = ep.ProcessingRequest(request_body=ep.HttpBody(body=body.encode(), end_of_stream=True))
    attributes = {"request.path": "/v1/chat/completions"}
    if request_id:
        attributes["request.headers['x-request-id']"] = "3f2b8c1e-7d4a-4e0b-9a51-0c6f2d9e8b17"
    request.attributes["envoy.filters.http.ext_proc"].update(attributes)
    raw: bytes = request.SerializeToString()
    return b"\x00" + len(raw).to_bytes(4, "big") + raw


def response_message() -> bytes:
    """The response body as Envoy streams it: one chunk, the end of the stream, and the
    status and the serving model as attributes."""
    body = json.dumps(COMPLETION).encode()
    request = ep.ProcessingRequest(response_body=ep.HttpBody(body=body, end_of_stream=True))
    attributes = request.attributes[EXTPROC_FILTER]
    attributes.fields[STATUS_ATTRIBUTE].number_value = 200
    attributes.fields[SERVED_MODEL_ATTRIBUTE].string_value = "light"
    raw: bytes = request.SerializeToString()
    return b"\x00" + len(raw).to_bytes(4, "big") + raw


RESPONSE = response_message()


def reads(requests: int, per_read: int, message: bytes) -> list[bytes]:
    window = 256 * 1024 * 1024
    settings = frame(4, 0, 0, (4).to_bytes(2, "big") + window.to_bytes(4, "big"))
    out = [PREFACE + settings + frame(8, 0, 0, (window - 65535).to_bytes(4, "big"))]
    stream = 1
    for start in range(0, requests, per_read):
        chunk, ids = bytearray(), []
        for _ in range(min(per_read, requests - start)):
            block = FIRST_BLOCK if stream == 1 else WARM_BLOCK
            chunk += frame(1, 0x4, stream, block) + frame(0, 0, stream, message)
            ids.append(stream)
            stream += 2
        out.append(bytes(chunk))
        # each routed stream's answer (usage accounting), then Envoy's end of the stream
        out.append(b"".join(frame(0, 0, i, RESPONSE) for i in ids))
        out.append(b"".join(frame(3, 0, i, bytes(4)) for i in ids))
    return out


class Transport(asyncio.Transport):
    """Counts what is written; remembers whether a routing answer (a model id) came back."""

    def __init__(self) -> None:
        super().__init__()
        self.written = 0
        self.routed = False

    def write(self, data: Any) -> None:
        self.written += len(data)
        self.routed = self.routed or b"bench-" in bytes(data)

    def close(self) -> None:
        pass


def one_round(
    state: RuntimeState, data: list[bytes], requests: int, recorder: Any = None
) -> tuple[float, float]:
    """(event-loop CPU µs per request, writer CPU µs per record)."""
    processor = Processor(state) if recorder is None else Processor(state, recorder=recorder)
    conn = h2grpc.GrpcConnection(METHOD, processor)
    transport = Transport()
    conn.connection_made(transport)
    start = time.process_time()
    for chunk in data:
        conn.data_received(chunk)
    elapsed = time.process_time() - start
    assert transport.routed, "no routing answer came back"
    written = 0.0
    if recorder is not None:
        start = time.process_time()
        recorder.flush()
        written = time.process_time() - start
    return elapsed / requests * 1e6, written / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--per-read", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--record", choices=("none", "decisions", "prompts"), default="none")
    args = parser.parse_args()
    state = RuntimeState()
    state.swap(state.prepare(compile_config([parse_policy(policy(args.record))])))
    data = reads(args.requests, args.per_read, grpc_message(args.record != "none"))
    with tempfile.TemporaryDirectory() as directory:
        recorder = None
        if args.record != "none":
            from switchyard.extproc.recording import Recorder

            recorder = Recorder(Path(directory), replica="bench")
        one_round(state, data, args.requests, recorder)  # warm up
        rounds = [one_round(state, data, args.requests, recorder) for _ in range(args.rounds)]
    loop = [r[0] for r in rounds]
    print(
        f"{h2grpc.__file__}: {args.requests} requests, {args.per_read} per read, record "
        f"{args.record}: CPU µs per request min {min(loop):.1f} median "
        f"{statistics.median(loop):.1f}"
        + (
            f"; writer µs per record median {statistics.median(r[1] for r in rounds):.1f}"
            if recorder is not None
            else ""
        )
    )


if __name__ == "__main__":
    main()
