"""What Envoy's side of the ext_proc costs per request, and what each part of it costs.

    .venv/bin/python tests/bench/bench_envoy_side.py [--seconds 5] [--rounds 3]

The no-op Go ext_proc (tests/bench/noop_extproc) behind the gateway's own Envoy config for the
example policy, in variants that each drop one thing Envoy does for the ext_proc; wrk against each
in turn, ``--rounds`` times. The no-op's own CPU is tiny and constant, so the difference in the
gateway Envoy's CPU per request is what that thing costs Envoy:

- shipped: request body buffered to the ext_proc with its attributes (path, the headers the
  policy reads), each response chunk streamed to it with two attributes (usage accounting);
- no response: the response is not sent to the ext_proc (no accounting through it);
- no attributes: neither request nor response attributes (Envoy's CEL evaluation per message);
- no stream retry: the gRPC stream without its retry policy (Envoy then keeps no copy of what
  it sent, to replay on another worker);
- routing only: no response and no attributes.

Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gateway import envoy, instant_upstream, noop_gateway, run_wrk
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from gateway_harness import DEMO_NAMES, policy_for_ports

from switchyard.local.ports import free_port_block
from switchyard.operator import envoy_config

_ORIGINAL = envoy_config._ext_proc
Mode = processing_mode_pb2.ProcessingMode


def _no_response(proc: Any) -> None:
    proc.processing_mode.response_body_mode = Mode.NONE
    del proc.response_attributes[:]


def _no_attributes(proc: Any) -> None:
    del proc.request_attributes[:]
    del proc.response_attributes[:]


def _no_retry(proc: Any) -> None:
    proc.grpc_service.ClearField("retry_policy")


VARIANTS: dict[str, list[Callable[[Any], None]]] = {
    "shipped": [],
    "no stream retry": [_no_retry],
    "no response": [_no_response],
    "no attributes": [_no_attributes],
    "routing only": [_no_response, _no_attributes],
}


@contextmanager
def variant(changes: list[Callable[[Any], None]]) -> Iterator[None]:
    """The gateway's ext_proc filter config with ``changes`` applied while the block runs."""

    def patched(*args: Any, **kwargs: Any) -> Any:
        proc = _ORIGINAL(*args, **kwargs)
        for change in changes:
            change(proc)
        return proc

    with mock.patch.object(envoy_config, "_ext_proc", patched):
        yield


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    upstream_port = free_port_block()
    policy = policy_for_ports(dict.fromkeys(DEMO_NAMES, upstream_port))
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    with envoy(instant_upstream(upstream_port), 1, upstream_port) as upstream:
        for i in range(args.rounds):
            for name, changes in VARIANTS.items():
                with (
                    tempfile.TemporaryDirectory() as tmp,
                    variant(changes),
                    noop_gateway(Path(tmp), policy, 1) as (url, parts),
                ):
                    result = run_wrk(
                        url, args.seconds, args.connections, {**parts, "upstream": [upstream.pid]}
                    )
                runs[name].append(result)
                print(
                    f"round {i + 1} {name:<14}{result['rps']:>7.0f} req/s  Envoy "
                    f"{result['cpu gateway envoy']:.3f} ms/req  no-op "
                    f"{result['cpu no-op ext_proc']:.3f}  others {result['others']:.0f}%",
                    flush=True,
                )
    print(f"\n{'variant':<15}{'req/s':>7}{'Envoy CPU ms/req':>18}{'saved vs shipped':>18}")
    shipped = statistics.median(r["cpu gateway envoy"] for r in runs["shipped"])
    for name, results in runs.items():
        cpu = statistics.median(r["cpu gateway envoy"] for r in results)
        rps = statistics.median(r["rps"] for r in results)
        print(f"{name:<15}{rps:>7.0f}{cpu:>18.3f}{shipped - cpu:>18.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
