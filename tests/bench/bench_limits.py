"""What budgets and rate limits cost an ext_proc request, in process (Processor, engine, store;
no Envoy): CPU µs per request (time.process_time) and wall µs, routed and then answered (so
the settlement runs), for: no client keys; client keys without limits; limits counted in the
worker's memory; limits in a local redis-server (Unix socket); one request at a time and
32 at a time (admissions and settlements then share store calls). Not a test.

    PYTHONPATH=$PWD .venv/bin/python tests/bench/bench_limits.py
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import uvloop
import yaml
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2

from switchyard.extproc.config import build_config
from switchyard.extproc.processor import Processor
from switchyard.extproc.scoring import HeuristicScorer
from switchyard.extproc.state import RuntimeState
from switchyard.headers import EXTPROC_FILTER
from switchyard.local.redis import LocalRedis
from switchyard.operator.clientkeys import (
    compile_client_keys,
    compile_store,
    compile_tenant_limits,
    hash_key,
    parse_client_keys,
)
from switchyard.operator.compiler import compile_config
from switchyard.operator.policy import parse_policy

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "policy.yaml"
KEY = "sk-switchyard-bench-0123456789"
LIMITS = {
    "requestsPerMinute": 10**9,
    "tokensPerMinute": 10**12,
    "budgets": [{"usd": 1e9, "period": "day"}],
}


def state(keys: bool, limits: bool, redis_url: str = "") -> RuntimeState:
    tenant: dict[str, Any] = {"name": "team"}
    if limits:
        tenant["limits"] = LIMITS
    spec: dict[str, Any] = {
        "tenants": [tenant],
        "keys": [{"name": "k", "tenant": "team", "sha256": hash_key(KEY)}],
    }
    if redis_url:
        spec["store"] = {"redisUrl": redis_url, "timeoutMs": 1000}
    doc = {"apiVersion": "switchyard.dev/v1alpha1", "kind": "ClientKeys", "spec": spec}
    parsed = parse_client_keys(doc, "bench")
    policy = parse_policy(yaml.safe_load(EXAMPLE.read_text()))
    config = build_config(
        compile_config(
            [policy],
            client_keys=compile_client_keys([parsed]) if keys else None,
            tenant_limits=compile_tenant_limits([parsed]),
            limit_store=compile_store([parsed]),
        )
    )
    runtime = RuntimeState(scorer_loader=lambda _bundle: HeuristicScorer())
    runtime.swap((config, {b: HeuristicScorer() for b in config.router_bundles}))
    return runtime


def messages() -> tuple[bytes, bytes]:
    body = orjson.dumps(
        {"model": "auto", "messages": [{"role": "user", "content": "What is 2 + 2?"}]}
    )
    attributes = struct_pb2.Struct()
    attributes.update({"request.path": "/v1/chat/completions", "request.headers['x-api-key']": KEY})
    request = ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=True))
    request.attributes[EXTPROC_FILTER].CopyFrom(attributes)
    answer = orjson.dumps({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 30}})
    response = ep.ProcessingRequest(response_body=ep.HttpBody(body=answer, end_of_stream=True))
    codes = struct_pb2.Struct()
    codes.update({"response.code": 200.0})
    response.attributes[EXTPROC_FILTER].CopyFrom(codes)
    return request.SerializeToString(), response.SerializeToString()


async def rounds(
    processor: Processor, count: int, repeat: int, concurrency: int
) -> tuple[list[float], list[float]]:
    request, response = messages()
    cpu, wall = [], []

    async def client(share: int) -> None:
        for _ in range(share):
            stream = processor.open()
            await processor.message(stream, request)
            await processor.message(stream, response)

    for _ in range(repeat + 1):  # the first round warms up
        started_cpu, started = time.process_time(), time.perf_counter()
        await asyncio.gather(*(client(count // concurrency) for _ in range(concurrency)))
        await processor.limiter.drain()
        cpu.append((time.process_time() - started_cpu) / count * 1e6)
        wall.append((time.perf_counter() - started) / count * 1e6)
    return cpu[1:], wall[1:]


async def main(count: int, repeat: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        redis = LocalRedis(Path(directory))
        redis.start()
        try:
            modes = {
                "no client keys": state(False, False),
                "client keys, no limits": state(True, False),
                "limits, memory store": state(True, True),
                "limits, redis (unix socket)": state(True, True, redis.url),
            }
            for concurrency in (1, 32):
                print(f"{concurrency} request(s) at a time:")
                for name, runtime in modes.items():
                    processor = Processor(runtime)
                    cpu, wall = await rounds(processor, count, repeat, concurrency)
                    print(
                        f"  {name:30s} CPU µs/request min {min(cpu):7.1f} median "
                        f"{statistics.median(cpu):7.1f}; wall µs/request median "
                        f"{statistics.median(wall):7.1f}"
                    )
        finally:
            redis.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    uvloop.run(main(args.requests, args.rounds))
