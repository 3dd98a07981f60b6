"""Benchmark: how fast a RoutePolicy change reaches traffic, and how the compiler scales.

Run with `make bench-control-plane`. Two figures:
1. kubectl apply → Envoy serving the change: a real kube-apiserver, the operator, Envoy on ADS
   and an ext_proc on the config stream; 20 edits that flip the default model, each timed from
   just before `kubectl apply` until a request through Envoy reaches the new model (p50/p95).
2. compile + push for 1,000 policies: compile_config plus building the Envoy snapshot, and a
   ControlPlane.apply to one connected Envoy and one ext_proc (until the ext_proc ACKed, and
   in all, with the bridge and the removal of the config it replaced).
`--no-kube` runs only the second (no kube-apiserver needed). Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "integration"))
sys.path.insert(0, str(HERE.parent / "infra"))

from gateway_harness import policy_for_ports  # noqa: E402
from kube import KubeControlPlane, k8s_bin_dir  # noqa: E402
from operator_harness import Cluster  # noqa: E402
from test_control_plane import Harness  # noqa: E402

from switchyard.local.runner import port_open, wait_until  # noqa: E402
from switchyard.operator.compiler import compile_config  # noqa: E402
from switchyard.operator.envoy_config import GatewaySettings  # noqa: E402
from switchyard.operator.policy import parse_policy  # noqa: E402
from switchyard.operator.xds_server import build_snapshot  # noqa: E402

CHANGES = 20


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def apply_to_serving() -> list[float]:
    kube = KubeControlPlane(k8s_bin_dir(), "bench").start()
    kube.kubectl("apply", "-f", str(HERE.parents[1] / "deploy" / "crds" / "routepolicy.yaml"))
    kube.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/routepolicies.switchyard.dev"
    )
    cluster = Cluster(kube)
    try:
        cluster.apply(cluster.policy)
        wait_until(lambda: port_open("127.0.0.1", cluster.port), 60, "gateway")
        wait_until(lambda: cluster.model() == "light", 60, "first policy")
        samples = []
        for i in range(CHANGES):
            target = "capable" if i % 2 == 0 else "light"
            edited = copy.deepcopy(cluster.policy)
            edited["spec"]["strategy"] = {"type": "rules", "default": target}
            started = time.perf_counter()
            cluster.apply(edited)
            wait_until(lambda t=target: cluster.model() == t, 30, "change served")
            samples.append(time.perf_counter() - started)
        return samples
    finally:
        cluster.close()
        kube.stop()


def many_policies(count: int) -> list[dict[str, Any]]:
    base = policy_for_ports({"demo-light": 20001, "demo-standard": 20002, "demo-capable": 20003})
    docs = []
    for i in range(count):
        doc = copy.deepcopy(base)
        doc["metadata"] = {"name": f"team-{i}", "namespace": f"ns-{i % 50}"}
        doc["spec"]["match"]["models"] = [f"auto-{i}"]
        docs.append(doc)
    return docs


def compile_and_push(count: int) -> tuple[float, float, float, float]:
    policies = [parse_policy(d) for d in many_policies(count)]
    started = time.perf_counter()
    config = compile_config(policies)
    compiled = time.perf_counter() - started
    snapshot_started = time.perf_counter()
    build_snapshot(config, GatewaySettings())
    snapshot = time.perf_counter() - snapshot_started
    harness = Harness(Path("/tmp"))
    try:
        push_started = time.perf_counter()
        result = harness.run(harness.plane.apply(config))
        pushed = time.perf_counter() - push_started
        assert result.envoy_acked and result.extproc_acked, result
    finally:
        harness.close()
    return compiled, snapshot, result.seconds, pushed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-kube", dest="kube", action="store_false", help="only figure 2")
    if parser.parse_args().kube:
        samples = apply_to_serving()
        print(f"\nkubectl apply -> Envoy serving the change, {len(samples)} changes:")
        p50, p95 = statistics.median(samples) * 1000, percentile(samples, 0.95) * 1000
        print(f"  p50 {p50:.0f} ms, p95 {p95:.0f} ms, max {max(samples) * 1000:.0f} ms")
    compiled, snapshot, acked, pushed = compile_and_push(1000)
    print("1,000 policies (3,000 models):")
    print(f"  compile {compiled * 1000:.0f} ms, Envoy snapshot {snapshot * 1000:.0f} ms, "
          f"push until Envoy and the ext_proc ACKed {acked * 1000:.0f} ms, "
          f"whole apply (old config removed) {pushed * 1000:.0f} ms")  # fmt: skip
    asyncio.set_event_loop(None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
