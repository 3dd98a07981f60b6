"""Delegated authentication: Envoy's jwt_authn verifies a client's JWT and forwards its
payload (base64url JSON) in ``JWT_PAYLOAD_HEADER``; the tenant claim picks the tenant whose
allowance and limits the request gets, as for a key of that tenant. The listener removes a
client's own copy of that header before anything reads it, so its presence means verified.
Pure functions; the token itself is never read here, logged or echoed."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace

from switchyard.api.v1 import routing_pb2 as pb
from switchyard.extproc.errors import GatewayError
from switchyard.extproc.keys import KeyEntry, forbidden
from switchyard.extproc.limits import key_limits, tenant_table
from switchyard.headers import JWT_PAYLOAD_HEADER

MAX_SUBJECT = 64
"""Characters of the subject kept in the caller's name (``jwt:<sub>``)."""
MAX_PAYLOAD = 16_384


@dataclass(frozen=True, slots=True)
class JwtTable:
    """The tenants a verified token may name, by name."""

    tenant_claim: str
    subject_claim: str
    tenants: Mapping[str, KeyEntry]


def jwt_table(config: pb.RoutingConfig) -> JwtTable | None:
    """The config's JWT tenants; None when JWTs are not accepted."""
    if not config.require_client_key or not config.HasField("jwt"):
        return None
    jwt = config.jwt
    limits = tenant_table(config)
    entries = {}
    for t in jwt.tenants:
        allowance = t.allowance
        entries[t.name] = KeyEntry(
            name=f"tenant:{t.name}",
            tenant=t.tenants[0] if t.tenants else t.name,
            expires_at=0,
            revoked=False,
            aliases=_allow(allowance, "aliases"),
            models=_allow(allowance, "models"),
            data_classes=_allow(allowance, "data_classes"),
            limits=key_limits(t, limits),
        )
    return JwtTable(jwt.tenant_claim, jwt.subject_claim, entries)


def _allow(message: pb.Allowance, field: str) -> frozenset[str] | None:
    if not message.HasField(field):
        return None
    return frozenset(getattr(message, field).values)


def jwt_entry(table: JwtTable, headers: Mapping[str, str]) -> KeyEntry | None:
    """The entry of the tenant a verified token names; None when the request carries no
    verified token (the key path decides). A token whose tenant claim is missing or names no
    tenant is a 403 naming the claim, never its value."""
    payload = headers.get(JWT_PAYLOAD_HEADER)
    if not payload:
        return None
    claims = _decode(payload)
    claim = table.tenant_claim
    tenant = claims.get(claim)
    if not isinstance(tenant, str) or not tenant:
        raise forbidden(f"the token has no '{claim}' claim naming a tenant")
    entry = table.tenants.get(tenant)
    if entry is None:
        raise forbidden(f"the token's '{claim}' claim names no tenant of this gateway")
    subject = claims.get(table.subject_claim)
    who = subject[:MAX_SUBJECT] if isinstance(subject, str) and subject.isprintable() else "-"
    return replace(entry, name=f"jwt:{who}")


def _decode(payload: str) -> dict[str, object]:
    """The claims Envoy forwarded (base64url JSON, unpadded)."""
    try:
        if len(payload) > MAX_PAYLOAD:
            raise ValueError("too long")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, binascii.Error):
        claims = None
    if not isinstance(claims, dict):
        # Only Envoy sets the header: something between it and here is broken.
        raise GatewayError(
            500,
            "the gateway could not read the verified token",
            code="internal_error",
            type_="server_error",
        )
    return claims
