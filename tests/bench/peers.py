"""The peers `make bench` runs Switchyard against, each in front of the same instant upstream.

- Envoy AI Gateway's ext_proc (github.com/envoyproxy/ai-gateway, ``cmd/extproc``) behind the
  same Envoy build as Switchyard, with the Envoy config its controller generates for an
  AIGatewayRoute (a router-level ext_proc filter that reads request and response headers and
  bodies, and an upstream-level one on each backend cluster that reads request headers) and
  its own filter config (one OpenAI backend per model, chosen by the model name in the body).
- LiteLLM's proxy (``litellm[proxy]``, pinned, in its own venv) with one deployment per model.

Each is a context manager that yields a :class:`System`: the URL to load, the processes to
count CPU and memory over, and the model name and headers its clients send.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from gateway_harness import descendants

from switchyard.local.ports import free_port_block
from switchyard.local.runner import port_open, wait_until

CACHE = Path.home() / ".cache" / "switchyard"
# Pinned peers; the Makefile builds/installs exactly these (keep both in step).
AIGW_VERSION = "v1.1.0"
LITELLM_VERSION = "1.108.5"
# AI Gateway's filter metadata namespace and the keys its Envoy config carries.
AIGW_NAMESPACE = "io.envoy.ai_gateway"
AIGW_XDS_NAMESPACE = "aigateway.envoy.io"
AIGW_MODEL_HEADER = "x-ai-eg-model"
# What `aigw (accounting)` puts in the filter metadata per request: the usage the response
# reports and a cost from it (a CEL expression with the model's prices), as Switchyard's
# tally counts tokens in/out and cost per answering model.
AIGW_ROUTE = "default/bench"
AIGW_COSTS = [
    {"metadataKey": "llm_input_token", "type": "InputToken", "routeName": AIGW_ROUTE},
    {"metadataKey": "llm_output_token", "type": "OutputToken", "routeName": AIGW_ROUTE},
    {"metadataKey": "llm_total_token", "type": "TotalToken", "routeName": AIGW_ROUTE},
]
LITELLM_MASTER_KEY = "sk-switchyard-bench"


@dataclass
class System:
    """One system under load: where to send requests and which processes are its own."""

    url: str
    components: dict[str, list[int]]
    model: str = "auto"
    headers: dict[str, str] = field(default_factory=dict)
    notes: str = ""


@dataclass(frozen=True)
class Model:
    """A model every peer routes by name to the shared upstream: its name and upstream name."""

    name: str
    upstream_model: str
    input_per_1m: float
    output_per_1m: float


def aigw_binary() -> str:
    """The AI Gateway ext_proc that `make bench` builds (``$AIGW_EXTPROC`` overrides)."""
    path = Path(
        os.environ.get("AIGW_EXTPROC") or CACHE / "bin" / f"ai-gateway-extproc-{AIGW_VERSION}"
    )
    if not path.exists():
        raise SystemExit(f"{path} not built: run `make bench` (needs Go)")
    return str(path)


def litellm_binary() -> str:
    """The `litellm` CLI from the venv `make bench` installs (``$LITELLM_BIN`` overrides)."""
    path = Path(
        os.environ.get("LITELLM_BIN") or CACHE / f"litellm-{LITELLM_VERSION}" / "bin" / "litellm"
    )
    if not path.exists():
        raise SystemExit(f"{path} not installed: run `make bench`")
    return str(path)


def _static_cluster(name: str, port: int, **extra: object) -> dict[str, object]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": port}
                                }
                            },
                            **extra,
                        }
                    ]
                }
            ],
        },
    }


_EXT_PROC = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
_AIGW_RECEIVING = {"receivingNamespaces": {"untyped": [AIGW_NAMESPACE]}}


def aigw_envoy_config(
    port: int, socket_path: Path, upstream_port: int, models: list[Model]
) -> dict[str, object]:
    """Envoy config as AI Gateway's controller writes it (internal/extensionserver), reduced to
    what a request meets: router-level ext_proc, routes on the model header, and per backend an
    upstream-level ext_proc and the content-length mutation before the upstream codec."""
    route_name = AIGW_ROUTE
    routes = [
        {
            "name": f"{route_name}/rule/{i}",
            "match": {
                "prefix": "/",
                "headers": [{"name": AIGW_MODEL_HEADER, "string_match": {"exact": m.name}}],
            },
            "route": {"cluster": f"aigw-{m.name}", "timeout": "60s"},
            "metadata": {"filter_metadata": {AIGW_XDS_NAMESPACE: {"aigw_route_name": route_name}}},
        }
        for i, m in enumerate(models)
    ]
    router_ext_proc = {
        "name": "envoy.filters.http.ext_proc/aigateway",
        "typed_config": {
            "@type": _EXT_PROC,
            "grpc_service": {"envoy_grpc": {"cluster_name": "aigw-extproc-uds"}},
            "metadata_options": _AIGW_RECEIVING,
            "processing_mode": {
                "request_header_mode": "SEND",
                "request_body_mode": "BUFFERED",
                "request_trailer_mode": "SKIP",
                "response_header_mode": "SEND",
                "response_body_mode": "BUFFERED",
                "response_trailer_mode": "SKIP",
            },
            "message_timeout": "10s",
            "failure_mode_allow": False,
            "allow_mode_override": True,
        },
    }
    upstream_filters = [
        {
            "name": "envoy.filters.http.ext_proc/aigateway",
            "typed_config": {
                "@type": _EXT_PROC,
                "grpc_service": {
                    "envoy_grpc": {"cluster_name": "aigw-extproc-uds"},
                    "timeout": "30s",
                },
                "metadata_options": _AIGW_RECEIVING,
                "allow_mode_override": True,
                "request_attributes": [
                    f"xds.upstream_host_metadata.filter_metadata['{AIGW_XDS_NAMESPACE}']"
                    "['per_route_rule_backend_name']",
                    f"xds.cluster_metadata.filter_metadata['{AIGW_XDS_NAMESPACE}']"
                    "['per_route_rule_backend_name']",
                    f"xds.upstream_host_metadata.filter_metadata['{AIGW_XDS_NAMESPACE}']"
                    "['upstream_host']",
                    f"xds.route_metadata.filter_metadata['{AIGW_XDS_NAMESPACE}']"
                    "['aigw_route_name']",
                ],
                "processing_mode": {
                    "request_header_mode": "SEND",
                    "request_body_mode": "NONE",
                    "response_header_mode": "SKIP",
                    "response_body_mode": "NONE",
                },
                "message_timeout": "10s",
            },
        },
        {
            "name": "envoy.filters.http.header_mutation",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3."
                "HeaderMutation",
                "mutations": {
                    "request_mutations": [
                        {
                            "append": {
                                "append_action": "ADD_IF_ABSENT",
                                "header": {
                                    "key": "content-length",
                                    "value": f"%DYNAMIC_METADATA({AIGW_NAMESPACE}:content_length)%",
                                },
                            }
                        }
                    ]
                },
            },
        },
        {
            "name": "envoy.filters.http.upstream_codec",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3."
                "UpstreamCodec"
            },
        },
    ]
    clusters: list[dict[str, object]] = []
    for m in models:
        cluster = _static_cluster(
            f"aigw-{m.name}",
            upstream_port,
            metadata={
                "filter_metadata": {AIGW_XDS_NAMESPACE: {"per_route_rule_backend_name": m.name}}
            },
        )
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                "HttpProtocolOptions",
                "explicit_http_config": {"http_protocol_options": {}},
                "http_filters": upstream_filters,
            }
        }
        clusters.append(cluster)
    clusters.append(
        {
            "name": "aigw-extproc-uds",
            "type": "STATIC",
            "connect_timeout": "10s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                    "HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            },
            "load_assignment": {
                "cluster_name": "aigw-extproc-uds",
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {"endpoint": {"address": {"pipe": {"path": str(socket_path)}}}}
                        ]
                    }
                ],
            },
        }
    )
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "aigw",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]},
        "http_filters": [
            router_ext_proc,
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
                    "suppress_envoy_headers": True,
                },
            },
        ],
    }
    listener = {
        "name": "aigw",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }
    return {"static_resources": {"listeners": [listener], "clusters": clusters}}


def aigw_filter_config(models: list[Model], accounting: bool) -> dict[str, object]:
    """AI Gateway's filterapi.Config: one OpenAI backend per model, with the upstream model
    name (``modelNameOverride``); with ``accounting``, request costs in the filter metadata."""
    config: dict[str, object] = {
        # The binary checks this against its own version: "dev" unless built with ldflags.
        "version": os.environ.get("AIGW_CONFIG_VERSION", "dev"),
        "backends": [
            {
                "name": m.name,
                "modelNameOverride": m.upstream_model,
                "schema": {"name": "OpenAI", "prefix": "v1"},
            }
            for m in models
        ],
        "models": [{"Name": m.name, "OwnedBy": "bench"} for m in models],
    }
    if accounting:
        prices = " ".join(
            f"model in ['{m.name}', '{m.upstream_model}'] ? "
            f"double(input_tokens) * {float(m.input_per_1m)!r} + "
            f"double(output_tokens) * {float(m.output_per_1m)!r} :"
            for m in models
        )
        config["llmRequestCosts"] = [
            *AIGW_COSTS,
            {
                "metadataKey": "llm_cost_micro_usd",
                "type": "CEL",
                "cel": f"uint({prices} 0.0)",
                "routeName": AIGW_ROUTE,
            },
        ]
    return config


def _post_ok(url: str, model: str, headers: dict[str, str]) -> bool:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "ping"}]})
    request = urllib.request.Request(
        url, body.encode(), {"Content-Type": "application/json", **headers}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@contextmanager
def aigw_gateway(
    directory: Path,
    upstream_port: int,
    models: list[Model],
    accounting: bool,
    concurrency: int,
    start_envoy: object,
) -> Iterator[System]:
    """Envoy + AI Gateway's ext_proc (on a Unix socket, as its sidecar runs) routing by model
    name to the instant upstream. ``start_envoy(config_path, concurrency)`` starts the Envoy."""
    directory.mkdir(parents=True, exist_ok=True)
    socket_path = directory / "aigw.sock"
    config_path = directory / "filter-config.yaml"
    config_path.write_text(yaml.safe_dump(aigw_filter_config(models, accounting)))
    port, admin = free_port_block(2), free_port_block()
    envoy_path = directory / "envoy.json"
    envoy_path.write_text(json.dumps(aigw_envoy_config(port, socket_path, upstream_port, models)))
    log = (directory / "extproc.log").open("wb")
    extproc = subprocess.Popen(
        [
            aigw_binary(),
            "-configPath",
            str(config_path),
            "-extProcAddr",
            f"unix://{socket_path}",
            "-adminPort",
            str(admin),
            "-logLevel",
            "warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        # Its pprof server listens on a fixed port (6060): off, so two instances can run.
        env={**os.environ, "DISABLE_PPROF": "1"},
    )
    assert callable(start_envoy)
    proxy: subprocess.Popen[bytes] = start_envoy(str(envoy_path), concurrency)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        wait_until(lambda: socket_path.exists() and port_open("127.0.0.1", port), 30, "aigw")
        wait_until(lambda: _post_ok(url, models[0].name, {}), 30, "aigw answers")
        yield System(
            url,
            {"gateway envoy": [proxy.pid], "ext_proc": [extproc.pid]},
            model=models[0].name,
        )
    finally:
        for child in (proxy, extproc):
            child.terminate()
            child.wait()
        log.close()


def litellm_config(upstream_port: int, models: list[Model]) -> dict[str, object]:
    """LiteLLM proxy config: one OpenAI-compatible deployment per model on the upstream, with
    the production settings its docs recommend that apply without a database."""
    return {
        "model_list": [
            {
                "model_name": m.name,
                "litellm_params": {
                    "model": f"openai/{m.upstream_model}",
                    "api_base": f"http://127.0.0.1:{upstream_port}/v1",
                    "api_key": "bench",
                    "input_cost_per_token": m.input_per_1m / 1e6,
                    "output_cost_per_token": m.output_per_1m / 1e6,
                },
            }
            for m in models
        ],
        # No json_logs: with it uvicorn logs every request (its access log) whatever LITELLM_LOG.
        "litellm_settings": {"set_verbose": False, "request_timeout": 600},
        "general_settings": {"master_key": LITELLM_MASTER_KEY},
    }


@contextmanager
def litellm_proxy(directory: Path, upstream_port: int, models: list[Model]) -> Iterator[System]:
    """LiteLLM's proxy with ``$LITELLM_WORKERS`` workers (default: one per core)."""
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / "litellm.yaml"
    config_path.write_text(yaml.safe_dump(litellm_config(upstream_port, models)))
    port = free_port_block()
    workers = int(os.environ.get("LITELLM_WORKERS") or os.cpu_count() or 1)
    log = (directory / "litellm.log").open("wb")
    env = {
        **os.environ,
        "LITELLM_LOG": "ERROR",
        "LITELLM_MASTER_KEY": LITELLM_MASTER_KEY,
        # No telemetry, no model-cost map download at start (nothing outside is reachable).
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_TELEMETRY": "False",
    }
    proc = subprocess.Popen(
        [
            litellm_binary(),
            "--config",
            str(config_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            str(workers),
            # uvicorn kills a worker that has not answered its supervisor within 5 s; importing
            # litellm takes longer than that on a loaded 2-core machine.
            "--timeout_worker_healthcheck",
            "120",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {LITELLM_MASTER_KEY}"}
    try:
        wait_until(lambda: _post_ok(url, models[0].name, headers), 300, "litellm answers")
        # Every worker answers before the load starts (each imports litellm on its own).
        for _ in range(4 * workers):
            _post_ok(url, models[0].name, headers)
        yield System(
            url,
            {"litellm": [proc.pid, *descendants(proc.pid)]},
            model=models[0].name,
            headers=headers,
            notes=f"{workers} workers",
        )
    finally:
        # Its own session: the proxy and every worker it spawned, whatever state they are in.
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(20)
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


def envoy_version(binary: str) -> str:
    """``envoy --version``'s version field (e.g. 1.40.0/Clean/RELEASE/BoringSSL)."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    return out.split("version:")[-1].strip().split()[0] if "version:" in out else out.strip()


def litellm_version() -> str:
    """The LiteLLM version installed in the bench venv."""
    python = Path(litellm_binary()).parent / "python"
    return subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
    ).stdout.strip()


def temporary_directory() -> tempfile.TemporaryDirectory[str]:
    """A scratch directory for one run's configs, sockets and logs."""
    return tempfile.TemporaryDirectory(prefix="switchyard-bench-")
