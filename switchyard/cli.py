"""The `switchyard` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys

EXECUTION_PROVIDERS = ("auto", "cpu", "cuda")
EXECUTION_PROVIDER_ENV = "SWITCHYARD_EXECUTION_PROVIDER"
TLS_DIR_ENV = "SWITCHYARD_TLS_DIR"  # switchyard.tls.TLS_DIR_ENV (not imported: it loads grpc)
OUTCOMES_DIR_ENV = "SWITCHYARD_OUTCOMES_DIR"  # switchyard.extproc.recording.OUTCOMES_DIR_ENV
GATEWAY_URL_ENV = "SWITCHYARD_GATEWAY_URL"  # switchyard.extproc.shadow.GATEWAY_URL_ENV


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `switchyard` console script."""
    parser = argparse.ArgumentParser(prog="switchyard", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run the local gateway (Envoy + ext_proc + demo upstreams)")
    up.add_argument("-f", "--file", action="append", required=True, help="policy file or folder")
    up.add_argument("--port", type=int, default=None, help="gateway listen port (overrides file)")
    up.add_argument("--state-dir", default=".switchyard", help="where generated config lives")
    up.add_argument(
        "--jaeger",
        action="store_true",
        help="run a local Jaeger (built from the Go module proxy on first use, or "
        "$SWITCHYARD_JAEGER) and trace every request into it (LocalGateway spec.tracing.jaeger)",
    )

    traces = sub.add_parser(
        "traces", help="print the last requests as span trees, from Jaeger's query API"
    )
    traces.add_argument("--last", type=int, default=5, help="how many requests (default 5)")
    traces.add_argument(
        "--jaeger",
        default="",
        help="Jaeger's query URL (default: the one `switchyard up --jaeger` runs with "
        "--state-dir, else http://127.0.0.1:16686)",
    )
    traces.add_argument(
        "--service", default="switchyard", help="service name of the gateway's spans"
    )
    traces.add_argument("--state-dir", default=".switchyard", help="`switchyard up`'s state dir")

    extproc = sub.add_parser("extproc", help="run ext_proc worker processes")
    extproc.add_argument(
        "--config",
        required=True,
        help="routing.pb file to watch, or grpc://host:port of the config stream",
    )
    extproc.add_argument(
        "--listen",
        required=True,
        help="first worker's host:port (the next workers take the next ports), or unix:PATH "
        "(worker i listens on PATH.i)",
    )
    extproc.add_argument("--workers", type=int, default=1)
    extproc.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="serve Prometheus /metrics and the /healthz and /readyz probes here (0: off)",
    )
    extproc.add_argument(
        "--execution-provider",
        choices=EXECUTION_PROVIDERS,
        default=os.environ.get(EXECUTION_PROVIDER_ENV, "cpu"),
        help=f"where router bundles run (default: ${EXECUTION_PROVIDER_ENV} or cpu); auto: CUDA "
        "for encoder bundles when available; CUDA without a GPU falls back to CPU with a warning",
    )
    extproc.add_argument(
        "--tls-dir",
        default=os.environ.get(TLS_DIR_ENV, ""),
        help=f"serve mTLS (and use it for the config stream) with tls.crt, tls.key and ca.crt "
        f"in this directory (default: ${TLS_DIR_ENV}; '' = plaintext)",
    )

    extproc.add_argument(
        "--outcomes-dir",
        default=os.environ.get(OUTCOMES_DIR_ENV, ""),
        help=f"where requests of policies with spec.outcomes.record and POST /v1/feedback are "
        f"recorded (default: ${OUTCOMES_DIR_ENV}; '' = nowhere)",
    )
    extproc.add_argument(
        "--gateway-url",
        default=os.environ.get(GATEWAY_URL_ENV, ""),
        help=f"the gateway's Envoy listener (http://host:port), where shadow evaluation "
        f"(spec.outcomes.shadow) sends its requests (default: ${GATEWAY_URL_ENV}; '' = off)",
    )

    outcomes = sub.add_parser("outcomes", help="recorded requests and feedback")
    outcomes_sub = outcomes.add_subparsers(dest="outcomes_command", required=True)
    export = outcomes_sub.add_parser(
        "export", help="join a recording directory into outcome records (JSONL on stdout)"
    )
    export.add_argument("dir", help="the ext_proc's outcomes directory")

    demo = sub.add_parser("demo-upstream", help="run one OpenAI-compatible demo model server")
    demo.add_argument("--name", required=True)
    demo.add_argument("--port", type=int, required=True)
    demo.add_argument("--latency-ms", type=float, default=0.0)
    demo.add_argument("--failure-rate", type=float, default=0.0)
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on")
    demo.add_argument("--tls-cert", help="serve https with this certificate chain (PEM)")
    demo.add_argument("--tls-key", help="... and this private key (PEM)")

    op = sub.add_parser("operator", help="run the Kubernetes operator (kopf) and its xDS server")
    op.add_argument("--xds-listen", default="0.0.0.0:18000", help="ADS + config stream address")
    op.add_argument("--gateway-port", type=int, default=8080, help="port Envoy listens on")
    op.add_argument(
        "--extproc", action="append", default=[], help="ext_proc host:port (repeatable)"
    )
    op.add_argument(
        "--extproc-service",
        default="",
        help="the ext_proc Service in --data-plane-namespace: its ready pods reach Envoy over "
        "EDS (instead of --extproc)",
    )
    op.add_argument(
        "--extproc-port", type=int, default=9002, help="first worker's port (--extproc-service)"
    )
    op.add_argument(
        "--extproc-workers",
        type=int,
        default=1,
        help="workers per ext_proc pod; worker i listens on --extproc-port + i",
    )
    op.add_argument(
        "--health-listen", default="", help="host:port serving GET /healthz (liveness); '' = off"
    )
    op.add_argument(
        "--metrics-listen", default="", help="host:port serving Prometheus GET /metrics; '' = off"
    )
    op.add_argument("--namespace", action="append", default=[], help="watch only these")
    op.add_argument("--fail-open-model", default="", help="model served when ext_proc is down")
    op.add_argument(
        "--data-plane-namespace", default="", help="namespace of the gateway/ext_proc (HPA, PDB)"
    )
    op.add_argument("--gateway-deployment", default="switchyard-gateway")
    op.add_argument("--extproc-deployment", default="switchyard-extproc")
    op.add_argument(
        "--cluster-name", default="local", help="this cluster's name (multi-cluster status)"
    )
    op.add_argument(
        "--region", default="", help="this cluster's region (for models' region constraints)"
    )
    op.add_argument(
        "--upstream-ca-file",
        default="",
        help="system CA bundle path inside the gateway Envoy (verifies https backends)",
    )
    op.add_argument(
        "--otlp-endpoint",
        default="",
        help="OTLP/gRPC collector (host:port or http(s)://host:port) Envoy exports traces to; "
        "'' = no tracing",
    )
    op.add_argument(
        "--trace-sampling", type=float, default=1.0, help="share of requests traced, 0..1"
    )
    op.add_argument("--trace-service-name", default="switchyard", help="service of Envoy's spans")
    op.add_argument(
        "--tls-dir",
        default="",
        help="mTLS on the xDS/config stream port and from Envoy to the ext_proc, with tls.crt, "
        "tls.key and ca.crt in this directory; '' = plaintext",
    )
    op.add_argument(
        "--gateway-sds-dir",
        default="/etc/envoy",
        help="where the gateway Envoy finds its SDS files (sds-certificate.json, sds-ca.json)",
    )
    op.add_argument(
        "--extproc-server-name",
        default="",
        help="DNS name Envoy expects in the ext_proc's certificate (and sends as SNI); default: "
        "<extproc-service>.<data-plane-namespace>.svc, or localhost",
    )

    op.add_argument(
        "--refit-image",
        default="",
        help="image of router refit Jobs (the ext_proc's); '' = policies cannot refit",
    )
    op.add_argument("--refit-image-pull-policy", default="IfNotPresent")
    op.add_argument(
        "--refit-outcomes-claim",
        default="",
        help="PersistentVolumeClaim in --data-plane-namespace holding the outcome records",
    )
    op.add_argument(
        "--refit-bundles-claim",
        default="",
        help="PersistentVolumeClaim in --data-plane-namespace holding the router bundles (the "
        "ext_proc's, mounted writable in refit Jobs)",
    )
    op.add_argument("--refit-outcomes-dir", default="/var/lib/switchyard/outcomes")
    op.add_argument(
        "--refit-bundles-dir",
        default="/var/lib/switchyard/bundles",
        help="where the bundles claim is mounted, in refit Jobs and ext_proc pods alike",
    )
    op.add_argument("--refit-resources", default="", help="refit container resources, as JSON")
    op.add_argument("--refit-deadline", type=int, default=3600, help="seconds a refit Job may run")
    op.add_argument(
        "--refit-poll-seconds",
        type=float,
        default=15.0,
        help="how often finished refit Jobs are looked for",
    )
    op.add_argument(
        "--spend-interval",
        type=float,
        default=15.0,
        help="seconds between reads of the budget counters in Redis (SWITCHYARD_REDIS_URL) "
        "for the ClientKeys spend status; 0: never",
    )

    keys = sub.add_parser("keys", help="client API keys (ClientKeys documents)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    keys_sub.add_parser("hash", help="read a key from stdin, print its sha256 (what is stored)")
    new = keys_sub.add_parser("new", help="generate a key; print it once and its YAML entry")
    new.add_argument("--tenant", required=True, help="the tenant the key belongs to")
    new.add_argument("--name", default="", help="the key's name (default: <tenant>-<random>)")

    from switchyard.training.loop_cli import add_simulate_parser

    add_simulate_parser(sub)

    router = sub.add_parser(
        "router", help="router model tools (score, eval, fit, calibrate)", add_help=False
    )
    router.add_argument("rest", nargs=argparse.REMAINDER)

    args = parser.parse_args(argv)
    if args.command == "up":
        from switchyard.local.runner import run_local

        return run_local(args.file, port=args.port, state_dir=args.state_dir, jaeger=args.jaeger)
    if args.command == "keys":
        return _keys(args)
    if args.command == "outcomes":
        return _export_outcomes(args.dir)
    if args.command == "traces":
        from pathlib import Path

        from switchyard.local.jaeger import running_url
        from switchyard.traces import DEFAULT_URL, run_traces

        if args.last < 1:
            traces.error(f"--last {args.last}: expected 1 or more")
        url = args.jaeger or running_url(Path(args.state_dir)) or DEFAULT_URL
        return run_traces(url, args.service, args.last)
    if args.command == "extproc":
        from switchyard.extproc.server import run_workers

        if args.tls_dir:
            from switchyard.tls import TlsFiles

            try:
                TlsFiles.from_dir(args.tls_dir).check()
            except FileNotFoundError as exc:
                extproc.error(str(exc))
            # The worker processes (spawned) read it from their environment.
            os.environ[TLS_DIR_ENV] = args.tls_dir
        if args.outcomes_dir:
            os.environ[OUTCOMES_DIR_ENV] = os.path.abspath(args.outcomes_dir)
        else:
            os.environ.pop(OUTCOMES_DIR_ENV, None)
        if args.gateway_url:
            from switchyard.extproc.shadow import secret_from_environment

            os.environ[GATEWAY_URL_ENV] = args.gateway_url
            secret_from_environment()  # one marker secret, inherited by every worker
        else:
            os.environ.pop(GATEWAY_URL_ENV, None)

        if args.execution_provider not in EXECUTION_PROVIDERS:  # argparse skips the default
            extproc.error(
                f"{EXECUTION_PROVIDER_ENV}={args.execution_provider!r}: "
                f"choose from {', '.join(EXECUTION_PROVIDERS)}"
            )
        return run_workers(
            args.config, args.listen, args.workers, args.metrics_port, args.execution_provider
        )
    if args.command == "demo-upstream":
        from switchyard.demo.upstream import run_demo_upstream

        return run_demo_upstream(
            args.name,
            args.port,
            args.latency_ms,
            args.failure_rate,
            args.host,
            (args.tls_cert, args.tls_key) if args.tls_cert else None,
        )
    if args.command == "operator":
        from switchyard.operator.k8s import OperatorSettings, run_operator
        from switchyard.operator.refit import RefitSettings
        from switchyard.operator.tracing import collector_address

        if not 0.0 <= args.trace_sampling <= 1.0:
            op.error(f"--trace-sampling {args.trace_sampling}: expected 0..1")
        if args.otlp_endpoint:
            try:
                collector_address(args.otlp_endpoint)
            except ValueError as exc:
                op.error(str(exc))

        endpoints = [
            (host, int(port)) for host, _, port in (e.rpartition(":") for e in args.extproc)
        ]
        return run_operator(
            OperatorSettings(
                xds_listen=args.xds_listen,
                gateway_port=args.gateway_port,
                extproc_endpoints=endpoints or [("127.0.0.1", 9002)],
                namespaces=args.namespace,
                fail_open_model=args.fail_open_model,
                data_plane_namespace=args.data_plane_namespace,
                gateway_deployment=args.gateway_deployment,
                extproc_deployment=args.extproc_deployment,
                cluster_name=args.cluster_name,
                region=args.region,
                upstream_ca_file=args.upstream_ca_file,
                extproc_service=args.extproc_service,
                extproc_port=args.extproc_port,
                extproc_workers=args.extproc_workers,
                health_listen=args.health_listen,
                metrics_listen=args.metrics_listen,
                otlp_endpoint=args.otlp_endpoint,
                trace_sampling=args.trace_sampling,
                trace_service_name=args.trace_service_name,
                tls_dir=args.tls_dir,
                gateway_sds_dir=args.gateway_sds_dir,
                extproc_server_name=args.extproc_server_name,
                refit=RefitSettings(
                    namespace=args.data_plane_namespace,
                    image=args.refit_image,
                    pull_policy=args.refit_image_pull_policy,
                    outcomes_claim=args.refit_outcomes_claim,
                    bundles_claim=args.refit_bundles_claim,
                    outcomes_dir=args.refit_outcomes_dir.rstrip("/"),
                    bundles_dir=args.refit_bundles_dir.rstrip("/"),
                    resources=json.loads(args.refit_resources) if args.refit_resources else {},
                    deadline_s=args.refit_deadline,
                ),
                refit_poll_s=args.refit_poll_seconds,
                spend_interval_s=args.spend_interval,
            )
        )
    if args.command == "simulate":
        from switchyard.training.loop_cli import cmd_simulate

        return cmd_simulate(args, sys.stdout)
    if args.command == "router":
        from switchyard.extproc.router.cli import main as router_main

        return router_main(args.rest)
    return 2


def _export_outcomes(directory: str) -> int:
    from pathlib import Path

    from switchyard.training.outcomes import OutcomeError, join_recording

    try:
        joined = join_recording(Path(directory))
    except OutcomeError as exc:
        print(f"switchyard outcomes export: error: {exc}", file=sys.stderr)
        return 1
    out = sys.stdout.buffer
    for record in joined.records:
        out.write(record)
    out.flush()
    print(joined.summary(), file=sys.stderr)
    return 0


def _keys(args: argparse.Namespace) -> int:
    import secrets

    from switchyard.operator.clientkeys import hash_key, new_key

    if args.keys_command == "hash":
        key = sys.stdin.readline().strip()
        if not key:
            print("switchyard: no key on stdin", file=sys.stderr)
            return 1
        print(hash_key(key))
        return 0
    key = new_key()
    name = args.name or f"{args.tenant}-{secrets.token_hex(3)}"
    print(f"# the key (shown once; give it to the client): {key}")
    print(f"- name: {name}\n  tenant: {args.tenant}\n  sha256: {hash_key(key)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
