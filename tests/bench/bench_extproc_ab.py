"""Benchmark: the ext_proc of two source trees, A/B, behind one and the same Envoy. Not a test.

    .venv/bin/python tests/bench/bench_extproc_ab.py /tmp/before . --rounds 6

`make bench-gateway` compares whole gateways: each tree's own Envoy config too, and on a shared
machine the throughput (and with it how many requests one socket read batches) moves with the
other tenants, so ext_proc CPU per request moves with it. Here one Envoy (this tree's gateway
config, ``--concurrency 1``) and one instant upstream stay up, and the ext_proc process (one
worker, on a Unix socket) is started from each tree in turn at the same socket, alternating,
round after round. wrk (1 thread, 16 connections) runs after a 2 s warm-up. Prints per run the
req/s, the CPU other processes used meanwhile, ext_proc and Envoy CPU µs per request, then the
medians. A tree's code is loaded with PYTHONPATH set to it, so use a checkout (a `git worktree
add /tmp/before <commit>`) whose ext_proc reads this tree's routing config.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
from bench_gateway import PROMPT, bench_policy, envoy, instant_upstream, run_wrk, start_envoy

from switchyard.local.control import LocalControlPlane
from switchyard.local.ports import free_port_block
from switchyard.local.runner import port_open, socket_open, wait_until
from switchyard.operator.compiler import compile_config
from switchyard.operator.envoy_config import GatewaySettings
from switchyard.operator.policy import parse_policy


def one_run(
    tree: Path, routing: Path, served: Path, url: str, seconds: int, envoy_pid: int
) -> dict[str, float]:
    """Start ``tree``'s ext_proc on ``served``, check a request is routed, run wrk, stop it."""
    command = [sys.executable, "-m", "switchyard.cli", "extproc", "--config", str(routing),
               "--listen", f"unix:{str(served).removesuffix('.0')}", "--workers", "1"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree)}
    ext = subprocess.Popen(command, cwd=tree, env=env, stdout=subprocess.DEVNULL)
    try:
        wait_until(
            lambda: served.exists() and socket_open(f"unix:{served}"), 60, f"{tree}'s ext_proc"
        )
        body = {"model": "auto", "messages": [{"role": "user", "content": PROMPT}]}
        check = httpx.post(url, json=body, timeout=10)
        assert check.status_code == 200 and check.headers.get("x-switchyard-model"), check.text
        return run_wrk(url, seconds, 16, {"ext_proc": [ext.pid], "envoy": [envoy_pid]})
    finally:
        ext.send_signal(signal.SIGTERM)
        ext.wait(30)
        served.unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs=2, type=Path, help="the two source trees (A, B)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--bundle", default="builtin:default")
    args = parser.parse_args()
    trees = [t.resolve() for t in args.trees]
    upstream = free_port_block()
    config = compile_config([parse_policy(bench_policy(upstream, args.bundle))])
    directory = Path(tempfile.mkdtemp(prefix="extproc-ab-"))
    routing = directory / "routing.pb"
    routing.write_bytes(config.SerializeToString())
    served = directory / "extproc.sock.0"  # worker 0 of `--listen unix:extproc.sock`
    port = free_port_block(2)
    settings = GatewaySettings(listen_port=port, extproc_endpoints=[(f"unix:{served}", 0)])
    control = LocalControlPlane(settings)
    control.start(config)
    runs: dict[Path, list[dict[str, float]]] = {t: [] for t in trees}
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    with envoy(instant_upstream(upstream), 1, upstream):
        proxy = start_envoy(str(control.write_bootstrap(directory, port + 1)), 1)
        try:
            wait_until(lambda: port_open("127.0.0.1", port), 30, "the gateway Envoy")
            for round_ in range(args.rounds):
                for tree in trees:
                    r = one_run(tree, routing, served, url, args.seconds, proxy.pid)
                    runs[tree].append(r)
                    print(
                        f"{tree}  round {round_}: {r['rps']:.0f} req/s, others {r['others']:.0f}%,"
                        f" ext_proc {1000 * r['cpu ext_proc']:.1f} µs/req,"
                        f" Envoy {1000 * r['cpu envoy']:.1f} µs/req",
                        flush=True,
                    )
        finally:
            proxy.terminate()
            proxy.wait()
            control.stop()
    for tree, results in runs.items():
        cpu = statistics.median(1000 * r["cpu ext_proc"] for r in results)
        rps = statistics.median(r["rps"] for r in results)
        print(f"{tree}: median ext_proc {cpu:.1f} µs/req, {rps:.0f} req/s over {len(results)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
