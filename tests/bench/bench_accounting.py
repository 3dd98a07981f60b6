"""CPU per ext_proc message of the processor alone (no HTTP/2, no sockets): the request's
decision, and the response chunks that now pass through it for usage accounting.

    .venv/bin/python tests/bench/bench_accounting.py [--rounds 5] [--messages 20000]

Prints the median and min CPU µs per message (time.process_time) of each kind over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import orjson
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from conftest import EXAMPLE
from test_processor import body_msg, headers_msg, state_for

from switchyard.extproc.processor import Processor
from switchyard.extproc.tally import TALLY
from switchyard.headers import EXTPROC_FILTER, SERVED_MODEL_ATTRIBUTE

CHAT = {
    "model": "auto",
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
}
CHUNK = (
    b"data: "
    + orjson.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "demo-light-8b",
            "choices": [{"index": 0, "delta": {"content": " Paris"}, "finish_reason": None}],
        }
    )
    + b"\n\n"
)
NULL_USAGE_CHUNK = CHUNK.replace(b'"choices"', b'"usage":null,"choices"')


def _response_chunk(body: bytes, end: bool, first: bool) -> bytes:
    message = ep.ProcessingRequest(response_body=ep.HttpBody(body=body, end_of_stream=end))
    if first:
        message.attributes[EXTPROC_FILTER].fields[SERVED_MODEL_ATTRIBUTE].string_value = "light"
    return message.SerializeToString()


async def _measure(kind: str, processor: Processor, count: int, stream_request: bool) -> float:
    headers = headers_msg().SerializeToString()
    request = {**CHAT, "stream": True} if stream_request else CHAT
    body = body_msg(orjson.dumps(request)).SerializeToString()
    chunk = _response_chunk(NULL_USAGE_CHUNK if stream_request else CHUNK, False, False)
    first = _response_chunk(CHUNK, False, True)
    streams = []
    for _ in range(count):
        stream = processor.open()
        await processor.message(stream, headers)
        streams.append(stream)
    start = time.process_time()
    if kind == "decision":
        for stream in streams:
            await processor.message(stream, body)
        return (time.process_time() - start) / count * 1e6
    for stream in streams:
        await processor.message(stream, body)
        await processor.message(stream, first)
    start = time.process_time()
    for stream in streams:
        await processor.message(stream, chunk)
    elapsed = time.process_time() - start
    for stream in streams:
        processor.closed(stream)
    return elapsed / count * 1e6


async def main(rounds: int, messages: int) -> None:
    import yaml

    processor = Processor(state_for(yaml.safe_load(EXAMPLE.read_text())))
    kinds: dict[str, tuple[str, bool]] = {
        "decision (request body)": ("decision", False),
        "response chunk, passed unchanged": ("chunk", False),
        "stream chunk, null usage stripped": ("chunk", True),
    }
    results: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(rounds):
        for name, (kind, streaming) in kinds.items():
            results[name].append(await _measure(kind, processor, messages, streaming))
        TALLY.flush()
    for name, values in results.items():
        print(f"{name:40s} median {statistics.median(values):6.1f} µs  min {min(values):6.1f} µs")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=20000)
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.messages))
