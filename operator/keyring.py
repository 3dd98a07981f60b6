"""ClientKeys resources in Kubernetes: each judged on its own, then served together.

One resource is self-contained: its keys name tenants of the same resource, and a tenant's
parent is one of them too. Names are qualified by namespace in the RoutingConfig
(``team-a/alice``), so two namespaces never share a tenant (nor its limits). A key may give its
``sha256`` or a ``secretRef``: the operator hashes the Secret's value and only the hash reaches
this module. What is judged here, beyond the CRD's CEL rules:

- the schema (local mode's validator), references and parent cycles: on failure the resource
  is ``InvalidSpec`` and none of its keys is served (fail closed);
- a key whose Secret (or key in it) is missing: ``SecretMissing``, that key alone left out;
- a tenant, key or key hash that another served resource already has: ``Conflict``, this
  resource left out (the one served first keeps serving).

Error messages name the field and never carry an input value (a key pasted into ``sha256``
must not reach a status, an Event or a log).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from switchyard.api.v1 import routing_pb2 as pb
from switchyard.operator.clientkeys import (
    ClientKeys,
    ClientKeysSpec,
    compile_client_keys,
    compile_jwt,
    compile_store,
    compile_tenant_limits,
)
from switchyard.operator.policy import PolicyError

SecretHashes = Mapping[tuple[str, str], str]
"""(Secret name, key in it) → SHA-256 of its value, for one namespace."""

PROGRAMMED = "Programmed"


@dataclass(frozen=True)
class KeysVerdict:
    """What one ClientKeys resource contributes, and what its status says."""

    resource: str
    """namespace/name"""
    reason: str
    """``Programmed`` when all of it is served; otherwise why not."""
    message: str
    tenant_count: int = 0
    key_count: int = 0
    active_keys: int = 0
    served: list[pb.ClientKey] = field(default_factory=list)
    """Its keys as they enter the RoutingConfig (qualified names, hashes only)."""
    tenants: frozenset[str] = frozenset()
    """Its tenants' qualified names."""
    tenant_limits: list[pb.TenantLimits] = field(default_factory=list)
    """Its tenants' budgets and rate limits, by qualified name (served resources only)."""
    store: pb.LimitStore | None = None
    """Its ``spec.store`` (served resources only)."""
    jwt: pb.JwtAuth | None = None
    """Its ``spec.jwt``, tenant chains qualified (served resources only)."""

    @property
    def ready(self) -> bool:
        return self.reason == PROGRAMMED


def field_path(loc: Iterable[Any]) -> str:
    """A pydantic error location as a Kubernetes field path: ``spec.keys[2].sha256``."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else ("." if path else "") + str(part)
    return path


def _schema_errors(error: ValidationError) -> str:
    lines = []
    for err in error.errors(include_input=False, include_url=False):
        message = err["msg"].removeprefix("Value error, ")
        path = field_path(err["loc"])
        lines.append(f"{path}: {message}" if path else message)
    return "; ".join(lines)


def _reference_errors(spec: ClientKeysSpec) -> str:
    """Duplicate names, dangling tenants and parents, cycles (CEL checks most; not cycles)."""
    index: dict[str, int] = {}
    for i, tenant in enumerate(spec.tenants):
        if tenant.name in index:
            first = index[tenant.name]
            return f"spec.tenants[{i}].name: {tenant.name!r} is also spec.tenants[{first}]"
        index[tenant.name] = i
    for i, tenant in enumerate(spec.tenants):
        if tenant.parent is not None and tenant.parent not in index:
            return f"spec.tenants[{i}].parent: no tenant {tenant.parent!r} in this resource"
        seen, name = {tenant.name}, tenant.parent
        while name is not None:
            if name in seen:
                return f"spec.tenants[{i}].parent: the parent chain of {tenant.name!r} has a cycle"
            seen.add(name)
            name = spec.tenants[index[name]].parent if name in index else None
    names: dict[str, int] = {}
    hashes: dict[str, int] = {}
    for i, key in enumerate(spec.keys):
        if key.name in names:
            return f"spec.keys[{i}].name: {key.name!r} is also spec.keys[{names[key.name]}]"
        names[key.name] = i
        if key.tenant not in index:
            return f"spec.keys[{i}].tenant: no tenant {key.tenant!r} in this resource"
        if key.sha256 is not None:
            if key.sha256 in hashes:
                return f"spec.keys[{i}].sha256: the same as spec.keys[{hashes[key.sha256]}]"
            hashes[key.sha256] = i
    return ""


def secret_refs(document: Mapping[str, Any]) -> set[tuple[str, str]]:
    """(Secret, key) of every secretRef in a raw ClientKeys document (valid or not)."""
    spec = document.get("spec")
    keys = spec.get("keys") if isinstance(spec, Mapping) else None
    refs = set()
    for entry in keys if isinstance(keys, list) else []:
        ref = entry.get("secretRef") if isinstance(entry, Mapping) else None
        if (
            isinstance(ref, Mapping)
            and isinstance(ref.get("name"), str)
            and isinstance(ref.get("key"), str)
        ):
            refs.add((ref["name"], ref["key"]))
    return refs


def _qualified(namespace: str, key: pb.ClientKey) -> pb.ClientKey:
    out = pb.ClientKey()
    out.CopyFrom(key)
    out.name = f"{namespace}/{key.name}"
    del out.tenants[:]
    out.tenants.extend(f"{namespace}/{t}" for t in key.tenants)
    return out


def judge(
    document: Mapping[str, Any],
    hashes: SecretHashes,
    others: Iterable[KeysVerdict],
    now: float | None = None,
) -> KeysVerdict:
    """Validate one ClientKeys document and compile what it serves."""
    meta = document.get("metadata") or {}
    namespace = str(meta.get("namespace", "default"))
    resource = f"{namespace}/{meta.get('name')}"
    try:
        spec = ClientKeys.model_validate(document).spec
    except ValidationError as error:
        return KeysVerdict(resource, "InvalidSpec", _schema_errors(error))
    problem = _reference_errors(spec)
    if problem:
        return KeysVerdict(resource, "InvalidSpec", problem, len(spec.tenants), len(spec.keys))
    missing = []
    resolved = []
    for i, key in enumerate(spec.keys):
        if key.secret_ref is None:
            resolved.append(key)
            continue
        digest = hashes.get((key.secret_ref.name, key.secret_ref.key))
        if digest is None:
            missing.append(
                f"spec.keys[{i}].secretRef: Secret {key.secret_ref.name!r} has no key "
                f"{key.secret_ref.key!r} (or cannot be read); key {key.name!r} is not served"
            )
        else:
            resolved.append(key.model_copy(update={"sha256": digest, "secret_ref": None}))
    try:
        compiled = compile_client_keys([spec.model_copy(update={"keys": resolved})])
    except PolicyError as error:  # a Secret holding the same key as another entry
        return KeysVerdict(resource, "InvalidSpec", f"spec.keys: {error}", len(spec.tenants))
    served = [_qualified(namespace, k) for k in compiled]
    tenants = frozenset(f"{namespace}/{t.name}" for t in spec.tenants)
    conflict = _conflict(spec, namespace, served, others)
    if conflict:
        return KeysVerdict(resource, "Conflict", conflict, len(spec.tenants), len(spec.keys))
    moment = time.time() if now is None else now
    active = sum(1 for k in served if not k.revoked and (not k.expires_at or k.expires_at > moment))
    reason, message = PROGRAMMED, f"{len(served)} keys served ({active} active)"
    if missing:
        reason, message = "SecretMissing", "; ".join(missing)
    limits = [
        pb.TenantLimits(tenant=f"{namespace}/{t.tenant}", limits=t.limits)
        for t in compile_tenant_limits([spec])
    ]
    return KeysVerdict(
        resource, reason, message, len(spec.tenants), len(spec.keys), active, served, tenants,
        limits, compile_store([spec]), _qualified_jwt(namespace, compile_jwt([spec])),
    )  # fmt: skip


def _qualified_jwt(namespace: str, jwt: pb.JwtAuth | None) -> pb.JwtAuth | None:
    """Tokens name a tenant of the resource (the claim's value, unqualified); its chain is
    qualified, as the served limits are."""
    if jwt is None:
        return None
    for tenant in jwt.tenants:
        chain = [f"{namespace}/{t}" for t in tenant.tenants]
        del tenant.tenants[:]
        tenant.tenants.extend(chain)
    return jwt


def _conflict(
    spec: ClientKeysSpec,
    namespace: str,
    served: list[pb.ClientKey],
    others: Iterable[KeysVerdict],
) -> str:
    for other in others:
        for i, tenant in enumerate(spec.tenants):
            if f"{namespace}/{tenant.name}" in other.tenants:
                return (
                    f"spec.tenants[{i}].name: tenant {tenant.name!r} is already defined by "
                    f"ClientKeys {other.resource}"
                )
        theirs = {k.name: k for k in other.served}
        hashes = {k.sha256: k.name for k in other.served}
        for i, key in enumerate(spec.keys):
            if f"{namespace}/{key.name}" in theirs:
                return (
                    f"spec.keys[{i}].name: key {key.name!r} is already defined by "
                    f"ClientKeys {other.resource}"
                )
        for mine in served:
            if mine.sha256 in hashes:
                index = next(
                    i for i, k in enumerate(spec.keys) if mine.name == f"{namespace}/{k.name}"
                )
                return (
                    f"spec.keys[{index}]: the same key as {hashes[mine.sha256]!r} of "
                    f"ClientKeys {other.resource}"
                )
    return ""


def served_tenant_limits(verdicts: Iterable[KeysVerdict]) -> list[pb.TenantLimits]:
    """Every served tenant's limits, in a stable order."""
    return sorted((t for v in verdicts for t in v.tenant_limits), key=lambda t: t.tenant)


def served_store(verdicts: Iterable[KeysVerdict]) -> pb.LimitStore | None:
    """The ``spec.store`` of the first served resource (by namespace/name) that sets one;
    None: the ext_proc's SWITCHYARD_REDIS_URL (Helm ``limits.redisUrl``), else memory."""
    stores = sorted((v.resource, v.store) for v in verdicts if v.store is not None)
    return stores[0][1] if stores else None


def served_jwt(verdicts: Iterable[KeysVerdict]) -> pb.JwtAuth | None:
    """The ``spec.jwt`` of the first served resource (by namespace/name) that sets one."""
    found = sorted(((v.resource, v.jwt) for v in verdicts if v.jwt is not None), key=lambda r: r[0])
    return found[0][1] if found else None


def served_keys(verdicts: Iterable[KeysVerdict]) -> list[pb.ClientKey]:
    """Every served key, in a stable order (the config version hashes it)."""
    return sorted((k for v in verdicts for k in v.served), key=lambda k: k.name)
