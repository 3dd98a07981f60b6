"""The ext_proc's in-memory routing table, built once per RoutingConfig version.

Everything the hot path needs is precomputed here: compiled regexes, lowered keywords, the
embeddings of semantic conditions' examples, frozen sets for capability and data-class checks,
model lookup tables and the /v1/models list.

A policy that does not load (a regex that does not compile, a reference to a model it lacks,
or a router bundle the caller could not load) is left out on its own: the others are served,
its aliases and model names answer 503 ``policy_unavailable``, and ``policy_errors`` says why,
for the ACK. One policy never decides whether the rest of a version is served.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from itertools import accumulate
from urllib.parse import urlsplit

from switchyard.api.v1 import routing_pb2 as pb
from switchyard.extproc.claims import JwtTable, jwt_table
from switchyard.extproc.keys import KeyEntry, key_table
from switchyard.extproc.limits import StoreSettings, store_settings
from switchyard.extproc.models_list import ListedModel, listed_models
from switchyard.extproc.pii import Scanner
from switchyard.extproc.recording import RecordingRule, Retention
from switchyard.extproc.semantic import (
    F32,
    Embedder,
    EmbedderError,
    SemanticCondition,
    load_embedder,
)
from switchyard.headers import CLIENT_KEY_HEADERS, REQUEST_ID_HEADER, SHADOW_HEADER


@dataclass(frozen=True, slots=True)
class PersonalDataRule:
    """A policy's personal-data detection (``spec.personalData``), ready for the hot path."""

    scanner: Scanner
    redact: bool
    """Replace matches in the body sent upstream instead of raising the data class."""
    data_class: str
    """The class a request with personal data gets (not redacting) ..."""
    raise_from: frozenset[str]
    """... when its declared class is one of these; any other declared class is kept."""


@dataclass(frozen=True, slots=True)
class ModelRoute:
    """One servable model of one policy."""

    name: str
    policy: str
    backend_key: str
    upstream_model: str
    input_per_1m: float
    output_per_1m: float
    context_window: int
    capabilities: frozenset[str]
    data_classes: frozenset[str]
    fallbacks: tuple[str, ...]
    weight: float
    provider: str = ""
    """The GenAI provider (OpenTelemetry ``gen_ai.provider.name``) its URL names; "" unknown."""
    personal_data: PersonalDataRule | None = None
    """Its policy's detection, for requests that name this model directly (None: off)."""

    def estimated_cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """USD for a request of this size on this model."""
        return (prompt_tokens * self.input_per_1m + completion_tokens * self.output_per_1m) / 1e6


@dataclass(frozen=True, slots=True)
class CompiledRule:
    name: str
    route: str
    aliases: frozenset[str]
    headers: tuple[tuple[str, str], ...]
    min_prompt_tokens: int
    max_prompt_tokens: int  # 0: unbounded
    keywords: tuple[str, ...]
    regex: re.Pattern[str] | None
    categories: frozenset[str]
    min_difficulty: float | None
    max_difficulty: float | None
    semantic: SemanticCondition | None = None
    """Similarity to example utterances (needs the policy's embedder)."""

    @property
    def needs_scores(self) -> bool:
        return (
            bool(self.categories)
            or self.min_difficulty is not None
            or self.max_difficulty is not None
            or self.semantic is not None
        )


def blended_per_1m(model: ModelRoute) -> float:
    """USD per 1M tokens at 3 input tokens to 1 output token (the usual blended price)."""
    return (3 * model.input_per_1m + model.output_per_1m) / 4


@dataclass(frozen=True, slots=True)
class PredictiveRule:
    """The predictive strategy of one policy, ready for the hot path."""

    candidates: tuple[tuple[ModelRoute, str, float], ...]
    """(model, its label in ``RouterScores.predicted``, blended price per 1M), cheapest
    first (then by name), so the first of equals is the cheaper."""
    max_quality_loss: float | None
    """Cheapest allowed model within this of the best predicted score ..."""
    cost_weight: float | None
    """... or (when that is None) the best predicted score - cost_weight x blended price."""


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    name: str
    key: str
    aliases: frozenset[str]
    match_headers: tuple[tuple[str, str], ...]
    models: Mapping[str, ModelRoute]
    strategy: int  # pb.Strategy.Type
    router_bundle: str
    tiers: tuple[tuple[ModelRoute, float], ...]
    rules: tuple[CompiledRule, ...]
    default_model: ModelRoute | None
    weighted_models: tuple[ModelRoute, ...]
    weighted_cumulative: tuple[float, ...]
    needs_scores: bool
    session_header: str = ""
    personal_data: PersonalDataRule | None = None
    """Personal-data detection (None: off)."""
    predictive: PredictiveRule | None = None
    """The predictive strategy's candidates and knob (that strategy only)."""
    budget_downgrade: frozenset[str] | None = None
    """``budget.onExhausted: downgrade``: the models a request whose budget is spent may
    still use (None: a 429)."""
    embedder: Embedder | None = None
    """Its router bundle's embedder, when a rule has a semantic condition (None: none has,
    and no request of this policy is embedded)."""
    semantic_examples: F32 | None = None
    """Every semantic rule's examples embedded, [k, dim] unit rows (``SemanticCondition``
    spans)."""


@dataclass(frozen=True, slots=True)
class AliasEntry:
    """One policy answering an alias that a left-out policy (``policy`` None) also answers."""

    match_headers: tuple[tuple[str, str], ...]
    policy: CompiledPolicy | None
    key: str


@dataclass(frozen=True, slots=True)
class CompiledConfig:
    """Lookup tables for one config version."""

    version: str
    policies_by_alias: Mapping[str, tuple[CompiledPolicy, ...]]
    models_by_name: Mapping[str, ModelRoute]
    fail_open_backend: str
    router_bundles: frozenset[str] = field(default_factory=frozenset)
    policy_bundles: Mapping[str, str] = field(default_factory=dict)
    """Policy key → the router bundle it scores with (only policies that need scores)."""
    policy_errors: Mapping[str, str] = field(default_factory=dict)
    """Policy key → why it was left out (the policy is not served)."""
    unavailable: Mapping[str, str] = field(default_factory=dict)
    """Model name of a left-out policy → that policy's key (read on the 404 path)."""
    guarded: Mapping[str, tuple[AliasEntry, ...]] = field(default_factory=dict)
    """Aliases a left-out policy answers, with every policy answering them, most specific first
    (read on the 404 path): a request the left-out one would have taken gets a 503, never a
    less specific policy's routing."""
    client_keys: Mapping[str, KeyEntry] | None = None
    """Client key sha256 → its entry; None: client authentication off."""
    jwt: JwtTable | None = None
    """Tenants a verified JWT may name (``extproc/claims.py``); None: JWTs not accepted."""
    limit_store: StoreSettings = field(default_factory=lambda: StoreSettings("", False, 0.05))
    """Where budgets' and rate limits' counters live."""
    recording: Mapping[str, RecordingRule] = field(default_factory=dict)
    """Policy key → its request recording (only policies that record)."""
    retention: Retention = field(default_factory=Retention)
    """The recording directory's bounds: the strictest of the recording policies'."""
    recorded_headers: tuple[str, ...] = ()
    """The routing headers a recorded request keeps (never a client key or the id)."""
    shadow: Mapping[str, ShadowRule] = field(default_factory=dict)
    """Policy key → its shadow evaluation (only policies that shadow; ``extproc/shadow.py``)."""
    models_listing: tuple[ListedModel, ...] = ()
    """``GET /v1/models``'s entries (answered here when client keys are on)."""

    @property
    def served_names(self) -> list[str]:
        """Aliases and concrete model names a client may send, sorted."""
        guarded = (a for a, group in self.guarded.items() if any(e.policy for e in group))
        return sorted({*self.policies_by_alias, *guarded, *self.models_by_name})


def _model(policy_key: str, m: pb.Model, personal: PersonalDataRule | None) -> ModelRoute:
    return ModelRoute(
        name=m.name,
        policy=policy_key,
        backend_key=m.backend_key,
        upstream_model=m.upstream_model,
        input_per_1m=m.input_per_1m,
        output_per_1m=m.output_per_1m,
        context_window=m.context_window,
        capabilities=frozenset(m.capabilities),
        data_classes=frozenset(m.data_classes),
        fallbacks=tuple(m.fallbacks),
        weight=m.weight,
        provider=provider_of(m.backend.url),
        personal_data=personal,
    )


# Hosts of the providers' public APIs → OpenTelemetry GenAI ``gen_ai.provider.name`` values.
_PROVIDERS = {
    "api.openai.com": "openai",
    "api.anthropic.com": "anthropic",
    "generativelanguage.googleapis.com": "gcp.gemini",
    "api.mistral.ai": "mistral_ai",
    "api.groq.com": "groq",
    "api.deepseek.com": "deepseek",
    "api.x.ai": "x_ai",
    "api.cohere.com": "cohere",
    "api.perplexity.ai": "perplexity",
}
_PROVIDER_SUFFIXES = {".openai.azure.com": "azure.ai.openai"}


def provider_of(url: str) -> str:
    """The provider a backend URL's host names, or "" (in-cluster and other servers)."""
    host = urlsplit(url).hostname or "" if url else ""
    if host in _PROVIDERS:
        return _PROVIDERS[host]
    return next((p for suffix, p in _PROVIDER_SUFFIXES.items() if host.endswith(suffix)), "")


class PolicyLoadError(ValueError):
    """One policy that cannot be served; the message names the field."""


def _regex(index: int, pattern: str) -> re.Pattern[str] | None:
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise PolicyLoadError(f"strategy.rules[{index}].when.regex: {exc}") from None


def _semantic(p: pb.Policy) -> tuple[Embedder | None, F32 | None, dict[int, SemanticCondition]]:
    """The policy's embedder, every semantic example embedded (once, here) as the rows of one
    matrix, and each semantic rule's condition (its rows and threshold) by rule index. A
    request's similarities to all of them are then one matrix-vector product."""
    rules = p.strategy.rules
    found = [(i, r.when.semantic) for i, r in enumerate(rules) if r.when.HasField("semantic")]
    if not found:
        return None, None, {}
    try:
        embedder = load_embedder(p.strategy.router_bundle)
    except EmbedderError as exc:
        raise PolicyLoadError(f"strategy.rules[{found[0][0]}].when.semantic: {exc}") from None
    texts: list[str] = []
    spans = {}
    for i, s in found:
        where = f"strategy.rules[{i}].when.semantic"
        if not s.examples:
            raise PolicyLoadError(f"{where}.examples: at least one example is needed")
        if not 0.0 <= s.threshold <= 1.0:
            raise PolicyLoadError(f"{where}.threshold: must be between 0 and 1, got {s.threshold}")
        spans[i] = (len(texts), len(texts) + len(s.examples), s.threshold)
        texts.extend(s.examples)
    matrix = embedder.embed_texts(texts)
    conditions = {
        i: SemanticCondition(matrix[a:b], threshold, a, b) for i, (a, b, threshold) in spans.items()
    }
    return embedder, matrix, conditions


def _rule(index: int, r: pb.Rule, semantic: SemanticCondition | None = None) -> CompiledRule:
    w = r.when
    return CompiledRule(
        name=r.name,
        route=r.route,
        aliases=frozenset(w.aliases),
        headers=tuple(sorted(w.headers.items())),
        min_prompt_tokens=w.min_prompt_tokens,
        max_prompt_tokens=w.max_prompt_tokens,
        keywords=tuple(w.keywords),
        regex=_regex(index, w.regex),
        categories=frozenset(w.categories),
        min_difficulty=w.min_difficulty if w.HasField("min_difficulty") else None,
        max_difficulty=w.max_difficulty if w.HasField("max_difficulty") else None,
        semantic=semantic,
    )


def _check_references(p: pb.Policy, models: Mapping[str, ModelRoute]) -> None:
    """What the engine would otherwise find missing at request time (a 500 per request)."""

    def need(name: str, where: str) -> None:
        if name not in models:
            raise PolicyLoadError(f"{where}: unknown model {name!r}")

    for i, m in enumerate(p.models):
        for j, name in enumerate(m.fallbacks):
            need(name, f"models[{i}].fallbacks[{j}]")
    for i, r in enumerate(p.strategy.rules):
        need(r.route, f"strategy.rules[{i}].route")
    for i, t in enumerate(p.strategy.tiers):
        need(t.model, f"strategy.tiers[{i}].model")
    kind = p.strategy.type
    if p.strategy.default_model:
        need(p.strategy.default_model, "strategy.default")
    if kind == pb.Strategy.CLASSIFIER and not p.strategy.tiers:
        raise PolicyLoadError("strategy.tiers: the classifier strategy needs at least one tier")
    if kind == pb.Strategy.WEIGHTED and not any(m.weight > 0 for m in models.values()):
        raise PolicyLoadError("models: the weighted strategy needs a model with weight > 0")
    if kind == pb.Strategy.PREDICTIVE:
        predictive = p.strategy.predictive
        if not p.strategy.default_model:
            raise PolicyLoadError("strategy.default: the predictive strategy needs a default")
        if predictive.WhichOneof("knob") is None:
            raise PolicyLoadError("strategy.predictive: set maxQualityLoss or costWeight")
        unlabelled = sorted(set(models) - set(predictive.labels))
        if unlabelled:
            raise PolicyLoadError(
                f"strategy.predictive: no prediction label for model(s) {', '.join(unlabelled)}"
            )


def _predictive(p: pb.Predictive, models: Mapping[str, ModelRoute]) -> PredictiveRule:
    priced = [(m, p.labels[m.name], blended_per_1m(m)) for m in models.values()]
    priced.sort(key=lambda c: (c[2], c[0].name))
    knob = p.WhichOneof("knob")
    return PredictiveRule(
        candidates=tuple(priced),
        max_quality_loss=p.max_quality_loss if knob == "max_quality_loss" else None,
        cost_weight=p.cost_weight if knob == "cost_weight" else None,
    )


def _personal_data(p: pb.PersonalData) -> PersonalDataRule | None:
    if not p.detectors:
        return None
    try:
        scanner = Scanner(p.detectors)
    except ValueError as exc:  # a detector this ext_proc does not have: never serve without
        raise PolicyLoadError(f"personal_data.detectors: {exc}") from None
    return PersonalDataRule(
        scanner=scanner,
        redact=p.action == pb.PersonalData.REDACT,
        data_class=p.data_class or "pii",
        raise_from=frozenset(p.raise_from),
    )


def _policy(p: pb.Policy) -> CompiledPolicy:
    key = f"{p.namespace}/{p.name}"
    personal = _personal_data(p.personal_data)
    models = {m.name: _model(key, m, personal) for m in p.models}
    _check_references(p, models)
    embedder, examples, semantic = _semantic(p)
    rules = tuple(_rule(i, r, semantic.get(i)) for i, r in enumerate(p.strategy.rules))
    weighted = tuple(m for m in models.values() if m.weight > 0)
    kind = p.strategy.type
    return CompiledPolicy(
        name=p.name,
        key=key,
        aliases=frozenset(p.aliases),
        match_headers=tuple(sorted(p.match_headers.items())),
        models=models,
        strategy=kind,
        router_bundle=p.strategy.router_bundle,
        tiers=tuple((models[t.model], t.max_difficulty) for t in p.strategy.tiers),
        rules=rules,
        default_model=models.get(p.strategy.default_model),
        weighted_models=weighted,
        weighted_cumulative=tuple(accumulate(m.weight for m in weighted)),
        needs_scores=kind in (pb.Strategy.CLASSIFIER, pb.Strategy.PREDICTIVE)
        or any(r.needs_scores for r in rules),
        session_header=p.session_header,
        personal_data=personal,
        predictive=_predictive(p.strategy.predictive, models)
        if kind == pb.Strategy.PREDICTIVE
        else None,
        budget_downgrade=_budget_downgrade(p, models),
        embedder=embedder,
        semantic_examples=examples,
    )


def _budget_downgrade(p: pb.Policy, models: Mapping[str, ModelRoute]) -> frozenset[str] | None:
    if not p.HasField("budget") or p.budget.on_exhausted != pb.BudgetAction.DOWNGRADE:
        return None
    for i, name in enumerate(p.budget.downgrade_to):
        if name not in models:
            raise PolicyLoadError(f"budget.downgrade_to[{i}]: unknown model {name!r}")
    return frozenset(p.budget.downgrade_to)


def build_config(
    config: pb.RoutingConfig, left_out: Mapping[str, str] | None = None
) -> CompiledConfig:
    """RoutingConfig proto → lookup tables. Pure; safe to call off the event loop.

    ``left_out`` names policies the caller could not load (key → why); they are isolated
    like those that fail here."""
    errors = dict(left_out or {})
    policies = []
    for p in config.policies:
        key = f"{p.namespace}/{p.name}"
        if key in errors:
            continue
        try:
            policies.append(_policy(p))
        except PolicyLoadError as exc:
            errors[key] = str(exc)
        except Exception as exc:  # isolate the unforeseen too: the rest must still load
            errors[key] = f"{type(exc).__name__}: {exc}"
    ordered, guarded = _by_alias(config, {p.key: p for p in policies})
    by_name: dict[str, ModelRoute] = {}
    short_names: dict[str, list[ModelRoute]] = {}
    for policy in policies:
        for model in policy.models.values():
            by_name[f"{policy.key}/{model.name}"] = model
            short_names.setdefault(model.name, []).append(model)
    for name, group in short_names.items():
        if len(group) == 1 and name not in ordered and name not in guarded:
            by_name[name] = group[0]
    bundles = {p.key: p.router_bundle for p in policies if p.needs_scores}
    compiled = CompiledConfig(
        version=config.version,
        policies_by_alias=ordered,
        models_by_name=by_name,
        fail_open_backend=config.fail_open_backend,
        router_bundles=frozenset(bundles.values()),
        policy_bundles=bundles,
        policy_errors=errors,
        unavailable=_unavailable(config, errors, by_name),
        guarded=guarded,
        client_keys=key_table(config),
        jwt=jwt_table(config),
        limit_store=store_settings(config),
        models_listing=listed_models(config),
    )
    recording = _recording(config, {p.key for p in policies})
    if recording is None:
        return compiled
    rules, retention, headers = recording
    return replace(
        compiled,
        recording=rules,
        retention=retention,
        recorded_headers=headers,
        shadow=_shadow(config, {p.key: p for p in policies}),
    )


@dataclass(frozen=True, slots=True)
class ShadowRule:
    """One policy's shadow evaluation (``spec.outcomes.shadow``), ready for the hot path."""

    policy: str
    fraction: float
    threshold: int
    """A request is shadowed when the first 8 bytes of its id's sha256 are below this."""
    model: ModelRoute
    judge: ModelRoute
    max_concurrent: int
    models: Mapping[str, ModelRoute]
    """The policy's models (the one that answered is priced by its name)."""


def shadow_threshold(fraction: float) -> int:
    """The 64-bit hash bound that samples ``fraction`` of request ids (1.0: every one)."""
    return min(1 << 64, round(fraction * (1 << 64)))


def _shadow(
    config: pb.RoutingConfig, served: Mapping[str, CompiledPolicy]
) -> dict[str, ShadowRule]:
    rules = {}
    for p in config.policies:
        key = f"{p.namespace}/{p.name}"
        policy = served.get(key)
        spec = p.recording.shadow
        if policy is None or not p.recording.HasField("shadow") or spec.fraction <= 0:
            continue
        model, judge = policy.models.get(spec.model), policy.models.get(spec.judge)
        if model is None or judge is None:  # the operator checks; a hand-made config may not
            continue
        rules[key] = ShadowRule(
            policy=key,
            fraction=spec.fraction,
            threshold=shadow_threshold(spec.fraction),
            model=model,
            judge=judge,
            max_concurrent=max(1, spec.max_concurrent),
            models=policy.models,
        )
    return rules


def _strictest(values: list[int]) -> int:
    bounded = [v for v in values if v > 0]
    return min(bounded) if bounded else 0


def _recording(
    config: pb.RoutingConfig, served: set[str]
) -> tuple[dict[str, RecordingRule], Retention, tuple[str, ...]] | None:
    """``CompiledConfig``'s recording fields; None when no served policy records."""
    on = [p for p in config.policies if p.recording.record and f"{p.namespace}/{p.name}" in served]
    if not on:
        return None
    skip = {*CLIENT_KEY_HEADERS, REQUEST_ID_HEADER, SHADOW_HEADER}
    return (
        {
            f"{p.namespace}/{p.name}": RecordingRule(
                prompts=p.recording.record == pb.Recording.PROMPTS
            )
            for p in on
        },
        Retention(
            max_age_s=_strictest([p.recording.max_age_s for p in on]),
            max_bytes=_strictest([p.recording.max_bytes for p in on]),
        ),
        tuple(h for h in config.request_headers if h not in skip),
    )


def _by_alias(
    config: pb.RoutingConfig, served: Mapping[str, CompiledPolicy]
) -> tuple[dict[str, tuple[CompiledPolicy, ...]], dict[str, tuple[AliasEntry, ...]]]:
    """Alias → the policies answering it, most header conditions (most specific) first; the
    aliases a left-out policy answers are returned apart, as ``CompiledConfig.guarded``."""
    groups: dict[str, list[AliasEntry]] = {}
    for p in config.policies:
        key = f"{p.namespace}/{p.name}"
        policy = served.get(key)
        headers = policy.match_headers if policy else tuple(sorted(p.match_headers.items()))
        for alias in dict.fromkeys(p.aliases):
            groups.setdefault(alias, []).append(AliasEntry(headers, policy, key))
    ordered: dict[str, tuple[CompiledPolicy, ...]] = {}
    guarded: dict[str, tuple[AliasEntry, ...]] = {}
    for alias, group in groups.items():
        group.sort(key=lambda e: -len(e.match_headers))
        picked = [e.policy for e in group if e.policy is not None]
        if len(picked) == len(group):
            ordered[alias] = tuple(picked)
        else:
            guarded[alias] = tuple(group)
    return ordered, guarded


def _unavailable(
    config: pb.RoutingConfig, errors: Mapping[str, str], served_models: Mapping[str, object]
) -> dict[str, str]:
    """Model names only a left-out policy answers → its key."""
    names: dict[str, str] = {}
    for p in config.policies:
        key = f"{p.namespace}/{p.name}"
        if key not in errors:
            continue
        for m in p.models:
            names.setdefault(m.name, key)
            names[f"{key}/{m.name}"] = key
    return {n: k for n, k in names.items() if n not in served_models}
