"""Benchmark: Switchyard against its peers, in one run, on this machine, loopback only.

Run with `make bench`. One instant upstream (an Envoy that answers a fixed chat completion)
serves every system; the same load generators, with the same settings, run against each in turn,
``--rounds`` times alternating, so drift in the machine's load shows as a range:

- envoy direct: Envoy proxying to the upstream, no ext_proc (the ceiling);
- no-op floor: Switchyard's Envoy config with a Go ext_proc that only returns the routing
  metadata (tests/bench/noop_extproc): the best any external processor could do here;
- switchyard: `switchyard up` with the example policy (examples/policy.yaml) and the default
  router (builtin:default); its usage accounting is always on;
- aigw: Envoy AI Gateway's ext_proc behind the same Envoy build, routing by model name, with
  token-usage accounting on (llmRequestCosts); ``aigw default``: its default path (no costs);
- litellm: LiteLLM's proxy, one worker per core, routing by model name.

Per system: req/s at ``--connections`` (wrk, closed loop), p50/p99, CPU ms per request summed
over the system's own processes, RSS idle and peak under load; then open loop (vegeta): the added
p50/p99 over Envoy direct at a rate every system sustains (half of the slowest one's req/s unless
``--rate``), and at half of Switchyard's req/s (``--half-rate``) for the systems that sustain it.
Prints a table; writes it (markdown), the raw figures (JSON) and a chart (PNG) to ``--out``;
``--docs`` also puts the table and chart into docs/performance.md. Not a test.

Every option has an environment variable (BENCH_SECONDS, BENCH_ROUNDS, ...) so `make bench`
can be rerun longer on a quiet machine: ``make bench BENCH_SECONDS=20 BENCH_ROUNDS=5``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gateway import (
    direct_proxy,
    envoy,
    gateway,
    gateway_components,
    instant_upstream,
    noop_gateway,
    rss_mib,
    run_vegeta,
    run_wrk,
    start_envoy,
)
from gateway_harness import DEMO_NAMES, policy_for_ports
from peers import (
    AIGW_VERSION,
    Model,
    System,
    aigw_gateway,
    envoy_version,
    litellm_proxy,
    litellm_version,
    temporary_directory,
)

from switchyard.local.ports import free_port_block
from switchyard.local.runner import envoy_binary

REPO = Path(__file__).resolve().parents[2]
SYSTEMS = ["direct", "floor", "switchyard", "aigw", "aigw-default", "litellm"]
LABELS = {
    "direct": "Envoy direct",
    "floor": "no-op Go ext_proc (floor)",
    "switchyard": "Switchyard",
    "aigw": "AI Gateway ext_proc, accounting on",
    "aigw-default": "AI Gateway ext_proc, default",
    "litellm": "LiteLLM proxy",
}
# Envoy-based systems: the ones the half-saturation latency target is about.
ENVOY_BASED = {"direct", "floor", "switchyard", "aigw", "aigw-default"}
DOC_BEGIN = "<!-- bench:begin (written by `make bench BENCH_DOCS=1`) -->"
DOC_END = "<!-- bench:end -->"


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    add = parser.add_argument
    add("--seconds", type=int, default=int(_env("BENCH_SECONDS", "10")), help="per wrk run")
    add("--rounds", type=int, default=int(_env("BENCH_ROUNDS", "3")), help="alternating rounds")
    add("--connections", type=int, default=int(_env("BENCH_CONNECTIONS", "16")))
    add("--concurrency", type=int, default=int(_env("BENCH_ENVOY_CONCURRENCY", "1")),
        help="Envoy --concurrency of every gateway Envoy")  # fmt: skip
    add("--open-seconds", type=int, default=int(_env("BENCH_OPEN_SECONDS", "0")),
        help="per vegeta run; 0: --seconds")  # fmt: skip
    add("--rate", type=int, default=int(_env("BENCH_RATE", "0")),
        help="open-loop req/s for every system; 0: half the slowest system's req/s")  # fmt: skip
    add("--half-rate", type=int, default=int(_env("BENCH_HALF_RATE", "0")),
        help="open-loop req/s for the p99 target; 0: half Switchyard's req/s")  # fmt: skip
    add("--systems", default=_env("BENCH_SYSTEMS", ",".join(SYSTEMS)),
        help=f"comma-separated, of {','.join(SYSTEMS)}")  # fmt: skip
    add("--out", type=Path, default=Path(_env("BENCH_OUT", str(REPO / ".switchyard" / "bench"))))
    add("--docs", action="store_true", default=_env("BENCH_DOCS", "") not in ("", "0"),
        help="also write the table and chart into docs/performance.md")  # fmt: skip
    add("--label", default=_env("BENCH_LABEL", ""), help="a note on the run, e.g. 'contended'")
    args = parser.parse_args()
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown or "direct" not in args.systems:
        parser.error(f"--systems: unknown {sorted(unknown)} or no 'direct' (the baseline)")
    args.open_seconds = args.open_seconds or args.seconds
    return args


def example_models(policy: dict[str, object]) -> list[Model]:
    """The example policy's models, for the peers that route by model name."""
    spec = policy["spec"]
    assert isinstance(spec, dict)
    return [
        Model(
            m["name"],
            m["upstreamModel"],
            float(m["pricing"]["inputPer1M"]),
            float(m["pricing"]["outputPer1M"]),
        )
        for m in spec["models"]
    ]


@contextmanager
def start_systems(
    args: argparse.Namespace, upstream_port: int, tmp: Path
) -> Iterator[dict[str, System]]:
    """Every selected system, started and answering, in front of the instant upstream."""
    policy = policy_for_ports(dict.fromkeys(DEMO_NAMES, upstream_port))
    models = example_models(policy)
    factories: dict[str, Callable[[], AbstractContextManager[System]]] = {
        "direct": lambda: direct_system(upstream_port, args.concurrency),
        "floor": lambda: floor_system(tmp / "floor", policy, args.concurrency),
        "switchyard": lambda: switchyard_system(tmp / "switchyard", policy, args.concurrency),
        "aigw": lambda: aigw_gateway(
            tmp / "aigw", upstream_port, models, True, args.concurrency, start_envoy
        ),
        "aigw-default": lambda: aigw_gateway(
            tmp / "aigw-default", upstream_port, models, False, args.concurrency, start_envoy
        ),
        "litellm": lambda: litellm_proxy(tmp / "litellm", upstream_port, models),
    }
    with ExitStack() as stack:
        systems = {}
        for name in args.systems:
            print(f"starting {LABELS[name]}", flush=True)
            systems[name] = stack.enter_context(factories[name]())
        yield systems


@contextmanager
def direct_system(upstream_port: int, concurrency: int) -> Iterator[System]:
    port = free_port_block()
    with envoy(direct_proxy(port, upstream_port), concurrency, port) as proxy:
        yield System(f"http://127.0.0.1:{port}/v1/chat/completions", {"proxy envoy": [proxy.pid]})


@contextmanager
def floor_system(directory: Path, policy: dict[str, object], concurrency: int) -> Iterator[System]:
    directory.mkdir(parents=True)
    with noop_gateway(directory, policy, concurrency) as (url, components):
        yield System(url, components)


@contextmanager
def switchyard_system(
    directory: Path, policy: dict[str, object], concurrency: int
) -> Iterator[System]:
    directory.mkdir(parents=True)
    # 0: Switchyard's default (one worker per core but one).
    workers = int(os.environ.get("BENCH_SWITCHYARD_WORKERS") or 0)
    with gateway(directory, policy, workers, concurrency) as running:
        yield System(f"{running.base_url}/chat/completions", gateway_components(running))


def own(result: dict[str, float], prefix: str) -> float:
    """Sum of ``prefix <component>`` over the system's own processes (not the upstream, wrk)."""
    return sum(
        v
        for k, v in result.items()
        if k.startswith(prefix) and k not in (f"{prefix}upstream", f"{prefix}wrk")
    )


def measure(args: argparse.Namespace, systems: dict[str, System], upstream_pid: int) -> dict:
    """All the runs: idle RSS, closed-loop rounds, then open-loop rounds at the two rates."""
    idle = {name: rss_mib([p for ps in s.components.values() for p in ps]) for name, s in
            systems.items()}  # fmt: skip
    closed: dict[str, list[dict[str, float]]] = {name: [] for name in systems}
    for i in range(args.rounds):
        for name, system in systems.items():
            parts = {**system.components, "upstream": [upstream_pid]}
            result = run_wrk(
                system.url,
                args.seconds,
                args.connections,
                parts,
                system.model,
                system.headers,
                timeout_s=30,
            )
            closed[name].append(result)
            print(
                f"round {i + 1} {LABELS[name]:<36}{result['rps']:>8.0f} req/s  p50 "
                f"{result['p50']:.2f} p99 {result['p99']:.2f} ms  CPU "
                f"{own(result, 'cpu '):.3f} ms/req  runnable-waiting {own(result, 'wait '):.3f} "
                f"ms/req  others {result['others']:.0f}%",
                flush=True,
            )
    rps = {name: statistics.median(r["rps"] for r in runs) for name, runs in closed.items()}
    rate = args.rate or max(1, int(0.5 * min(rps.values())))
    base = "switchyard" if "switchyard" in rps else "direct"
    half = args.half_rate or max(1, int(0.5 * rps[base]))
    # Half-rate runs only where the system's saturation leaves headroom (else it is a queue).
    half_systems = [n for n in systems if n in ENVOY_BASED and rps[n] >= 1.2 * half]
    if "direct" not in half_systems:
        half_systems.insert(0, "direct")
    if base == "direct" and not args.half_rate:
        half_systems = []  # no Switchyard in this run: no half-saturation target to check
    open_loop: dict[str, dict[str, list[dict[str, float]]]] = {"rate": {}, "half": {}}
    for i in range(args.rounds):
        for key, value, names in (("rate", rate, list(systems)), ("half", half, half_systems)):
            for name in names:
                s = systems[name]
                result = run_vegeta(
                    s.url, value, args.open_seconds, s.model, s.headers, strict=False
                )
                open_loop[key].setdefault(name, []).append(result)
                print(
                    f"open {i + 1} {value:>5}/s {LABELS[name]:<36}p50 {result['p50']:.2f} "
                    f"p99 {result['p99']:.2f} ms  ok {100 * result['success']:.1f}%",
                    flush=True,
                )
    return {"idle_rss": idle, "closed": closed, "open": open_loop, "rate": rate, "half": half}


def _med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _rng(values: list[float], fmt: str) -> str:
    if not values:
        return "—"
    low, mid, high = min(values), _med(values), max(values)
    if f"{low:{fmt}}" == f"{high:{fmt}}":
        return f"{mid:{fmt}}"
    return f"{mid:{fmt}} ({low:{fmt}}-{high:{fmt}})"


def _failed(ok: list[float]) -> str:
    """A mark on an open-loop figure whose runs lost requests (then it measured a queue)."""
    return f" ⚠ {100 * min(ok):.1f} % ok" if ok and min(ok) < 1 else ""


def summarise(data: dict) -> dict[str, dict[str, object]]:
    """Per system: medians and ranges over the rounds, added latency against Envoy direct
    (paired by round), and the Switchyard/system ratios."""
    closed, open_loop = data["closed"], data["open"]
    rows: dict[str, dict[str, object]] = {}
    for name, runs in closed.items():
        row: dict[str, object] = {
            "rps": [r["rps"] for r in runs],
            "p50": [r["p50"] for r in runs],
            "p99": [r["p99"] for r in runs],
            "cpu": [own(r, "cpu ") for r in runs],
            "cpu_parts": {
                k[4:]: _med([r[k] for r in runs])
                for k in runs[0]
                if k.startswith("cpu ") and k not in ("cpu upstream", "cpu wrk")
            },
            "rss_idle": data["idle_rss"][name],
            "rss_load": [own(r, "rss ") for r in runs],
            "wait": [own(r, "wait ") for r in runs],
            "others": [r["others"] for r in runs],
            "timeouts": [r.get("timeouts", 0.0) for r in runs],
        }
        for key in ("rate", "half"):
            mine, direct = open_loop[key].get(name, []), open_loop[key].get("direct", [])
            pairs = list(zip(direct, mine, strict=False))
            row[f"{key}_ok"] = [m["success"] for m in mine]
            row[f"{key}_p50"] = [m["p50"] for m in mine]
            row[f"{key}_p99"] = [m["p99"] for m in mine]
            row[f"{key}_added_p50"] = [m["p50"] - d["p50"] for d, m in pairs]
            row[f"{key}_added_p99"] = [m["p99"] - d["p99"] for d, m in pairs]
        rows[name] = row
    if "switchyard" in closed:
        ours = closed["switchyard"]
        for name, row in rows.items():
            theirs = closed[name]
            row["rps_ratio"] = [a["rps"] / b["rps"] for a, b in zip(ours, theirs, strict=True)]
            row["cpu_ratio"] = [
                own(a, "cpu ") / own(b, "cpu ") for a, b in zip(ours, theirs, strict=True)
            ]
    return rows


def markdown(args: argparse.Namespace, data: dict, rows: dict, meta: dict[str, str]) -> str:
    """The results as markdown: a header on the run, the table, the ratios, the targets."""
    out = [
        f"**Run:** {meta['when']}{' — ' + args.label if args.label else ''}. "
        f"{meta['machine']}. Envoy {meta['envoy']}, AI Gateway ext_proc {AIGW_VERSION}, "
        f"LiteLLM {meta['litellm']}, Python {platform.python_version()}.",
        "",
        f"`{meta['command']}`: wrk 1 thread, {args.connections} connections, {args.seconds} s per "
        f"run after a 2 s warm-up, {args.rounds} alternating rounds; Envoy --concurrency "
        f"{args.concurrency} for every gateway; open loop (vegeta) {args.open_seconds} s per run "
        f"at {data['rate']} req/s (every system) and {data['half']} req/s (half of "
        f"Switchyard's req/s). Figures are medians over the rounds, (min-max) where they "
        f"differ. CPU and RSS are summed over the system's own processes (not the upstream, "
        f"not the load generator).",
        "",
        "| system | req/s | p50 ms | p99 ms | CPU ms/req | RSS idle MiB | RSS load MiB | "
        f"added p50/p99 ms at {data['rate']}/s | added p99 ms at {data['half']}/s | "
        "Switchyard req/s ÷ theirs | Switchyard CPU/req ÷ theirs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        added = (
            f"{_rng(row['rate_added_p50'], '.2f')} / {_rng(row['rate_added_p99'], '.2f')}"
            if name != "direct"
            else "(baseline)"
        )
        half = _rng(row["half_added_p99"], ".2f") if name != "direct" else "(baseline)"
        added += _failed(row["rate_ok"])
        half += _failed(row["half_ok"])
        out.append(
            f"| {LABELS[name]} | {_rng(row['rps'], '.0f')} | {_rng(row['p50'], '.2f')} | "
            f"{_rng(row['p99'], '.2f')} | {_rng(row['cpu'], '.3f')} | {row['rss_idle']:.0f} | "
            f"{_rng(row['rss_load'], '.0f')} | {added} | {half} | "
            f"{_rng(row.get('rps_ratio', []), '.2f')} | {_rng(row.get('cpu_ratio', []), '.2f')} |"
        )
    out += [
        "",
        "CPU ms per request by process (medians), and the time the system's threads spent "
        "runnable but waiting for a CPU (contention; /proc schedstat), ms per request:",
        "",
    ]
    for name, row in rows.items():
        parts = ", ".join(f"{k} {v:.3f}" for k, v in row["cpu_parts"].items())
        others = _rng(row["others"], ".0f")
        timeouts = (
            f"; {sum(row['timeouts']):.0f} wrk timeouts (30 s)" if any(row["timeouts"]) else ""
        )
        wait = _rng(row["wait"], ".3f")
        out.append(
            f"- {LABELS[name]}: {parts}; waiting for a CPU while runnable {wait} ms/req "
            f"(other processes meanwhile: {others} % CPU{timeouts})"
        )
    out += ["", *targets(rows, data)]
    return "\n".join(out) + "\n"


def targets(rows: dict, data: dict) -> list[str]:
    """Issue 16's targets against this run's ratios."""
    if "switchyard" not in rows:
        return []
    ours = rows["switchyard"]
    lines = ["Targets (issue 16), this run:", ""]

    def check(label: str, values: list[float], goal: float, more: bool, fmt: str) -> None:
        if not values:
            lines.append(f"- {label}: not measured")
            return
        value = _med(values)
        ok = value >= goal if more else value <= goal
        sign = "≥" if more else "≤"
        lines.append(
            f"- {label}: {_rng(values, fmt)} (target {sign} {goal:{fmt}}) — "
            f"{'met' if ok else 'NOT met'}"
        )

    for name, goal, label in (
        ("floor", 0.9, "Switchyard ÷ no-op floor req/s"),
        ("aigw", 1.5, "Switchyard ÷ AI Gateway ext_proc req/s, accounting on in both"),
        ("aigw-default", 0.0, "Switchyard ÷ AI Gateway ext_proc req/s, each one's default"),
        ("litellm", 40.0, "Switchyard ÷ LiteLLM req/s"),
    ):
        if name in rows and goal:
            check(label, rows[name]["rps_ratio"], goal, True, ".2f")
        elif name in rows:
            lines.append(f"- {label}: {_rng(rows[name]['rps_ratio'], '.2f')} (no target)")
    check(
        f"Switchyard added p99 at {data['half']} req/s (half its saturation)",
        ours["half_added_p99"],
        3.0,
        False,
        ".2f",
    )
    return lines


def chart(rows: dict, data: dict, path: Path, title: str) -> None:
    """Three panels: req/s, CPU ms/req, added p50 at the common rate; bars are medians and
    whiskers the min-max over the rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    labels = [LABELS[n].replace(", ", "\n").replace(" (floor)", "\n(floor)") for n in names]
    colours = ["#1f77b4" if n != "switchyard" else "#d62728" for n in names]
    panels = [
        ("req/s", "rps", f"req/s at {data.get('connections', '')} connections (higher is better)"),
        ("CPU ms/req", "cpu", "CPU ms per request, all its processes (lower is better)"),
        ("ms", "rate_added_p50", f"added p50 at {data['rate']} req/s vs Envoy direct (lower)"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5))
    for ax, (unit, key, caption) in zip(axes, panels, strict=True):
        values = [row[key] or [0.0] for row in rows.values()]
        mids = [_med(v) for v in values]
        errs = [[m - min(v) for m, v in zip(mids, values, strict=True)],
                [max(v) - m for m, v in zip(mids, values, strict=True)]]  # fmt: skip
        ax.bar(range(len(names)), mids, yerr=errs, color=colours, capsize=4)
        ax.set_xticks(range(len(names)), labels, fontsize=7, rotation=30, ha="right")
        ax.set_ylabel(unit)
        ax.set_title(caption, fontsize=9)
        if key in ("rps", "cpu") and "litellm" in rows:
            ax.set_yscale("log")
        elif "litellm" in rows:
            ax.set_yscale("symlog", linthresh=1.0)  # added latency may be below zero
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_docs(table: str, png: Path) -> None:
    """Replace the block between the markers in docs/performance.md; copy the chart beside it."""
    doc = REPO / "docs" / "performance.md"
    text = doc.read_text()
    start, end = text.index(DOC_BEGIN) + len(DOC_BEGIN), text.index(DOC_END)
    doc.write_text(text[:start] + "\n\n" + table + "\n![peers](performance.png)\n\n" + text[end:])
    (REPO / "docs" / "performance.png").write_bytes(png.read_bytes())


def machine() -> str:
    model = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    memory = re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())
    return (
        f"{os.cpu_count()} cores ({model.group(1) if model else 'unknown CPU'}), "
        f"{int(memory.group(1)) // 1024 // 1024 if memory else '?'} GiB, "
        f"Linux {platform.release()}"
    )


def main() -> int:
    args = parse_args()
    upstream_port = free_port_block()
    meta = {
        "when": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "envoy": envoy_version(envoy_binary()),
        "litellm": litellm_version() if "litellm" in args.systems else "(not run)",
        "command": "make bench "
        + " ".join(f"{k}={v}" for k, v in os.environ.items() if k.startswith("BENCH_")),
    }
    with (
        envoy(instant_upstream(upstream_port), 1, upstream_port) as upstream,
        temporary_directory() as tmp,
        start_systems(args, upstream_port, Path(tmp)) as systems,
    ):
        data = measure(args, systems, upstream.pid)
    data["connections"] = args.connections
    rows = summarise(data)
    table = markdown(args, data, rows, meta)
    print("\n" + table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peers.md").write_text(table)
    (args.out / "peers.json").write_text(json.dumps({"meta": meta, **data}, indent=1))
    png = args.out / "peers.png"
    chart(rows, data, png, f"{meta['when']} {args.label} — {meta['machine']}")
    print(f"wrote {args.out}/peers.md, peers.json, peers.png")
    if args.docs:
        write_docs(table, png)
        print("updated docs/performance.md and docs/performance.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
