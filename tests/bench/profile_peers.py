"""py-spy profile of Switchyard's ext_proc under the `make bench` load (docs/performance.md).

    .venv/bin/python tests/bench/profile_peers.py [--seconds 10] [--out DIR]

Starts the instant upstream and `switchyard up` with the example policy, loads it with wrk (16
connections) and records each ext_proc worker with py-spy (``$PY_SPY`` or `py-spy` on $PATH) for
``--seconds``. Writes the collapsed stacks and prints the share of samples by function, inclusive
(where the time goes, callers included) and by leaf (own time). Not a test.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gateway import envoy, gateway, gateway_components, instant_upstream, request_body
from gateway_harness import DEMO_NAMES, descendants, policy_for_ports

from switchyard.local.ports import free_port_block


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summarise(collapsed: Path, top: int) -> None:
    """Print the top functions by inclusive and by own share of the samples."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = [f.split(" (")[0] + " (" + f.split("(")[-1].split(":")[0].rsplit("/", 1)[-1]
                  + ")" for f in stack.split(";") if f]  # fmt: skip
        for frame in set(frames):
            inclusive[frame] += n
        if frames:
            own[frames[-1]] += n
    for title, counter in (("inclusive", inclusive), ("own", own)):
        print(f"-- {title} (% of {total} samples)")
        for frame, n in counter.most_common(top):
            print(f"{100 * n / total:6.1f}  {frame}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path(".switchyard/bench"))
    args = parser.parse_args()
    py_spy = os.environ.get("PY_SPY") or shutil.which("py-spy")
    if not py_spy:
        raise SystemExit("py-spy not found: pip install py-spy, or set $PY_SPY")
    args.out.mkdir(parents=True, exist_ok=True)
    upstream_port = free_port_block()
    policy = policy_for_ports(dict.fromkeys(DEMO_NAMES, upstream_port))
    with (
        envoy(instant_upstream(upstream_port), 1, upstream_port),
        tempfile.TemporaryDirectory() as tmp,
        gateway(Path(tmp), policy, 0, 1) as running,
    ):
        workers = gateway_components(running)["ext_proc"]
        tree = [running.process.pid, *descendants(running.process.pid)]
        cpu0 = {pid: _cpu(pid) for pid in tree}
        url = f"{running.base_url}/chat/completions"
        script = Path(tmp) / "post.lua"
        script.write_text(
            f"wrk.method = 'POST'\nwrk.body = '{request_body()}'\n"
            "wrk.headers['Content-Type'] = 'application/json'\n"
        )
        load = subprocess.Popen(
            ["wrk", "-t1", f"-c{args.connections}", f"-d{args.seconds + 4}s", "-s", str(script),
             url],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        outputs = []
        for pid in workers:
            out = args.out / f"profile-extproc-{pid}.txt"
            outputs.append(out)
        spies = [
            subprocess.Popen(
                [py_spy, "record", "--pid", str(pid), "--duration", str(args.seconds), "--rate",
                 "250", "--format", "raw", "--output", str(out), "--nonblocking"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for pid, out in zip(workers, outputs, strict=True)
        ]  # fmt: skip
        for spy in spies:
            spy.wait()
        print(load.communicate()[0])
        print("CPU s of each process of `switchyard up` during the load:")
        for pid in tree:
            name = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:90].decode()
            print(f"{_cpu(pid) - cpu0[pid]:8.2f}  {pid} {name}")
    for out in outputs:
        print(f"== {out}")
        summarise(out, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
