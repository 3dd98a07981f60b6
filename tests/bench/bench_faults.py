"""Benchmark: the fault schedule at full scale, through the local gateway. Not a test.

Run with `make bench-faults`. Eight clients (the official openai client, streaming and not)
send paced chat completions through `switchyard up`'s LocalGateway while an upstream is killed
and brought back, answers 429, 500 and slowly, ext_proc workers are killed (their parent
restarts them), the control plane is down and a policy edit renames and removes models
(tests/infra/fault_schedule.py). Prints, per fault: requests, ok, failed over, failed (by
status; how many of those were in flight at a worker's kill), hung, malformed errors and the
time to recover after the fault was lifted. Loopback only; about four minutes (``--only`` runs
the baseline and the faults named).
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "infra"))

from fault_load import table
from fault_schedule import BENCH, run_schedule


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # so the gateway and its children are stopped on the way out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=BENCH.clients)
    parser.add_argument("--hold", type=float, default=BENCH.hold_s, help="seconds per fault")
    parser.add_argument(
        "--only", action="append", default=[], help="run this fault (repeatable), e.g. "
        "'ext_proc worker killed'; the baseline always runs"
    )  # fmt: skip
    args = parser.parse_args()
    scale = replace(BENCH, clients=args.clients, hold_s=args.hold)
    signal.signal(signal.SIGTERM, _interrupt)
    with tempfile.TemporaryDirectory() as directory:
        reports, outcomes, stats = run_schedule(Path(directory), scale, frozenset(args.only))
    print(f"\n{len(outcomes)} requests, {scale.clients} clients, each fault held {scale.hold_s} s")
    print(table(reports))
    failures = sorted({o.detail[:160] for o in outcomes if o.failed or o.hung})
    for detail in failures[:10]:
        print(f"  failure seen: {detail}")
    print("Envoy's ext_proc cluster: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
