"""Benchmark: Envoy direct vs Envoy + ext_proc routing, same instant upstream, same run.

Run with `make bench-gateway`. Starts an instant upstream (an Envoy answering every request
with a fixed chat completion), then measures with wrk:
  1. "envoy direct": an Envoy proxy with no ext_proc in front of that upstream;
  2. "gateway": `switchyard up` (Envoy + ext_proc workers + classifier routing) in front of
     the same upstream.
Prints requests/s and p50/p99 latency for both and their ratios. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from gateway_harness import Gateway, start_gateway

from switchyard.local.ports import free_port_block
from switchyard.local.runner import envoy_binary, port_open, wait_until

PROMPT = "What is the capital of France? Answer in one word."
COMPLETION = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 0,
    "model": "bench",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Paris"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 20, "completion_tokens": 1, "total_tokens": 21},
}
WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
"""


def _listener(name: str, port: int, route: dict[str, object]) -> dict[str, object]:
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": name,
        "route_config": {
            "virtual_hosts": [
                {"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, **route}]}
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }


@contextmanager
def envoy(config: dict[str, object], concurrency: int, port: int) -> Iterator[None]:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(config, handle)
    proc = subprocess.Popen(
        [
            envoy_binary(),
            "-c",
            handle.name,
            "--use-dynamic-base-id",
            "-l",
            "error",
            "--concurrency",
            str(concurrency),
        ],
    )
    try:
        wait_until(lambda: port_open("127.0.0.1", port), 30, "envoy")
        yield
    finally:
        proc.terminate()
        proc.wait()
        os.unlink(handle.name)


def instant_upstream(port: int) -> dict[str, object]:
    body = json.dumps(COMPLETION)
    return {
        "static_resources": {
            "listeners": [
                _listener(
                    "upstream",
                    port,
                    {
                        "direct_response": {"status": 200, "body": {"inline_string": body}},
                        "response_headers_to_add": [
                            {"header": {"key": "content-type", "value": "application/json"}}
                        ],
                    },
                )
            ]
        }
    }


def direct_proxy(port: int, upstream_port: int) -> dict[str, object]:
    cluster = {
        "name": "upstream",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "upstream",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {
                                        "address": "127.0.0.1",
                                        "port_value": upstream_port,
                                    }
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }
    return {
        "static_resources": {
            "listeners": [_listener("direct", port, {"route": {"cluster": "upstream"}})],
            "clusters": [cluster],
        }
    }


@contextmanager
def gateway(directory: Path, upstream_port: int, workers: int, bundle: str) -> Iterator[Gateway]:
    """`switchyard up` with a classifier policy whose three models share the instant upstream."""
    models = []
    tiers = []
    for i, (name, price) in enumerate([("light", 0.1), ("standard", 1.0), ("capable", 10.0)]):
        models.append(
            {
                "name": name,
                "backend": {"url": f"http://127.0.0.1:{upstream_port}"},
                "upstreamModel": f"bench-{name}",
                "pricing": {"inputPer1M": price, "outputPer1M": price * 4},
                "contextWindow": 128000,
            }
        )
        tiers.append({"model": name, **({"maxDifficulty": 0.35 * (i + 1)} if i < 2 else {})})
    policy = {
        "apiVersion": "switchyard.dev/v1alpha1",
        "kind": "RoutePolicy",
        "metadata": {"name": "bench", "namespace": "default"},
        "spec": {
            "match": {"models": ["auto"]},
            "models": models,
            "strategy": {"type": "classifier", "tiers": tiers, "router": {"bundle": bundle}},
        },
    }
    running = start_gateway(directory, policy, extprocWorkers=workers, envoyConcurrency=1)
    try:
        yield running
    finally:
        running.stop()


def run_wrk(url: str, seconds: int, connections: int) -> dict[str, float]:
    body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": PROMPT}]})
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT % body)
    # Warm up (connections, ext_proc streams, Python caches), then measure.
    subprocess.run(
        ["wrk", "-t1", f"-c{connections}", "-d2s", "-s", script.name, url],
        check=True,
        capture_output=True,
    )
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script.name, url],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    os.unlink(script.name)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non_2xx:
        raise RuntimeError(f"{url}: {non_2xx.group(1)} failed responses\n{out}")

    def ms(label: str) -> float:
        match = re.search(rf"{label}%\s+([\d.]+)(us|ms|s)", out)
        assert match, out
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert rps, out
    return {"rps": float(rps.group(1)), "p50": ms("50"), "p99": ms("99")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) - 1))
    parser.add_argument("--bundle", default="builtin:default", help="router bundle to score with")
    args = parser.parse_args()
    upstream_port, direct_port = free_port_block(), free_port_block()
    results: dict[str, dict[str, float]] = {}
    with envoy(instant_upstream(upstream_port), 1, upstream_port):
        with envoy(direct_proxy(direct_port, upstream_port), 1, direct_port):
            results["envoy direct"] = run_wrk(
                f"http://127.0.0.1:{direct_port}/v1/chat/completions",
                args.seconds,
                args.connections,
            )
        with (
            tempfile.TemporaryDirectory() as tmp,
            gateway(Path(tmp), upstream_port, args.workers, args.bundle) as running,
        ):
            results["envoy + ext_proc"] = run_wrk(
                f"{running.base_url}/chat/completions",
                args.seconds,
                args.connections,
            )
    print(
        f"\nwrk: {args.connections} connections, {args.seconds}s, {os.cpu_count()} cores, "
        f"ext_proc workers {args.workers}, Envoy concurrency 1 (both), router {args.bundle}"
    )
    print(f"{'setup':<18}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for name, r in results.items():
        print(f"{name:<18}{r['rps']:>10.0f}{r['p50']:>10.2f}{r['p99']:>10.2f}")
    direct, routed = results["envoy direct"], results["envoy + ext_proc"]
    print(f"throughput ratio (ext_proc / direct): {routed['rps'] / direct['rps']:.2f}")
    print(
        f"added p50: {routed['p50'] - direct['p50']:.2f} ms; added p99: "
        f"{routed['p99'] - direct['p99']:.2f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
