"""Benchmark: Envoy direct vs Envoy + ext_proc routing, same instant upstream, same run.

Run with `make bench-gateway`. Starts an instant upstream (an Envoy that reads each request
and answers with a fixed chat completion), an Envoy proxy with no ext_proc in front of it
("envoy direct"), and `switchyard up` (Envoy + ext_proc workers + classifier routing with the
trained router) in front of the same upstream. wrk then runs against both, alternating, with
the same settings and a warm-up before each run. Prints per run requests/s, p50/p99, the CPU
steal and the CPU other processes used meanwhile (from /proc/stat), and the CPU per request of
each component; then the throughput ratio and the added p50 at 16 and at 1 connection.

With the floor on (the default), a third setup runs in every 16-connection round: the same
gateway Envoy config with a Go ext_proc that does nothing but return the routing metadata
(tests/bench/noop_extproc). It shows what Envoy's ext_proc machinery costs on its own, i.e.
the best throughput any external processor could reach here.

wrk is closed-loop: at 16 connections both setups run saturated, so their p50 is mostly queueing.
The added latency of routing is therefore also measured open-loop with vegeta: the same fixed
request rate (`--rate`, below what either setup saturates at) against both, so the difference in
p50/p99 is what the ext_proc hop adds to a request, not a queue. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from gateway_harness import Gateway, descendants, start_gateway

from switchyard.headers import METADATA_NAMESPACE
from switchyard.local.control import LocalControlPlane
from switchyard.local.ports import free_port_block
from switchyard.local.runner import envoy_binary, port_open, wait_until
from switchyard.operator.compiler import compile_config
from switchyard.operator.envoy_config import GatewaySettings
from switchyard.operator.policy import parse_policy

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


def request_body(model: str = "auto") -> str:
    """The benchmark's chat request, naming ``model``."""
    return json.dumps({"model": model, "messages": [{"role": "user", "content": PROMPT}]})


def rss_mib(pids: list[int]) -> float:
    """Resident memory of ``pids`` together, MiB (a process gone meanwhile counts 0)."""
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        total += int(match.group(1)) if match else 0
    return total / 1024


class RssPeak:
    """The peak of :func:`rss_mib` for each component, polled every 0.2 s in a thread while the
    ``with`` block runs (memory under load)."""

    def __init__(self, components: dict[str, list[int]]) -> None:
        self.components = components
        self.peak = dict.fromkeys(components, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while True:
            for name, pids in self.components.items():
                self.peak[name] = max(self.peak[name], rss_mib(pids))
            if self._stop.wait(0.2):
                return

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


_BUFFER = {
    "name": "envoy.filters.http.buffer",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
        "max_request_bytes": 1 << 20,
    },
}


def _listener(
    name: str, port: int, route: dict[str, object], read_body: bool = False
) -> dict[str, object]:
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
            *([_BUFFER] if read_body else []),
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
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


def start_envoy(config_path: str, concurrency: int) -> subprocess.Popen[bytes]:
    """Envoy on ``config_path``, quiet, with ``concurrency`` worker threads."""
    return subprocess.Popen(
        [
            envoy_binary(),
            "-c",
            config_path,
            "--use-dynamic-base-id",
            "-l",
            "error",
            "--concurrency",
            str(concurrency),
        ],
    )


@contextmanager
def envoy(
    config: dict[str, object], concurrency: int, port: int
) -> Iterator[subprocess.Popen[bytes]]:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(config, handle)
    proc = start_envoy(handle.name, concurrency)
    try:
        wait_until(lambda: port_open("127.0.0.1", port), 30, "envoy")
        yield proc
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
                    # Answer after reading the whole request, as a model server does: a reply
                    # sent while a chunked body is still arriving closes the connection.
                    read_body=True,
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


def bench_policy(upstream_port: int, bundle: str) -> dict[str, object]:
    """A classifier policy whose three models share the instant upstream."""
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
    return {
        "apiVersion": "switchyard.dev/v1alpha1",
        "kind": "RoutePolicy",
        "metadata": {"name": "bench", "namespace": "default"},
        "spec": {
            "match": {"models": ["auto"]},
            "models": models,
            "strategy": {"type": "classifier", "tiers": tiers, "router": {"bundle": bundle}},
        },
    }


@contextmanager
def gateway(
    directory: Path, policy: dict[str, object], workers: int, concurrency: int, **spec: object
) -> Iterator[Gateway]:
    """`switchyard up` serving ``policy`` (``spec``: more LocalGateway fields)."""
    running = start_gateway(
        directory, policy, extprocWorkers=workers, envoyConcurrency=concurrency, **spec
    )
    try:
        yield running
    finally:
        running.stop()


def noop_extproc_binary() -> str:
    """The Go no-op ext_proc (tests/bench/noop_extproc) that `make bench-gateway` builds."""
    path = Path.home() / ".cache" / "switchyard" / "bin" / "noop-extproc"
    if not path.exists():
        raise SystemExit("noop-extproc not built: run `make bench-gateway` (needs Go)")
    return str(path)


@contextmanager
def noop_gateway(
    directory: Path, policy: dict[str, object], concurrency: int
) -> Iterator[tuple[str, dict[str, list[int]]]]:
    """The gateway's own Envoy config for ``policy``, but with the no-op ext_proc behind it.

    Yields the chat-completions URL and the processes by role. Every request is routed to the
    policy's first model, as the real gateway routes the benchmark prompt.
    """
    config = compile_config([parse_policy(policy)])
    socket_path = directory / "noop.sock"
    port = free_port_block(2)
    admin = port + 1
    settings = GatewaySettings(listen_port=port, extproc_endpoints=[(f"unix:{socket_path}", 0)])
    control = LocalControlPlane(settings)
    control.start(config)
    backend = config.policies[0].models[0].backend_key
    noop = subprocess.Popen([noop_extproc_binary(), str(socket_path), METADATA_NAMESPACE, backend])
    proxy = start_envoy(str(control.write_bootstrap(directory, admin)), concurrency)
    try:
        wait_until(lambda: socket_path.exists() and port_open("127.0.0.1", port), 30, "no-op")
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        yield url, {"gateway envoy": [proxy.pid], "no-op ext_proc": [noop.pid]}
    finally:
        for child in (proxy, noop):
            child.terminate()
            child.wait()
        control.stop()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of one process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _runqueue_seconds(pid: int) -> float:
    """Time the threads of one process so far spent runnable but waiting for a CPU
    (/proc/PID/task/*/schedstat; threads that ended meanwhile are not counted)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError):
            continue
    return total / 1e9


def _cpu_jiffies() -> tuple[int, int, int]:
    """(busy, steal, total) jiffies of all CPUs so far."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = values[3] + values[4]
    return sum(values) - idle - values[7], values[7], sum(values)


def gateway_components(running: Gateway) -> dict[str, list[int]]:
    """The gateway's processes by role: its Envoy and its ext_proc workers."""
    roles: dict[str, list[int]] = {"gateway envoy": [], "ext_proc": []}
    for pid in descendants(running.process.pid):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if Path(cmdline[0].decode()).name == "envoy":
            roles["gateway envoy"].append(pid)
        elif b"extproc" in cmdline or b"multiprocessing" in b" ".join(cmdline):
            roles["ext_proc"].append(pid)
    return roles


def run_wrk(
    url: str,
    seconds: int,
    connections: int,
    components: dict[str, list[int]],
    model: str = "auto",
    headers: dict[str, str] | None = None,
    timeout_s: int = 2,
) -> dict[str, float]:
    """One wrk run: req/s, p50/p99 ms, steal %, CPU ms per request of each component
    (``cpu <name>``), its threads' ms per request runnable but waiting for a CPU (``wait
    <name>``: contention), its peak RSS in MiB meanwhile (``rss <name>``), and the requests wrk
    gave up on after ``timeout_s`` (``timeouts``, not in the latencies)."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT % request_body(model))
        for name, value in (headers or {}).items():
            script.write(f'wrk.headers["{name}"] = "{value}"\n')
    # Warm up (connections, ext_proc streams, Python caches), then measure.
    subprocess.run(
        ["wrk", "-t1", f"-c{connections}", "-d2s", "-s", script.name, url],
        check=True,
        capture_output=True,
    )
    cpu0 = {name: sum(map(_cpu_seconds, pids)) for name, pids in components.items()}
    wait0 = {name: sum(map(_runqueue_seconds, pids)) for name, pids in components.items()}
    wrk0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    jiffies0 = _cpu_jiffies()
    with RssPeak(components) as rss:
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", f"--timeout={timeout_s}s",
             "--latency", "-s", script.name, url],
            check=True,
            capture_output=True,
            text=True,
        ).stdout  # fmt: skip
    jiffies1 = _cpu_jiffies()
    wrk1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu1 = {name: sum(map(_cpu_seconds, pids)) for name, pids in components.items()}
    wait1 = {name: sum(map(_runqueue_seconds, pids)) for name, pids in components.items()}
    os.unlink(script.name)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non_2xx:
        raise RuntimeError(f"{url}: {non_2xx.group(1)} failed responses\n{out}")

    def ms(label: str) -> float:
        match = re.search(rf"{label}%\s+([\d.]+)(us|ms|s)", out)
        assert match, out
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    total = re.search(r"(\d+) requests in", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert total and rps, out
    requests = int(total.group(1))
    busy, steal, total = (b - a for a, b in zip(jiffies0, jiffies1, strict=True))
    wrk_cpu = wrk1.ru_utime + wrk1.ru_stime - wrk0.ru_utime - wrk0.ru_stime
    ours = sum(cpu1.values()) - sum(cpu0.values()) + wrk_cpu
    tick = os.sysconf("SC_CLK_TCK")
    result = {
        "rps": float(rps.group(1)),
        "p50": ms("50"),
        "p99": ms("99"),
        "steal": 100 * steal / max(1, total),
        # CPU used by processes outside this benchmark (other work on the machine).
        "others": max(0.0, 100 * (busy / tick - ours) / max(1, total / tick)),
        "timeouts": float(timeouts.group(1))
        if (timeouts := re.search(r"timeout (\d+)", out))
        else 0,
    }
    for name, seconds_used in [*((n, cpu1[n] - cpu0[n]) for n in cpu0), ("wrk", wrk_cpu)]:
        result[f"cpu {name}"] = 1000 * seconds_used / requests
    for name, peak in rss.peak.items():
        result[f"rss {name}"] = peak
    for name in wait0:
        result[f"wait {name}"] = 1000 * (wait1[name] - wait0[name]) / requests
    return result


def vegeta_binary() -> str:
    """vegeta from $PATH or where `make bench-gateway` installs it."""
    found = shutil.which("vegeta")
    cached = Path.home() / ".cache" / "switchyard" / "bin" / "vegeta"
    if found:
        return found
    if cached.exists():
        return str(cached)
    raise SystemExit("vegeta not found: run `make bench-gateway`, which installs it with Go")


def run_vegeta(
    url: str,
    rate: int,
    seconds: int,
    model: str = "auto",
    headers: dict[str, str] | None = None,
    strict: bool = True,
) -> dict[str, float]:
    """Open-loop: ``rate`` req/s for ``seconds`` (after a 2 s warm-up); p50/p99 ms, success
    (a fraction; with ``strict``, anything below 1 raises)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        handle.write(request_body(model))
    extra = "".join(f"{name}: {value}\n" for name, value in (headers or {}).items())
    target = f"POST {url}\nContent-Type: application/json\n{extra}@{handle.name}\n"
    report: dict[str, object] = {}
    for duration in (2, seconds):
        attack = subprocess.run(
            [vegeta_binary(), "attack", f"-rate={rate}/s", f"-duration={duration}s"],
            input=target.encode(),
            check=True,
            capture_output=True,
        ).stdout
        report = json.loads(
            subprocess.run(
                [vegeta_binary(), "report", "-type=json"],
                input=attack,
                check=True,
                capture_output=True,
            ).stdout
        )
    os.unlink(handle.name)
    if strict and report["success"] != 1:
        raise RuntimeError(f"{url}: failed requests at {rate} req/s: {report['status_codes']}")
    latencies = report["latencies"]
    assert isinstance(latencies, dict)
    return {
        "rate": float(str(report["rate"])),
        "p50": latencies["50th"] / 1e6,
        "p99": latencies["99th"] / 1e6,
        "success": float(str(report["success"])),
    }


def _row(name: str, r: dict[str, float]) -> str:
    cpu = ", ".join(f"{k[4:]} {v:.3f}" for k, v in r.items() if k.startswith("cpu "))
    return (
        f"{name:<18}{r['rps']:>8.0f}{r['p50']:>8.2f}{r['p99']:>8.2f}{r['steal']:>7.1f}"
        f"{r['others']:>8.1f}  "
        f"CPU ms/req: {cpu}"
    )


def _span(values: list[float], fmt: str) -> str:
    low, high = min(values), max(values)
    return format(low, fmt) if f"{low:{fmt}}" == f"{high:{fmt}}" else f"{low:{fmt}}-{high:{fmt}}"


def _ab(
    args: argparse.Namespace, setups: dict[str, dict[str, object]], title: str, base: str
) -> dict[str, list[dict[str, float]]]:
    """Gateways that differ only in ``setups`` (extra LocalGateway fields), ext_proc on TCP (as
    in Kubernetes), wrk against each in turn, ``rounds`` times; prints each run and, against
    ``base``, the throughput ratio and the ext_proc CPU added per request."""
    upstream_port = free_port_block()
    policy = bench_policy(upstream_port, args.bundle)
    urls: dict[str, tuple[str, dict[str, list[int]]]] = {}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in setups}
    with (
        envoy(instant_upstream(upstream_port), 1, upstream_port) as upstream,
        tempfile.TemporaryDirectory() as tmp,
        ExitStack() as stack,
    ):
        for name, extra in setups.items():
            directory = Path(tmp) / re.sub(r"\W", "_", name)
            directory.mkdir()
            running = stack.enter_context(
                gateway(directory, policy, args.workers, args.concurrency,
                        extprocTransport="tcp", **extra)
            )  # fmt: skip
            parts = {**gateway_components(running), "upstream": [upstream.pid]}
            urls[name] = (f"{running.base_url}/chat/completions", parts)
        workers = len(next(iter(urls.values()))[1]["ext_proc"])
        for _ in range(args.rounds):
            for name, (url, parts) in urls.items():
                runs[name].append(run_wrk(url, args.seconds, args.connections, parts))
    print(
        f"\n{title}: wrk 1 thread, {args.connections} connections, {args.seconds}s per run after "
        f"a 2s warm-up, {os.cpu_count()} cores; Envoy --concurrency {args.concurrency}, "
        f"{workers} ext_proc worker(s) on TCP, router {args.bundle}"
    )
    print(f"{'setup':<18}{'req/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'steal%':>7}{'others%':>8}")
    for i in range(args.rounds):
        for name in setups:
            print(_row(name, runs[name][i]))
    for name in setups:
        if name == base:
            continue
        pairs = list(zip(runs[base], runs[name], strict=True))
        ratios = [b["rps"] / a["rps"] for a, b in pairs]
        extra_cpu = [b["cpu ext_proc"] - a["cpu ext_proc"] for a, b in pairs]
        envoy_cpu = [b["cpu gateway envoy"] - a["cpu gateway envoy"] for a, b in pairs]
        print(f"throughput ratio ({name} / {base}): {_span(ratios, '.3f')}")
        print(f"ext_proc CPU added per request by {name}: {_span(extra_cpu, '.3f')} ms")
        print(f"Envoy CPU added per request by {name}: {_span(envoy_cpu, '.3f')} ms")
    return runs


def tls_ab(args: argparse.Namespace) -> int:
    """Plaintext vs mTLS between Envoy, the ext_proc and the control plane."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "infra"))
    from certs import ThrowawayCA

    with tempfile.TemporaryDirectory() as tmp:
        tls_dir = ThrowawayCA.new().write_dir(Path(tmp) / "tls")
        setups: dict[str, dict[str, object]] = {"plaintext": {}, "mtls": {"tlsDir": str(tls_dir)}}
        _ab(args, setups, "plaintext vs mTLS", "plaintext")
    return 0


def tracing_ab(args: argparse.Namespace) -> int:
    """Tracing off, at 1 % and at 100 % sampling, each gateway exporting to its own local
    Jaeger (the product's ``tracing.jaeger``)."""
    setups: dict[str, dict[str, object]] = {"tracing off": {}}
    for ratio in (0.01, 1.0):
        setups[f"sampled {ratio:.0%}"] = {
            "tracing": {"jaeger": True, "jaegerPort": 0, "samplingRatio": ratio}
        }
    _ab(args, setups, "tracing off / 1 % / 100 %", "tracing off")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="direct/gateway pairs to run")
    parser.add_argument("--workers", type=int, default=0, help="ext_proc workers; 0: default")
    parser.add_argument("--concurrency", type=int, default=1, help="Envoy --concurrency (all)")
    parser.add_argument("--bundle", default="builtin:default", help="router bundle to score with")
    parser.add_argument(
        "--rate", type=int, default=1000, help="open-loop req/s for the added-latency runs"
    )
    parser.add_argument(
        "--no-floor",
        dest="floor",
        action="store_false",
        help="skip Envoy + the Go no-op ext_proc (the floor of any external processor)",
    )
    parser.add_argument(
        "--tls-ab",
        action="store_true",
        help="only compare the gateway with plaintext and with mTLS to its ext_proc (TCP)",
    )
    parser.add_argument(
        "--tracing-ab",
        action="store_true",
        help="only compare the gateway with tracing off, at 1 %% and at 100 %% sampling",
    )
    args = parser.parse_args()
    if args.tls_ab:
        return tls_ab(args)
    if args.tracing_ab:
        return tracing_ab(args)
    upstream_port, direct_port = free_port_block(), free_port_block()
    pairs: list[tuple[dict[str, float], dict[str, float]]] = []
    single: list[tuple[dict[str, float], dict[str, float]]] = []
    fixed: list[tuple[dict[str, float], dict[str, float]]] = []
    floors: list[dict[str, float]] = []
    policy = bench_policy(upstream_port, args.bundle)
    with (
        envoy(instant_upstream(upstream_port), 1, upstream_port) as upstream,
        envoy(direct_proxy(direct_port, upstream_port), args.concurrency, direct_port) as direct,
        tempfile.TemporaryDirectory() as tmp,
        gateway(Path(tmp), policy, args.workers, args.concurrency) as running,
        ExitStack() as stack,
    ):
        noop = (
            stack.enter_context(noop_gateway(Path(tmp) / "noop", policy, args.concurrency))
            if args.floor
            else None
        )
        direct_url = f"http://127.0.0.1:{direct_port}/v1/chat/completions"
        gateway_url = f"{running.base_url}/chat/completions"
        upstream_cpu = {"upstream": [upstream.pid]}
        direct_parts = {"proxy envoy": [direct.pid], **upstream_cpu}
        gateway_parts = {**gateway_components(running), **upstream_cpu}
        workers = len(gateway_parts["ext_proc"])
        # Alternating pairs, so drift in steal or load hits both setups alike.
        for connections, seconds, rounds, into in [
            (args.connections, args.seconds, args.rounds, pairs),
            (1, max(3, args.seconds // 2), 1, single),
        ]:
            for _ in range(rounds):
                into.append(
                    (
                        run_wrk(direct_url, seconds, connections, direct_parts),
                        run_wrk(gateway_url, seconds, connections, gateway_parts),
                    )
                )
                if noop and into is pairs:
                    noop_url, noop_parts = noop
                    floors.append(
                        run_wrk(noop_url, seconds, connections, {**noop_parts, **upstream_cpu})
                    )
        for _ in range(args.rounds):
            fixed.append(
                (
                    run_vegeta(direct_url, args.rate, args.seconds),
                    run_vegeta(gateway_url, args.rate, args.seconds),
                )
            )
    print(
        f"\nwrk 1 thread, {args.seconds}s per run after a 2s warm-up, {os.cpu_count()} cores; "
        f"Envoy --concurrency {args.concurrency} (all), {workers} ext_proc worker process(es) "
        f"(CPU counted over all), router {args.bundle}"
    )
    print(f"{'setup':<18}{'req/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'steal%':>7}{'others%':>8}")
    for label, runs in [(f"{args.connections} connections", pairs), ("1 connection", single)]:
        print(f"-- {label}")
        for i, (direct_run, routed) in enumerate(runs):
            print(_row("envoy direct", direct_run))
            print(_row("envoy + ext_proc", routed))
            if runs is pairs and floors:
                print(_row("envoy + no-op", floors[i]))
    ratios = [routed["rps"] / direct_run["rps"] for direct_run, routed in pairs]
    added = [routed["p50"] - direct_run["p50"] for direct_run, routed in pairs]
    added_1 = [routed["p50"] - direct_run["p50"] for direct_run, routed in single]
    print(f"throughput ratio (ext_proc / direct): {_span(ratios, '.2f')} over {len(pairs)} pairs")
    if floors:
        floor_ratios = [f["rps"] / d["rps"] for (d, _), f in zip(pairs, floors, strict=True)]
        ours = [r["rps"] / f["rps"] for (_, r), f in zip(pairs, floors, strict=True)]
        print(f"throughput ratio (no-op ext_proc / direct): {_span(floor_ratios, '.2f')}")
        print(f"throughput ratio (ext_proc / no-op ext_proc): {_span(ours, '.2f')}")
    print(f"added p50 at {args.connections} connections: {_span(added, '.2f')} ms")
    print(f"added p50 at 1 connection: {_span(added_1, '.2f')} ms")
    print(f"-- open loop (vegeta), {args.rate} req/s for {args.seconds}s after a 2s warm-up")
    print(f"{'setup':<18}{'req/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'ok %':>7}")
    for direct_run, routed in fixed:
        for name, r in [("envoy direct", direct_run), ("envoy + ext_proc", routed)]:
            ok = 100 * r["success"]
            print(f"{name:<18}{r['rate']:>8.0f}{r['p50']:>8.2f}{r['p99']:>8.2f}{ok:>7.1f}")
    added_fixed = [routed["p50"] - direct_run["p50"] for direct_run, routed in fixed]
    added_fixed_99 = [routed["p99"] - direct_run["p99"] for direct_run, routed in fixed]
    print(
        f"added at {args.rate} req/s: p50 {_span(added_fixed, '.2f')} ms, "
        f"p99 {_span(added_fixed_99, '.2f')} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
