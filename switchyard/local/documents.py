"""Local mode's inputs: RoutePolicy documents, ClientKeys documents (any: client keys are
required) and one optional LocalGateway document.

``switchyard up -f PATH`` reads every ``*.yaml``/``*.yml`` file under each PATH. A
``LocalGateway`` document sets ports, the fail mode and the demo upstreams to start.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from switchyard.api.v1 import routing_pb2 as pb
from switchyard.operator.clientkeys import (
    ClientKeysSpec,
    compile_client_keys,
    compile_jwt,
    compile_store,
    compile_tenant_limits,
    parse_client_keys,
    wants_local_redis,
)
from switchyard.operator.policy import PolicyError, RoutePolicy, load_documents, parse_policy


class _Doc(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class DemoUpstream(_Doc):
    name: str
    port: int = Field(ge=1, le=65535)
    latency_ms: float = Field(default=0, ge=0)
    failure_rate: float = Field(default=0, ge=0, le=1)


class Tracing(_Doc):
    """OpenTelemetry traces; the OTEL_* environment variables override each field."""

    otlp_endpoint: str = Field(
        default="", description="OTLP/gRPC collector, host:port or http(s)://host:port; empty: off"
    )
    sampling_ratio: float = Field(default=1.0, ge=0, le=1, description="share of requests traced")
    service_name: str = Field(default="switchyard", min_length=1)
    jaeger: bool = Field(
        default=False,
        description="run a local Jaeger (switchyard up --jaeger) and export to it; "
        "otlpEndpoint must then be empty",
    )
    jaeger_port: int = Field(
        default=16686, ge=0, le=65535, description="the local Jaeger's query API/UI port; 0: free"
    )

    @model_validator(mode="after")
    def _one_destination(self) -> Tracing:
        if self.jaeger and self.otlp_endpoint:
            raise ValueError("jaeger: true exports to the local Jaeger; leave otlpEndpoint empty")
        return self


class LocalGatewaySpec(_Doc):
    listen_address: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    admin_port: int = Field(default=9901, ge=1, le=65535)
    extproc_port: int = Field(default=9002, ge=1, le=65535)
    extproc_transport: Literal["unix", "tcp"] = Field(
        default="unix",
        description="unix: Envoy reaches the workers on Unix sockets in the state directory "
        "(less CPU per request than loopback TCP); tcp: on extprocPort and up",
    )
    extproc_workers: int = Field(default=0, ge=0, description="0: one per CPU core but one")
    metrics_port: int = Field(
        default=0, ge=0, le=65535, description="ext_proc Prometheus /metrics port; 0: off"
    )
    control_plane_metrics_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="control plane Prometheus /metrics port (the operator's series); 0: off",
    )
    envoy_concurrency: int = Field(default=0, ge=0, description="0: one per CPU core")
    fail_open_model: str = Field(
        default="", description="Model served when the ext_proc is down; empty answers 503."
    )
    max_request_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    extproc_timeout_ms: int = Field(default=500, ge=10)
    demo_upstreams: list[DemoUpstream] = Field(default_factory=list)
    tls_dir: str = Field(
        default="",
        description="mTLS between Envoy, the ext_proc and the control plane with the "
        "certificates in this directory (tls.crt, tls.key, ca.crt; the certificate names "
        "localhost and 127.0.0.1, for server and client use); empty: plaintext",
    )
    tracing: Tracing = Field(default_factory=Tracing)


class LocalGateway(_Doc):
    api_version: Literal["switchyard.dev/v1alpha1"]
    kind: Literal["LocalGateway"]
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: LocalGatewaySpec = Field(default_factory=LocalGatewaySpec)


@dataclass(frozen=True)
class LocalInputs:
    policies: list[RoutePolicy]
    gateway: LocalGatewaySpec
    files: list[Path]
    client_keys: list[pb.ClientKey] | None = None
    """Every ClientKeys document's keys, compiled; None: no such document (authentication off)."""
    tenant_limits: list[pb.TenantLimits] = field(default_factory=list)
    """The ClientKeys documents' tenants' budgets and rate limits."""
    limit_store: pb.LimitStore | None = None
    """Their ``spec.store`` (None: none)."""
    jwt: pb.JwtAuth | None = None
    """Their ``spec.jwt`` with the tenants a token may name (None: none)."""
    local_redis: bool = False
    """A document asks for a local redis-server (``store.redis: local``)."""

    def compile_kwargs(self) -> dict[str, Any]:
        """What ``compile_config`` takes from the ClientKeys documents."""
        return {
            "client_keys": self.client_keys,
            "tenant_limits": self.tenant_limits,
            "limit_store": self.limit_store,
            "jwt": self.jwt,
        }


def policy_files(paths: list[str]) -> list[Path]:
    """Every YAML file named, or directly in a directory named (as ``kubectl apply -f DIR``:
    subdirectories are not read, so ``examples/tenants/`` is not part of ``-f examples/``),
    sorted."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
        elif path.exists():
            files.append(path)
        else:
            raise PolicyError(f"{raw}: no such file or directory")
    return sorted(files)


def load_inputs(paths: list[str]) -> LocalInputs:
    """Read and validate everything; raise PolicyError naming the file and field."""
    files = policy_files(paths)
    policies: list[RoutePolicy] = []
    gateway: LocalGatewaySpec | None = None
    seen: dict[str, Path] = {}
    key_specs: list[ClientKeysSpec] = []
    for file in files:
        for doc in load_documents(file.read_text(encoding="utf-8"), str(file)):
            kind = doc.get("kind")
            if kind == "LocalGateway":
                if gateway is not None:
                    raise PolicyError(f"{file}: only one LocalGateway document is allowed")
                try:
                    gateway = LocalGateway.model_validate(doc).spec
                except ValidationError as exc:
                    raise PolicyError(f"{file}: invalid LocalGateway\n{exc}") from None
            elif kind == "RoutePolicy":
                policy = parse_policy(doc, str(file))
                if policy.key in seen:
                    raise PolicyError(
                        f"{file}: RoutePolicy {policy.key} is also defined in {seen[policy.key]}"
                    )
                seen[policy.key] = file
                policies.append(policy)
            elif kind == "ClientKeys":
                key_specs.append(parse_client_keys(doc, str(file)))
            else:
                raise PolicyError(
                    f"{file}: unsupported kind {kind!r} (RoutePolicy, ClientKeys, LocalGateway)"
                )
    return LocalInputs(
        policies=policies,
        gateway=gateway or LocalGatewaySpec(),
        files=files,
        client_keys=compile_client_keys(key_specs) if key_specs else None,
        tenant_limits=compile_tenant_limits(key_specs),
        limit_store=compile_store(key_specs),
        jwt=compile_jwt(key_specs),
        local_redis=wants_local_redis(key_specs),
    )
