"""Compile validated RoutePolicies into one RoutingConfig (the proto every consumer reads).

The compiler is shared: the operator feeds it from the Kubernetes API, local mode from files.
Everything that can be decided once per change is decided here: backend keys, tier order,
the fail-open model. The output is deterministic, and its version is a hash of its content.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable

from switchyard.api.v1 import routing_pb2 as pb
from switchyard.extproc.router.bundle import bundle_models
from switchyard.headers import (
    CLIENT_KEY_HEADERS,
    DATA_CLASS_HEADER,
    JWT_PAYLOAD_HEADER,
    REQUEST_ID_HEADER,
    SHADOW_HEADER,
)
from switchyard.operator.multicluster import Topology, place_endpoints
from switchyard.operator.policy import (
    BudgetOnExhausted,
    BudgetSpec,
    ModelSpec,
    Outcomes,
    PersonalData,
    PersonalDataAction,
    RecordMode,
    Retries,
    RoutePolicy,
    Rule,
    StrategyType,
    age_seconds,
    byte_count,
    duration_ms,
    missing_predictions,
)

_STRATEGY = {
    StrategyType.RULES: pb.Strategy.RULES,
    StrategyType.CLASSIFIER: pb.Strategy.CLASSIFIER,
    StrategyType.WEIGHTED: pb.Strategy.WEIGHTED,
    StrategyType.PREDICTIVE: pb.Strategy.PREDICTIVE,
}


class CompileError(ValueError):
    """The set of policies cannot be served together (e.g. an unknown fail-open model)."""


class FailOpenModelMissing(CompileError):
    """No policy has the fail-open model (not yet, or no longer)."""


def backend_key(policy: RoutePolicy, model_name: str) -> str:
    """Globally unique key of one model of one policy: routing header value and cluster name."""
    raw = f"{policy.metadata.namespace}.{policy.metadata.name}.{model_name}"
    return re.sub(r"[^a-z0-9.-]", "-", raw.lower())


def _model(policy: RoutePolicy, spec: ModelSpec) -> pb.Model:
    backend = pb.Backend(
        url=spec.backend.url or "",
        api_key_env=spec.backend.api_key_env or "",
        ca_bundle=spec.backend.ca_bundle or "",
    )
    if spec.backend.api_key_secret is not None:
        secret = spec.backend.api_key_secret
        backend.api_key_secret.CopyFrom(pb.SecretKeyRef(name=secret.name, key=secret.key))
    if spec.backend.service is not None:
        svc = spec.backend.service
        backend.service.CopyFrom(
            pb.ServiceRef(
                name=svc.name,
                namespace=svc.namespace or policy.metadata.namespace,
                port=svc.port,
            )
        )
    return pb.Model(
        name=spec.name,
        backend_key=backend_key(policy, spec.name),
        upstream_model=spec.upstream_model,
        input_per_1m=spec.pricing.input_per_1m,
        output_per_1m=spec.pricing.output_per_1m,
        context_window=spec.context_window,
        capabilities=sorted(c.value for c in spec.capabilities),
        data_classes=sorted(spec.data_classes),
        fallbacks=spec.fallbacks,
        tier=spec.tier or "",
        weight=spec.weight,
        backend=backend,
        region=spec.region or "",
        cluster=spec.cluster or "",
    )


def _rule(index: int, rule: Rule) -> pb.Rule:
    when = rule.when
    match = pb.RuleMatch(
        aliases=when.models,
        headers=when.headers,
        min_prompt_tokens=when.min_prompt_tokens,
        max_prompt_tokens=when.max_prompt_tokens or 0,
        keywords=[k.lower() for k in when.keywords],
        regex=when.regex or "",
        categories=when.category,
    )
    if when.min_difficulty is not None:
        match.min_difficulty = when.min_difficulty
    if when.max_difficulty is not None:
        match.max_difficulty = when.max_difficulty
    if when.semantic is not None:
        match.semantic.examples.extend(when.semantic.examples)
        match.semantic.threshold = when.semantic.threshold
    return pb.Rule(name=rule.name or f"rule-{index}", when=match, route=rule.route)


def _retries(retries: Retries) -> pb.Retries:
    conditions = {"connect-failure": "connect-failure", "reset": "reset,refused-stream"}
    retry_on = [conditions[c.value] for c in retries.on if c.value in conditions]
    codes = []
    if any(c.value == "429" for c in retries.on):
        codes.append(429)
    if any(c.value == "5xx" for c in retries.on):
        retry_on.append("5xx")
    if codes:
        retry_on.append("retriable-status-codes")
    return pb.Retries(
        attempts=retries.attempts,
        per_try_timeout_ms=duration_ms(retries.per_try_timeout) if retries.per_try_timeout else 0,
        retry_on=",".join(retry_on),
        retriable_status_codes=codes,
    )


def _personal_data(spec: PersonalData) -> pb.PersonalData:
    """Detection off compiles to no detectors."""
    return pb.PersonalData(
        detectors=spec.detectors if spec.detect else [],
        action=pb.PersonalData.REDACT
        if spec.action is PersonalDataAction.REDACT
        else pb.PersonalData.ROUTE,
        data_class=spec.data_class,
        raise_from=sorted(spec.raise_from),
    )


_RECORD = {
    RecordMode.NONE: pb.Recording.OFF,
    RecordMode.DECISIONS: pb.Recording.DECISIONS,
    RecordMode.PROMPTS: pb.Recording.PROMPTS,
}


def _recording(spec: Outcomes) -> pb.Recording:
    """A recording policy's ``Policy.recording`` (left unset when off: configs that do not
    record are unchanged)."""
    out = pb.Recording(
        record=_RECORD[spec.record],
        max_age_s=age_seconds(spec.retention.max_age),
        max_bytes=byte_count(spec.retention.max_bytes),
    )
    if spec.shadow is not None and spec.shadow.fraction > 0:
        out.shadow.CopyFrom(
            pb.Recording.Shadow(
                fraction=spec.shadow.fraction,
                model=spec.shadow.model,
                judge=spec.shadow.judge,
                max_concurrent=spec.shadow.max_concurrent,
            )
        )
    return out


def _predictive(policy: RoutePolicy) -> pb.Predictive:
    """Every model's prediction label. A bundle on this machine (local mode, or a path the
    operator also mounts) is checked to predict each one; elsewhere the ext_proc checks."""
    spec = policy.spec
    settings = spec.strategy.predictive
    assert settings is not None
    labels = bundle_models(spec.strategy.router.bundle)
    if labels is not None:
        missing = missing_predictions(spec, labels)
        if missing:
            raise CompileError(f"RoutePolicy {policy.key}: spec.strategy.router.bundle: {missing}")
    out = pb.Predictive(
        labels={m.name: settings.model_map.get(m.name, m.name) for m in spec.models}
    )
    if settings.max_quality_loss is not None:
        out.max_quality_loss = settings.max_quality_loss
    else:
        out.cost_weight = settings.cost_weight or 0.0
    return out


def compile_policy(policy: RoutePolicy) -> pb.Policy:
    """One RoutePolicy → its compiled form."""
    spec = policy.spec
    strategy = pb.Strategy(
        type=_STRATEGY[spec.strategy.type],
        router_bundle=spec.strategy.router.bundle,
        tiers=[
            pb.Tier(
                model=t.model, max_difficulty=1.0 if t.max_difficulty is None else t.max_difficulty
            )
            for t in spec.strategy.tiers
        ],
        rules=[_rule(i, r) for i, r in enumerate(spec.strategy.rules)],
        default_model=spec.strategy.default or "",
    )
    if spec.strategy.predictive is not None:
        strategy.predictive.CopyFrom(_predictive(policy))
    compiled = pb.Policy(
        name=policy.metadata.name,
        namespace=policy.metadata.namespace,
        generation=policy.metadata.generation,
        aliases=spec.match.models,
        match_headers=spec.match.headers,
        models=[_model(policy, m) for m in spec.models],
        strategy=strategy,
        retries=_retries(spec.retries),
        timeout_ms=duration_ms(spec.timeout),
        session_header=spec.session_affinity.header if spec.session_affinity else "",
        personal_data=_personal_data(spec.personal_data),
        budget=_budget(spec.budget),
    )
    if spec.outcomes.record is not RecordMode.NONE:
        compiled.recording.CopyFrom(_recording(spec.outcomes))
    return compiled


def _budget(spec: BudgetSpec | None) -> pb.BudgetAction | None:
    if spec is None:
        return None
    return pb.BudgetAction(
        on_exhausted=pb.BudgetAction.DOWNGRADE
        if spec.on_exhausted is BudgetOnExhausted.DOWNGRADE
        else pb.BudgetAction.REJECT,
        downgrade_to=spec.downgrade_to,
    )


ServiceEndpoints = Callable[[str, str, int], list[pb.Endpoint]]
"""(namespace, service, port) → ready endpoints in every known cluster, as the operator reads
them from EndpointSlices (each tagged with its cluster and that cluster's region)."""


def alias_conflict(policy: RoutePolicy, others: Iterable[RoutePolicy]) -> str:
    """Why ``policy`` cannot be served next to ``others``: an alias another policy answers
    under the same match.headers (the ext_proc would only ever pick one of them); "" if none."""
    headers = policy.spec.match.headers
    for other in others:
        if other.key == policy.key or other.spec.match.headers != headers:
            continue
        for i, alias in enumerate(policy.spec.match.models):
            if alias in other.spec.match.models:
                return (
                    f"spec.match.models[{i}]: alias {alias!r} is already answered by RoutePolicy "
                    f"{other.key} under the same match.headers; use another alias or add a "
                    "header condition"
                )
    return ""


def _check_aliases(policies: list[RoutePolicy]) -> None:
    """``alias_conflict`` over a whole set, in one pass (a set may hold 1,000 policies)."""
    seen: dict[tuple[str, frozenset[tuple[str, str]]], RoutePolicy] = {}
    for policy in policies:
        headers = frozenset(policy.spec.match.headers.items())
        for alias in policy.spec.match.models:
            first = seen.setdefault((alias, headers), policy)
            if first is not policy:
                conflict = alias_conflict(policy, [first])
                raise CompileError(f"RoutePolicy {policy.key}: {conflict}")


def compile_config(
    policies: Iterable[RoutePolicy],
    fail_open_model: str = "",
    endpoints: ServiceEndpoints | None = None,
    topology: Topology | None = None,
    client_keys: Iterable[pb.ClientKey] | None = None,
    tenant_limits: Iterable[pb.TenantLimits] = (),
    limit_store: pb.LimitStore | None = None,
    jwt: pb.JwtAuth | None = None,
) -> pb.RoutingConfig:
    """All policies → one RoutingConfig, sorted by namespace/name, versioned by content hash.

    ``fail_open_model`` names the model served when the ext_proc is unreachable, as
    ``model`` (unique across policies) or ``namespace/policy/model``; empty means fail closed.
    ``endpoints`` resolves Service backends across clusters; ``topology`` says which cluster
    is this one and where each runs. A model's endpoints are filtered by its ``region`` and
    prioritised: its ``cluster`` (default: this one) first, then its region, then the rest.
    Without ``endpoints`` (local mode) Service backends are reached by cluster DNS.
    ``client_keys`` (None: client authentication off) turns it on: every request needs one.
    ``tenant_limits`` and ``limit_store`` are the ClientKeys documents' budgets and rate
    limits and where their counters live (``clientkeys.compile_tenant_limits``); ``jwt``
    (with ``client_keys``) accepts tokens Envoy verifies (``clientkeys.compile_jwt``).
    """
    topology = topology or Topology()
    ordered = sorted(policies, key=lambda p: (p.metadata.namespace, p.metadata.name))
    _check_aliases(ordered)
    config = pb.RoutingConfig(policies=[compile_policy(p) for p in ordered])
    for policy in config.policies:
        for model in policy.models:
            svc = model.backend.service
            if svc.name and endpoints:
                model.backend.resolved = True
                found = endpoints(svc.namespace, svc.name, svc.port)
                preferred = model.cluster or topology.local
                model.backend.endpoints.extend(
                    place_endpoints(found, preferred, topology, model.region)
                )
    headers = {DATA_CLASS_HEADER}
    for policy in config.policies:
        headers.update(policy.match_headers)
        if policy.session_header:
            headers.add(policy.session_header)
        for rule in policy.strategy.rules:
            headers.update(rule.when.headers)
    if any(p.recording.record for p in config.policies):
        headers.add(REQUEST_ID_HEADER)  # the id a recorded request is filed under
    if any(p.recording.HasField("shadow") for p in config.policies):
        headers.add(SHADOW_HEADER)  # marks the gateway's own shadow and judge requests
    if client_keys is not None:
        config.require_client_key = True
        config.client_keys.extend(client_keys)
        headers.update(CLIENT_KEY_HEADERS)
        config.tenant_limits.extend(tenant_limits)
        if limit_store is not None:
            config.limit_store.CopyFrom(limit_store)
        if jwt is not None:
            config.jwt.CopyFrom(jwt)
            headers.add(JWT_PAYLOAD_HEADER)
    config.request_headers.extend(sorted(headers))
    if fail_open_model:
        config.fail_open_backend = _resolve_model_key(config, fail_open_model)
    digest = hashlib.sha256(config.SerializeToString(deterministic=True)).hexdigest()
    config.version = digest[:16]
    return config


def _resolve_model_key(config: pb.RoutingConfig, ref: str) -> str:
    matches = [
        m.backend_key
        for p in config.policies
        for m in p.models
        if ref in (m.name, f"{p.namespace}/{p.name}/{m.name}")
    ]
    if not matches:
        raise FailOpenModelMissing(f"failOpenModel: {ref!r} matches no model")
    if len(matches) != 1:
        raise CompileError(
            f"failOpenModel: {ref!r} matches {len(matches)} models; use a unique name or "
            "namespace/policy/model"
        )
    return str(matches[0])
