"""ClientKeys documents: tenants and their clients' API keys (hashed), compiled into the
RoutingConfig's ``client_keys``.

A key's effective allowance is its own intersected with every tenant's up its chain
(user → project → team); an empty list allows anything. Only SHA-256 hashes are stored.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Literal

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


class Tenant(Allowance):
    """A team, project or user: what it allows bounds every key under it."""

    name: str = Field(min_length=1, max_length=63, description="Tenant name.")
    parent: str | None = Field(
        default=None,
        min_length=1,
        max_length=63,
        description="The tenant above (user → project → team), in the same document.",
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


class ClientKeysSpec(_Doc):
    tenants: list[Tenant] = Field(
        default_factory=list, max_length=MAX_TENANTS, description="Tenants (unique names)."
    )
    keys: list[ClientKey] = Field(
        default_factory=list, max_length=MAX_KEYS, description="Client keys (unique names)."
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
            )
        )
    return out


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
