"""Client authentication: the presented key's SHA-256 looked up in a table built once per
config version, then its allowance checked against the routing decision. Pure functions;
the key itself is never stored, logged or echoed."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from switchyard.api.v1 import routing_pb2 as pb
from switchyard.extproc.errors import GatewayError
from switchyard.extproc.limits import KeyLimits, key_limits, tenant_table


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """One client key's effective allowance (None: anything)."""

    name: str
    tenant: str
    expires_at: int  # seconds since the epoch; 0: never
    revoked: bool
    aliases: frozenset[str] | None
    models: frozenset[str] | None
    data_classes: frozenset[str] | None
    limits: KeyLimits | None = None
    """Its budgets and rate limits, and its tenants' (None: none, the store is not called)."""


def _allow(message: pb.Allowance, field: str) -> frozenset[str] | None:
    if not message.HasField(field):
        return None
    return frozenset(getattr(message, field).values)


def key_table(config: pb.RoutingConfig) -> dict[str, KeyEntry] | None:
    """sha256 hex → entry; None when client authentication is off."""
    if not config.require_client_key:
        return None
    tenants = tenant_table(config)
    return {
        k.sha256: KeyEntry(
            name=k.name,
            tenant=k.tenants[0] if k.tenants else "",
            expires_at=k.expires_at,
            revoked=k.revoked,
            aliases=_allow(k.allowance, "aliases"),
            models=_allow(k.allowance, "models"),
            data_classes=_allow(k.allowance, "data_classes"),
            limits=key_limits(k, tenants),
        )
        for k in config.client_keys
    }


def _unauthorized(message: str) -> GatewayError:
    return GatewayError(401, message, code="invalid_api_key")


def presented_key(headers: Mapping[str, str]) -> str:
    """The key from ``Authorization: Bearer <key>``, else ``x-api-key``; "" when neither."""
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return headers.get("x-api-key", "").strip()


def authenticate(table: Mapping[str, KeyEntry], headers: Mapping[str, str], now: float) -> KeyEntry:
    """The entry of the presented key, or a 401 that says why (never the key)."""
    key = presented_key(headers)
    if not key:
        raise _unauthorized(
            "missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'"
        )
    entry = table.get(hashlib.sha256(key.encode()).hexdigest())
    if entry is None:
        raise _unauthorized("unknown API key")
    if entry.revoked:
        raise _unauthorized("this API key has been revoked")
    if entry.expires_at and now >= entry.expires_at:
        raise _unauthorized("this API key has expired")
    return entry


def denial(entry: KeyEntry, alias: str, model: str, data_class: str) -> str:
    """Why ``entry`` may not send ``alias`` routed to ``model`` under ``data_class``; ""
    when it may."""
    if entry.aliases is not None and alias not in entry.aliases:
        return f"this API key may not use model '{alias}'"
    if entry.models is not None and model not in entry.models:
        return f"this API key may not use model '{model}' (the route chosen for '{alias}')"
    if entry.data_classes is not None and data_class not in entry.data_classes:
        return f"this API key may not send data class '{data_class}'"
    return ""


def forbidden(reason: str) -> GatewayError:
    """403 for a valid key used outside its allowance."""
    return GatewayError(403, reason, code="permission_denied", type_="permission_error")
