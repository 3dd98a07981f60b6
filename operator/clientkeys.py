"""ClientKeys documents: tenants and their clients' API keys (hashed), compiled into the
RoutingConfig's ``client_keys``.

A key's effective allowance is its own intersected with every tenant's up its chain
(user → project → team); an empty list allows anything. Only SHA-256 hashes are stored.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Iterable
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from switchyard.api.v1 import routing_pb2 as pb
from switchyard.operator.policy import PolicyError, SecretKeyRef

KEY_PREFIX = "sk-switchyard-"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
_HEX = re.compile(SHA256_PATTERN)
MAX_ALLOWED = 64
"""Entries of one allowance list."""
MAX_TENANTS = 256
MAX_KEYS = 1024
"""Per document (a ClientKeys resource): bounds that keep the CRD's CEL cost finite."""


class _Doc(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Allowance(_Doc):
    """What a tenant or key may use; an empty list allows anything."""

    policies: list[str] = Field(
        default_factory=list,
        max_length=MAX_ALLOWED,
        description="Aliases (the request's model field) it may send; empty: any.",
    )
    models: list[str] = Field(
        default_factory=list,
        max_length=MAX_ALLOWED,
        description="Models it may be routed to; empty: any.",
    )
    data_classes: list[str] = Field(
        default_factory=list,
        max_length=MAX_ALLOWED,
        description="Data classes (x-switchyard-data-class) it may send; empty: any.",
    )


PERIOD = r"^(day|month|[1-9][0-9]{0,3}[hd])$"
MAX_ROLLING_S = 366 * 86_400


def period_seconds(period: str) -> int:
    """A rolling period's length in seconds ("24h" → 86400); 0 for day and month."""
    if period in ("day", "month"):
        return 0
    return int(period[:-1]) * (3600 if period[-1] == "h" else 86_400)


class Budget(_Doc):
    """A spend budget in USD per period: ``day`` or ``month`` (UTC calendar), or a rolling
    window of hours or days (``24h``, ``7d``)."""

    usd: float = Field(gt=0, le=1e9, allow_inf_nan=False, description="USD per period")
    period: str = Field(
        pattern=PERIOD, description="day, month (UTC calendar) or rolling <N>h / <N>d"
    )

    @field_validator("period")
    @classmethod
    def _bounded(cls, value: str) -> str:
        if period_seconds(value) > MAX_ROLLING_S:
            raise ValueError("a rolling period is at most 366d")
        return value


class RateLimits(_Doc):
    requests_per_minute: int | None = Field(
        default=None, ge=1, le=10**9, description="Requests per minute (last 60 s, 10 s buckets)."
    )
    tokens_per_minute: int | None = Field(
        default=None,
        ge=1,
        le=10**12,
        description="Input plus output tokens per minute (output counted as the request ends).",
    )


class Limits(RateLimits):
    """Budgets and rate limits; every one up a key's tenant chain applies."""

    budgets: list[Budget] = Field(
        default_factory=list, max_length=8, description="Spend budgets in USD (one per period)."
    )
    per_model: dict[str, RateLimits] = Field(
        default_factory=dict, max_length=64, description="model name → its rate limits"
    )

    @field_validator("budgets")
    @classmethod
    def _distinct(cls, budgets: list[Budget]) -> list[Budget]:
        periods = [b.period for b in budgets]
        for i, period in enumerate(periods):
            if period in periods[:i]:
                raise ValueError(f"[{i}].period: {period!r} appears twice")
        return budgets


class Store(_Doc):
    """Where the counters of budgets and rate limits live (shared by every ext_proc replica)."""

    redis: Literal["local"] | None = Field(
        default=None, description="local: `switchyard up` runs a redis-server for them"
    )
    redis_url: str | None = Field(
        default=None, pattern=r"^(rediss?|unix)://\S+$", description="redis://host:port/db"
    )
    redis_url_from: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="environment variable of the ext_proc holding the Redis URL",
    )
    on_unavailable: Literal["open", "closed"] = Field(
        default="open",
        description="Redis unreachable: open admits (and counts it), closed answers 503",
    )
    timeout_ms: int = Field(default=50, ge=1, le=5000, description="deadline of a Redis call")

    @model_validator(mode="after")
    def _one_source(self) -> Store:
        given = [n for n in ("redis", "redis_url", "redis_url_from") if getattr(self, n)]
        if len(given) > 1:
            raise ValueError(f"set at most one of redis, redisUrl, redisUrlFrom (got {given})")
        return self


class Tenant(Allowance):
    """A team, project or user: what it allows bounds every key under it."""

    name: str = Field(min_length=1, max_length=63, description="Tenant name.")
    parent: str | None = Field(
        default=None,
        min_length=1,
        max_length=63,
        description="The tenant above (user → project → team), in the same document.",
    )
    limits: Limits | None = Field(
        default=None, description="Budgets and rate limits of this tenant (and all below it)."
    )


class ClientKey(Allowance):
    """One client API key, stored as its SHA-256."""

    name: str = Field(min_length=1, max_length=63, description="Key name (logs, traces).")
    tenant: str = Field(min_length=1, max_length=63, description="The tenant it belongs to.")
    sha256: str | None = Field(
        default=None,
        description="Lowercase hex SHA-256 of the key, never the key (switchyard keys hash).",
    )
    secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Kubernetes only: a Secret in this namespace holding the plain key; the "
        "operator hashes it (surrounding whitespace stripped) and only the hash is used",
    )
    expires_at: datetime | None = Field(
        default=None, description="RFC 3339 time with a zone; the key is refused after it."
    )
    revoked: bool = Field(default=False, description="Refuse the key (401).")
    limits: Limits | None = Field(default=None, description="Budgets and rate limits of this key.")

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str | None) -> str | None:
        if value is not None and not _HEX.match(value):
            raise ValueError("must be 64 lowercase hex characters (switchyard keys hash)")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ClientKey:
        if (self.sha256 is None) == (self.secret_ref is None):
            raise ValueError("set exactly one of sha256 or secretRef")
        return self

    @field_validator("expires_at")
    @classmethod
    def _zoned(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("needs a time zone (RFC 3339, e.g. 2027-01-01T00:00:00Z)")
        return value


CLAIM = r"^[A-Za-z_][A-Za-z0-9_.:/-]*$"
MAX_JWKS = 65_536


class Jwks(_Doc):
    """Where the keys verifying tokens come from: inline, or fetched by Envoy from ``uri``."""

    inline: str | None = Field(
        default=None,
        min_length=2,
        max_length=MAX_JWKS,
        description="The JWKS document (JSON, public keys).",
    )
    uri: str | None = Field(
        default=None,
        max_length=2048,
        pattern=r"^https?://[^/\s?#]+(/\S*)?$",
        description="URL of the issuer's JWKS (https, or http on a trusted network).",
    )
    timeout_ms: int = Field(default=2000, ge=100, le=30_000, description="deadline of a fetch")
    cache_s: int = Field(
        default=600, ge=10, le=86_400, description="how long a fetched JWKS is used"
    )

    @field_validator("inline")
    @classmethod
    def _jwks(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            doc = json.loads(value)
        except ValueError:
            raise ValueError('is not JSON (a JWKS: {"keys": [...]})') from None
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list) or not doc["keys"]:
            raise ValueError('needs a non-empty "keys" list (a JWKS)')
        if any(isinstance(k, dict) and "d" in k for k in doc["keys"]):
            raise ValueError('holds a private key ("d"); give only the public keys')
        return value

    @model_validator(mode="after")
    def _one_source(self) -> Jwks:
        if (self.inline is None) == (self.uri is None):
            raise ValueError("set exactly one of inline or uri")
        return self


class Jwt(_Doc):
    """Authentication delegated to JWTs: Envoy verifies them, ``tenantClaim`` names the
    tenant (in this document) whose allowance and limits apply."""

    issuer: str = Field(min_length=1, max_length=1024, description='The required "iss".')
    audiences: list[Annotated[str, Field(min_length=1, max_length=1024)]] = Field(
        default_factory=list, max_length=16, description='Accepted "aud" values; empty: any.'
    )
    jwks: Jwks = Field(description="The keys verifying signatures.")
    tenant_claim: str = Field(
        min_length=1,
        max_length=128,
        pattern=CLAIM,
        description="The claim whose value names the tenant (e.g. team).",
    )
    subject_claim: str = Field(
        default="sub",
        min_length=1,
        max_length=128,
        pattern=CLAIM,
        description="The claim naming the caller in metrics and traces (jwt:<value>).",
    )


class ClientKeysSpec(_Doc):
    tenants: list[Tenant] = Field(
        default_factory=list, max_length=MAX_TENANTS, description="Tenants (unique names)."
    )
    keys: list[ClientKey] = Field(
        default_factory=list, max_length=MAX_KEYS, description="Client keys (unique names)."
    )
    store: Store | None = Field(
        default=None,
        description="Where the counters of budgets and rate limits live (at most one document).",
    )
    jwt: Jwt | None = Field(
        default=None,
        description="Accept JWTs from this issuer, their tenant claim naming a tenant here "
        "(at most one document).",
    )


class ClientKeys(_Doc):
    api_version: Literal["switchyard.dev/v1alpha1"]
    kind: Literal["ClientKeys"]
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: ClientKeysSpec = Field(default_factory=ClientKeysSpec)


def parse_client_keys(doc: dict[str, Any], source: str) -> ClientKeysSpec:
    """Validate one ClientKeys document; PolicyError names the source and field."""
    try:
        return ClientKeys.model_validate(doc).spec
    except ValidationError as exc:
        raise PolicyError(f"{source}: invalid ClientKeys\n{exc}") from None


def hash_key(key: str) -> str:
    """The stored form of a client key."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random client key."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _merge(lists: Iterable[list[str]]) -> pb.AllowList | None:
    """Intersection of the non-empty lists; None when all are empty (anything)."""
    merged: set[str] | None = None
    for values in lists:
        if values:
            merged = set(values) if merged is None else merged & set(values)
    return None if merged is None else pb.AllowList(values=sorted(merged))


def compile_client_keys(specs: Iterable[ClientKeysSpec]) -> list[pb.ClientKey]:
    """Every document's keys with their allowances merged up the tenant chain, by name."""
    tenants: dict[str, Tenant] = {}
    keys: dict[str, ClientKey] = {}
    for spec in specs:
        for tenant in spec.tenants:
            if tenant.name in tenants:
                raise PolicyError(f"ClientKeys: tenant {tenant.name!r} is defined twice")
            tenants[tenant.name] = tenant
        for key in spec.keys:
            if key.name in keys:
                raise PolicyError(f"ClientKeys: key {key.name!r} is defined twice")
            keys[key.name] = key
    hashes: dict[str, str] = {}
    out = []
    for key in sorted(keys.values(), key=lambda k: k.name):
        if key.sha256 is None:
            raise PolicyError(
                f"ClientKeys: key {key.name!r}: secretRef is read by the Kubernetes operator; "
                "here give sha256 (switchyard keys hash)"
            )
        if key.sha256 in hashes:
            raise PolicyError(
                f"ClientKeys: keys {hashes[key.sha256]!r} and {key.name!r} have the same sha256"
            )
        hashes[key.sha256] = key.name
        chain = _chain(key, tenants)
        layers: list[Allowance] = [key, *chain]
        allowance = pb.Allowance()
        for field, merged in (
            ("aliases", _merge(a.policies for a in layers)),
            ("models", _merge(a.models for a in layers)),
            ("data_classes", _merge(a.data_classes for a in layers)),
        ):
            if merged is not None:
                getattr(allowance, field).CopyFrom(merged)
        out.append(
            pb.ClientKey(
                name=key.name,
                sha256=key.sha256,
                tenants=[t.name for t in chain],
                expires_at=int(key.expires_at.timestamp()) if key.expires_at else 0,
                revoked=key.revoked,
                allowance=allowance,
                limits=compile_limits(key.limits) if key.limits else None,
            )
        )
    return out


def compile_limits(limits: Limits) -> pb.ClientLimits:
    """One tenant's or key's limits in their compiled form."""
    return pb.ClientLimits(
        budgets=[
            pb.SpendBudget(usd=b.usd, period=b.period, window_s=period_seconds(b.period))
            for b in limits.budgets
        ],
        requests_per_minute=limits.requests_per_minute or 0,
        tokens_per_minute=limits.tokens_per_minute or 0,
        per_model={
            model: pb.ModelRateLimits(
                requests_per_minute=rates.requests_per_minute or 0,
                tokens_per_minute=rates.tokens_per_minute or 0,
            )
            for model, rates in limits.per_model.items()
        },
    )


LOCAL_REDIS_ENV = "SWITCHYARD_REDIS_URL"
"""The ext_proc's environment variable with the Redis URL: set by `switchyard up` for
``store.redis: local`` and by the Helm chart's ``limits.redisUrl``."""


def compile_tenant_limits(specs: Iterable[ClientKeysSpec]) -> list[pb.TenantLimits]:
    """Every tenant that has limits, by name."""
    found = [t for spec in specs for t in spec.tenants if t.limits is not None]
    return [
        pb.TenantLimits(tenant=t.name, limits=compile_limits(t.limits))
        for t in sorted(found, key=lambda t: t.name)
        if t.limits is not None
    ]


def compile_store(specs: Iterable[ClientKeysSpec]) -> pb.LimitStore | None:
    """The one ``spec.store`` among the documents (None: none set); two is an error."""
    stores = [spec.store for spec in specs if spec.store is not None]
    if len(stores) > 1:
        raise PolicyError("ClientKeys: spec.store is set in more than one document")
    if not stores:
        return None
    store = stores[0]
    return pb.LimitStore(
        redis_url=store.redis_url or "",
        redis_url_env=LOCAL_REDIS_ENV if store.redis == "local" else store.redis_url_from or "",
        fail_closed=store.on_unavailable == "closed",
        timeout_ms=store.timeout_ms,
    )


def wants_local_redis(specs: Iterable[ClientKeysSpec]) -> bool:
    """Whether a document asks `switchyard up` to run a redis-server (``store.redis: local``)."""
    return any(spec.store is not None and spec.store.redis == "local" for spec in specs)


def _chain(key: ClientKey, tenants: dict[str, Tenant]) -> list[Tenant]:
    chain: list[Tenant] = []
    name: str | None = key.tenant
    where = f"key {key.name!r}: tenant"
    while name is not None:
        tenant = tenants.get(name)
        if tenant is None:
            raise PolicyError(f"ClientKeys: {where} {name!r} is not defined")
        if any(t.name == name for t in chain):
            raise PolicyError(f"ClientKeys: tenant {name!r}: parent chain has a cycle")
        chain.append(tenant)
        name, where = tenant.parent, f"tenant {tenant.name!r}: parent"
    return chain


def compile_jwt(specs: Iterable[ClientKeysSpec]) -> pb.JwtAuth | None:
    """The one ``spec.jwt`` among the documents with every tenant it may name (its chain and
    merged allowance); None: none set. Two, or a chain that does not resolve, is an error."""
    specs = list(specs)
    found = [spec.jwt for spec in specs if spec.jwt is not None]
    if len(found) > 1:
        raise PolicyError("ClientKeys: spec.jwt is set in more than one document")
    if not found:
        return None
    jwt = found[0]
    tenants = {t.name: t for spec in specs for t in spec.tenants}
    out = pb.JwtAuth(
        issuer=jwt.issuer,
        audiences=jwt.audiences,
        jwks_inline=jwt.jwks.inline or "",
        jwks_uri=jwt.jwks.uri or "",
        jwks_timeout_ms=jwt.jwks.timeout_ms,
        jwks_cache_s=jwt.jwks.cache_s,
        tenant_claim=jwt.tenant_claim,
        subject_claim=jwt.subject_claim,
    )
    for name in sorted(tenants):
        chain = _tenant_chain(name, tenants)
        out.tenants.append(pb.ClientKey(name=name, tenants=[t.name for t in chain]))
        _merge_allowance(out.tenants[-1].allowance, chain)
    return out


def _tenant_chain(name: str, tenants: dict[str, Tenant]) -> list[Tenant]:
    chain: list[Tenant] = []
    current: str | None = name
    while current is not None:
        tenant = tenants.get(current)
        if tenant is None:
            raise PolicyError(
                f"ClientKeys: tenant {chain[-1].name!r}: parent {current!r} is not defined"
            )
        if any(t.name == current for t in chain):
            raise PolicyError(f"ClientKeys: tenant {current!r}: parent chain has a cycle")
        chain.append(tenant)
        current = tenant.parent
    return chain


def _merge_allowance(allowance: pb.Allowance, layers: list[Tenant]) -> None:
    for field, merged in (
        ("aliases", _merge(a.policies for a in layers)),
        ("models", _merge(a.models for a in layers)),
        ("data_classes", _merge(a.data_classes for a in layers)),
    ):
        if merged is not None:
            getattr(allowance, field).CopyFrom(merged)
