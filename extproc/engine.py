"""The routing engine: a pure function from (config, request, headers, scores) to a decision.

No I/O, no clocks, no randomness of its own (the weighted strategy takes a draw in [0, 1)).
Hard constraints come first: the prompt must fit the model's context window, the model must
support what the request uses (tools, JSON mode, images), and the request's data class must
be allowed on the model. The data class is the declared one (``x-switchyard-data-class``),
raised by the policy's personal-data rule when the processor found personal data
(``ParsedRequest.personal_data``). Strategies then choose among the models that pass.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass, replace

from switchyard.api.v1.routing_pb2 import Strategy
from switchyard.extproc.config import (
    AliasEntry,
    CompiledConfig,
    CompiledPolicy,
    CompiledRule,
    ModelRoute,
)
from switchyard.extproc.errors import GatewayError, policy_unavailable
from switchyard.extproc.request import ParsedRequest
from switchyard.extproc.scoring import RouterScores
from switchyard.extproc.semantic import SemanticCondition
from switchyard.headers import DATA_CLASS_HEADER, DEFAULT_DATA_CLASS


@dataclass(frozen=True, slots=True)
class Decision:
    """Where one request goes and why."""

    model: ModelRoute
    reason: str
    policy: str


def select_target(
    config: CompiledConfig, request: ParsedRequest, headers: Mapping[str, str]
) -> CompiledPolicy | ModelRoute:
    """The policy answering the requested alias, or the concrete model named; 404 otherwise
    (503 for a name of a policy that did not load). Names of a policy that did not load are
    only read on the 404 path, so the lookup of a served name costs what it did."""
    policies = config.policies_by_alias.get(request.model)
    if policies:
        for policy in policies:
            if all(headers.get(k) == v for k, v in policy.match_headers):
                return policy
        raise _no_match(request.model)
    model = config.models_by_name.get(request.model)
    if model is None:
        guarded = config.guarded.get(request.model)
        if guarded is not None:
            return _guarded(guarded, request.model, headers)
        if request.model in config.unavailable:
            raise policy_unavailable(request.model, config.unavailable[request.model])
        raise GatewayError(
            404,
            f"The model '{request.model}' does not exist or is not served by this gateway; "
            "GET /v1/models lists what is",
            code="model_not_found",
            param="model",
        )
    return model


def _no_match(alias: str) -> GatewayError:
    return GatewayError(
        404,
        f"no route policy for model '{alias}' matches this request's headers",
        code="model_not_found",
        param="model",
    )


def _guarded(
    group: tuple[AliasEntry, ...], alias: str, headers: Mapping[str, str]
) -> CompiledPolicy:
    """An alias a left-out policy shares: the policy that matches, 503 if it is left out."""
    for entry in group:
        if all(headers.get(k) == v for k, v in entry.match_headers):
            if entry.policy is None:
                raise policy_unavailable(alias, entry.key)
            return entry.policy
    raise _no_match(alias)


class _Constraints:
    """The hard constraints of one request, checked against candidate models."""

    __slots__ = ("capabilities", "data_class", "detected", "needed_tokens")

    def __init__(
        self,
        request: ParsedRequest,
        headers: Mapping[str, str],
        target: CompiledPolicy | ModelRoute,
    ) -> None:
        self.needed_tokens = request.prompt_tokens + request.max_output_tokens
        self.capabilities = request.capabilities
        self.data_class = headers.get(DATA_CLASS_HEADER) or DEFAULT_DATA_CLASS
        self.detected = ""  # the detector that raised the data class
        rule = target.personal_data
        if (
            request.personal_data
            and not request.redacted
            and rule is not None
            and self.data_class in rule.raise_from
        ):
            self.data_class = rule.data_class
            self.detected = request.personal_data

    def allows(self, model: ModelRoute) -> bool:
        return (
            model.context_window >= self.needed_tokens
            and self.capabilities <= model.capabilities
            and self.data_class in model.data_classes
        )

    def why_not(self, model: ModelRoute) -> str:
        """Why ``model`` may not take the request; "" when it may (traces, not the hot path)."""
        if self.data_class not in model.data_classes:
            return f"data class {self.data_class} not allowed"
        missing = sorted(self.capabilities - model.capabilities)
        if missing:
            return f"lacks {', '.join(missing)}"
        if model.context_window < self.needed_tokens:
            return f"context window {model.context_window} < {self.needed_tokens} tokens needed"
        return ""

    def rejection(self, models: list[ModelRoute]) -> GatewayError:
        """The clearest error explaining why none of ``models`` may take the request."""
        if not any(self.data_class in m.data_classes for m in models):
            why = f" (personal data detected: {self.detected})" if self.detected else ""
            return GatewayError(
                403,
                f"data class '{self.data_class}'{why} is not allowed on any model this request "
                "may use",
                code="data_class_not_allowed",
                type_="permission_error",
            )
        missing = sorted(
            self.capabilities - set().union(*(m.capabilities for m in models))
            if models
            else self.capabilities
        )
        if missing:
            return GatewayError(
                400,
                f"no model this request may use supports: {', '.join(missing)}",
                code="unsupported_capability",
            )
        largest = max((m.context_window for m in models), default=0)
        return GatewayError(
            400,
            f"the request needs about {self.needed_tokens} tokens (prompt plus max tokens); "
            f"the largest context window available is {largest}",
            code="context_length_exceeded",
            param="messages",
        )


class _KeyConstraints(_Constraints):
    """The hard constraints plus the client key's model allowance (a subclass, so requests
    without a limited key pay nothing for it)."""

    __slots__ = ("models",)

    def __init__(
        self,
        request: ParsedRequest,
        headers: Mapping[str, str],
        target: CompiledPolicy | ModelRoute,
        models: frozenset[str],
    ) -> None:
        super().__init__(request, headers, target)
        self.models = models

    def allows(self, model: ModelRoute) -> bool:
        return model.name in self.models and super().allows(model)

    def why_not(self, model: ModelRoute) -> str:
        if model.name not in self.models:
            return "not allowed for this API key"
        return super().why_not(model)

    def rejection(self, models: list[ModelRoute]) -> GatewayError:
        permitted = [m for m in models if m.name in self.models]
        if not permitted:
            names = ", ".join(sorted(m.name for m in models))
            return GatewayError(
                403,
                f"this API key may not use any model this request may be routed to ({names})",
                code="permission_denied",
                type_="permission_error",
            )
        return super().rejection(permitted)


def _constraints(
    request: ParsedRequest,
    headers: Mapping[str, str],
    target: CompiledPolicy | ModelRoute,
    models: frozenset[str] | None,
) -> _Constraints:
    if models is None:
        return _Constraints(request, headers, target)
    return _KeyConstraints(request, headers, target, models)


def _first_allowed(
    policy: CompiledPolicy, model: ModelRoute, constraints: _Constraints
) -> tuple[ModelRoute, bool] | None:
    """The model itself if allowed, else its first allowed fallback (flagged True)."""
    if constraints.allows(model):
        return model, False
    for name in model.fallbacks:
        fallback = policy.models[name]
        if constraints.allows(fallback):
            return fallback, True
    return None


def _rule_matches(
    rule: CompiledRule,
    request: ParsedRequest,
    headers: Mapping[str, str],
    scores: RouterScores | None,
    lowered_prompt: str,
) -> bool:
    if rule.aliases and request.model not in rule.aliases:
        return False
    if any(headers.get(k) != v for k, v in rule.headers):
        return False
    if request.prompt_tokens < rule.min_prompt_tokens:
        return False
    if rule.max_prompt_tokens and request.prompt_tokens > rule.max_prompt_tokens:
        return False
    if rule.keywords and not any(k in lowered_prompt for k in rule.keywords):
        return False
    if rule.regex is not None and rule.regex.search(request.prompt) is None:
        return False
    if rule.needs_scores:
        if scores is None:
            return False
        if rule.categories and scores.category not in rule.categories:
            return False
        if rule.min_difficulty is not None and scores.difficulty < rule.min_difficulty:
            return False
        if rule.max_difficulty is not None and scores.difficulty > rule.max_difficulty:
            return False
    return True


def _similarities(policy: CompiledPolicy, scores: RouterScores | None) -> list[float]:
    """The prompt's cosine similarity to every semantic example of the policy (one
    matrix-vector product); [] without an embedding."""
    embedding = None if scores is None else scores.embedding
    if embedding is None or policy.semantic_examples is None:
        return []
    similarities: list[float] = (policy.semantic_examples @ embedding).tolist()
    return similarities


def _semantic(condition: SemanticCondition, similarities: list[float]) -> str:
    """The reason's suffix (``, semantic 0.712 >= 0.6``) when the prompt is close enough to
    one of the condition's examples, else "". The reason carries figures, never text."""
    if not similarities:
        return ""
    best = condition.best(similarities)
    if best < condition.threshold:
        return ""
    return f", semantic {best:.3f} >= {condition.threshold:g}"


def _classify(
    policy: CompiledPolicy, scores: RouterScores, constraints: _Constraints
) -> Decision | None:
    difficulty = scores.difficulty
    covering = next(
        (i for i, (_, bound) in enumerate(policy.tiers) if difficulty <= bound),
        len(policy.tiers) - 1,
    )
    # The cheapest allowed tier that covers the difficulty; failing that, the most capable
    # allowed tier below it (a constrained request still gets the best model it may use).
    order = [*range(covering, len(policy.tiers)), *range(covering - 1, -1, -1)]
    for i in order:
        model, bound = policy.tiers[i]
        if constraints.allows(model):
            how = "" if i == covering else ", constrained"
            return Decision(
                model,
                f"classifier: difficulty {difficulty:.2f} <= {bound:.2f} ({scores.category}){how}"
                if i == covering
                else f"classifier: difficulty {difficulty:.2f} ({scores.category}){how}",
                policy.key,
            )
    return None


def _predictive(
    policy: CompiledPolicy, scores: RouterScores | None, constraints: _Constraints
) -> Decision | None:
    """The cheapest allowed model predicted within the target of the best allowed one, or the
    allowed model with the best predicted score - lambda x blended price; ties go to the
    cheaper. Without predictions (a heuristic scorer): the default model (or its fallbacks,
    or else the cheapest allowed model)."""
    rule = policy.predictive
    assert rule is not None
    predicted = None if scores is None else scores.predicted
    allowed: list[tuple[ModelRoute, float, float]] = []
    if predicted is not None:
        for model, label, price in rule.candidates:
            score = predicted.get(label)
            if score is not None and score == score and constraints.allows(model):  # not NaN
                allowed.append((model, score, price))
    if not allowed:  # no predictions, or none for a model the request may use
        return _predictive_default(policy, constraints)
    loss = rule.max_quality_loss
    if loss is not None:
        best = max(score for _, score, _ in allowed)
        # candidates are cheapest first; 1e-9 keeps an exact target from failing on rounding
        model, score, _ = next(c for c in allowed if c[1] >= best - loss - 1e-9)
        return Decision(
            model,
            f"predictive: {model.name} {score:.3f} >= best {best:.3f} - {loss:g}",
            policy.key,
        )
    weight = rule.cost_weight or 0.0
    model, score, price = max(allowed, key=lambda c: c[1] - weight * c[2])  # first max wins
    return Decision(
        model,
        f"predictive: {model.name} {score:.3f} - {weight:g} x {price:g}/1M "
        f"= {score - weight * price:.3f} best",
        policy.key,
    )


def _predictive_default(policy: CompiledPolicy, constraints: _Constraints) -> Decision | None:
    default = policy.default_model
    assert default is not None
    picked = _first_allowed(policy, default, constraints)
    if picked is None:  # nor its fallbacks: the cheapest model the request may use
        rule = policy.predictive
        assert rule is not None
        cheapest = next((c[0] for c in rule.candidates if constraints.allows(c[0])), None)
        if cheapest is None:
            return None
        return Decision(cheapest, "predictive: no prediction, cheapest allowed", policy.key)
    model, fell_back = picked
    suffix = f", fallback from {default.name}" if fell_back else ""
    return Decision(model, f"predictive: no prediction, default{suffix}", policy.key)


def _weighted(policy: CompiledPolicy, draw: float, constraints: _Constraints) -> Decision | None:
    models = policy.weighted_models
    total = policy.weighted_cumulative[-1]
    start = min(bisect_right(policy.weighted_cumulative, draw * total), len(models) - 1)
    for offset in range(len(models)):
        model = models[(start + offset) % len(models)]
        if constraints.allows(model):
            return Decision(
                model, "weighted" if offset == 0 else "weighted, constrained", policy.key
            )
    return None


def session_view(
    target: CompiledPolicy | ModelRoute, request: ParsedRequest, headers: Mapping[str, str]
) -> tuple[ParsedRequest, float | None]:
    """Session affinity: for a policy with a session header that the request carries, the
    request as routing sees it (its conversation's first user message, the same on every turn)
    and the session's fixed draw for the weighted strategy. Otherwise the request and None."""
    header = target.session_header if isinstance(target, CompiledPolicy) else ""
    session = headers.get(header) if header else None
    if not session:
        return request, None
    digest = hashlib.blake2b(session.encode(), digest_size=8).digest()
    return replace(request, prompt=request.first_prompt), int.from_bytes(digest) / 2**64


def exclusions(
    target: CompiledPolicy | ModelRoute,
    request: ParsedRequest,
    headers: Mapping[str, str],
    allowed_models: frozenset[str] | None = None,
) -> dict[str, str]:
    """Each candidate model of ``target`` → why the hard constraints exclude it ("" allowed)."""
    constraints = _constraints(request, headers, target, allowed_models)
    models = [target] if isinstance(target, ModelRoute) else list(target.models.values())
    return {m.name: constraints.why_not(m) for m in models}


def decide(
    target: CompiledPolicy | ModelRoute,
    request: ParsedRequest,
    headers: Mapping[str, str],
    scores: RouterScores | None,
    draw: float = 0.0,
    allowed_models: frozenset[str] | None = None,
) -> Decision:
    """Pick the model for one request; raise GatewayError when no model may take it.

    ``scores`` is required when ``target.needs_scores``; ``draw`` in [0, 1) drives the
    weighted strategy. ``allowed_models`` (the client key's allowance; None: any) is a hard
    constraint: a 403 only when no model it allows may take the request. The reason ends
    with ``, pii: <detector>`` when personal data was found, ``, pii redacted: <detector>``
    when it was redacted (never the text; a comma, so the reason's kind, what precedes the
    first ":" or ",", stays the strategy's).
    """
    decision = _decide(target, request, headers, scores, draw, allowed_models)
    if request.personal_data:
        how = "pii redacted" if request.redacted else "pii"
        return replace(decision, reason=f"{decision.reason}, {how}: {request.personal_data}")
    return decision


def _decide(
    target: CompiledPolicy | ModelRoute,
    request: ParsedRequest,
    headers: Mapping[str, str],
    scores: RouterScores | None,
    draw: float,
    allowed_models: frozenset[str] | None,
) -> Decision:
    constraints = (
        _Constraints(request, headers, target)
        if allowed_models is None
        else _KeyConstraints(request, headers, target, allowed_models)
    )
    if isinstance(target, ModelRoute):
        if not constraints.allows(target):
            raise constraints.rejection([target])
        return Decision(target, "direct: model named in request", target.policy)

    policy = target
    if policy.rules:
        lowered = request.prompt.lower()
        similarities: list[float] | None = None  # to every semantic example, once
        for rule in policy.rules:
            if _rule_matches(rule, request, headers, scores, lowered):
                how = ""
                condition = rule.semantic
                if condition is not None:  # last: the costliest condition
                    if similarities is None:
                        similarities = _similarities(policy, scores)
                    how = _semantic(condition, similarities)
                    if not how:
                        continue
                picked = _first_allowed(policy, policy.models[rule.route], constraints)
                if picked is not None:
                    model, fell_back = picked
                    suffix = f", fallback from {rule.route}" if fell_back else ""
                    return Decision(model, f"rule: {rule.name}{how}{suffix}", policy.key)

    decision: Decision | None = None
    if policy.strategy == Strategy.CLASSIFIER:
        if scores is None:
            raise ValueError("the classifier strategy needs router scores")
        decision = _classify(policy, scores, constraints)
    elif policy.strategy == Strategy.WEIGHTED:
        decision = _weighted(policy, draw, constraints)
    elif policy.strategy == Strategy.PREDICTIVE:
        decision = _predictive(policy, scores, constraints)
    elif policy.default_model is not None:
        picked = _first_allowed(policy, policy.default_model, constraints)
        if picked is not None:
            model, fell_back = picked
            reason = "default" + (
                f", fallback from {policy.default_model.name}" if fell_back else ""
            )
            decision = Decision(model, reason, policy.key)
    if decision is None:
        raise constraints.rejection(list(policy.models.values()))
    return decision
