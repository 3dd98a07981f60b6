"""RoutePolicy documents: the schema users write (YAML or `kubectl apply`) and its validation.

The same document is read from files in local mode and from the Kubernetes API by the operator.
Validation errors name the offending field path (``spec.models[1].pricing.inputPer1M``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from enum import StrEnum
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

API_VERSION = "switchyard.dev/v1alpha1"
KIND = "RoutePolicy"

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
Name = Annotated[str, Field(pattern=DNS_LABEL, max_length=63)]


class Capability(StrEnum):
    """Optional request features a model must support to receive a request that uses them."""

    TOOLS = "tools"
    JSON = "json"
    IMAGES = "images"


class StrategyType(StrEnum):
    RULES = "rules"
    CLASSIFIER = "classifier"
    WEIGHTED = "weighted"


class _Spec(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class ServiceRef(_Spec):
    name: Name
    namespace: Name | None = None
    port: int = Field(ge=1, le=65535)


class SecretKeyRef(_Spec):
    name: Name
    key: str = Field(min_length=1)


class Backend(_Spec):
    """Where a model is served: an external URL or an in-cluster Service."""

    url: str | None = Field(
        default=None,
        pattern=r"^https?://[^/\s:]+(:[0-9]{1,5})?(/\S*)?$",
        description="External OpenAI-compatible base URL (http or https).",
    )
    service: ServiceRef | None = None
    api_key_env: str | None = Field(
        default=None, description="Local mode: environment variable holding the API key."
    )
    api_key_secret: SecretKeyRef | None = Field(
        default=None, description="Kubernetes: Secret key holding the provider API key."
    )
    ca_bundle: str | None = Field(
        default=None,
        pattern=r"^\s*-----BEGIN CERTIFICATE-----",
        max_length=65536,
        description=(
            "https URLs: PEM CA certificate(s) that verify the backend (default: the system "
            "CAs). The certificate must name the URL's host."
        ),
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Backend:
        if (self.url is None) == (self.service is None):
            raise ValueError("set exactly one of url or service")
        if self.ca_bundle is not None and not (self.url or "").startswith("https://"):
            raise ValueError("caBundle needs an https url")
        return self


class Pricing(_Spec):
    input_per_1m: float = Field(ge=0, description="USD per 1M input tokens.")
    output_per_1m: float = Field(ge=0, description="USD per 1M output tokens.")


class ModelSpec(_Spec):
    name: Name
    backend: Backend
    upstream_model: str = Field(min_length=1, description="Model id sent to the backend.")
    pricing: Pricing
    context_window: int = Field(default=8192, ge=256)
    capabilities: list[Capability] = Field(default_factory=list)
    tier: str | None = None
    data_classes: list[Annotated[str, Field(pattern=DNS_LABEL)]] = Field(
        default_factory=lambda: ["public"]
    )
    fallbacks: list[str] = Field(default_factory=list)
    weight: float = Field(default=1.0, ge=0)
    region: str | None = Field(
        default=None,
        description=(
            "Data residency: only endpoints in clusters of this region serve the model (the "
            "operator's --region, or a remote cluster Secret's switchyard.dev/region label). "
            "Clusters with no region never qualify."
        ),
    )
    cluster: str | None = Field(
        default=None,
        description=(
            "Service backends: the cluster whose endpoints are preferred (default: the "
            "operator's own). The same Service (namespace and name) in other connected clusters "
            "is the failover: first those in the preferred cluster's region, then the rest."
        ),
    )


class Match(_Spec):
    models: list[str] = Field(min_length=1, description="Aliases clients send as `model`.")
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("headers")
    @classmethod
    def _lower_headers(cls, headers: dict[str, str]) -> dict[str, str]:
        return {k.lower(): v for k, v in headers.items()}


class RuleWhen(_Spec):
    models: list[str] = Field(default_factory=list)
    headers: dict[str, str] = Field(default_factory=dict)
    min_prompt_tokens: int = Field(default=0, ge=0)
    max_prompt_tokens: int | None = Field(default=None, ge=1)
    keywords: list[str] = Field(default_factory=list)
    regex: str | None = None
    category: list[str] = Field(default_factory=list)
    min_difficulty: float | None = Field(default=None, ge=0, le=1)
    max_difficulty: float | None = Field(default=None, ge=0, le=1)

    @field_validator("regex")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from exc
        return pattern

    @field_validator("headers")
    @classmethod
    def _lower_headers(cls, headers: dict[str, str]) -> dict[str, str]:
        return {k.lower(): v for k, v in headers.items()}


class Rule(_Spec):
    name: str | None = None
    when: RuleWhen
    route: str


class Tier(_Spec):
    model: str
    max_difficulty: float | None = Field(default=None, ge=0, le=1)


class Router(_Spec):
    bundle: str = "builtin:default"


class Strategy(_Spec):
    type: StrategyType
    router: Router = Field(default_factory=Router)
    tiers: list[Tier] = Field(default_factory=list)
    rules: list[Rule] = Field(default_factory=list)
    default: str | None = Field(
        default=None, description="Model used when no rule matches (rules strategy)."
    )


_DURATION = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"


class SessionAffinity(_Spec):
    """Keep a conversation on one model without shared state: requests carrying ``header``
    are routed on the conversation's first user message (and, under the weighted strategy,
    on a hash of the header's value), so every turn gets the same decision on every replica.
    Hard constraints still apply to each request."""

    header: str = Field(
        pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$",
        max_length=128,
        description="Request header carrying the session or conversation id.",
    )

    @field_validator("header")
    @classmethod
    def _lower(cls, header: str) -> str:
        return header.lower()


class RetryOn(StrEnum):
    CONNECT_FAILURE = "connect-failure"
    RESET = "reset"
    STATUS_429 = "429"
    STATUS_5XX = "5xx"


class Retries(_Spec):
    attempts: int = Field(default=1, ge=0, le=10)
    per_try_timeout: str | None = Field(default=None, pattern=_DURATION)
    on: list[RetryOn] = Field(default_factory=lambda: [RetryOn.CONNECT_FAILURE, RetryOn.RESET])


class Autoscaling(_Spec):
    min_replicas: int = Field(default=2, ge=1)
    max_replicas: int = Field(default=10, ge=1)
    target_cpu_utilization: int = Field(default=70, ge=1, le=100, alias="targetCPUUtilization")
    target_requests_per_second: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("minReplicas must not exceed maxReplicas")
        return self


class RoutePolicySpec(_Spec):
    match: Match
    models: list[ModelSpec] = Field(min_length=1)
    strategy: Strategy
    session_affinity: SessionAffinity | None = None
    retries: Retries = Field(default_factory=Retries)
    timeout: str = Field(default="300s", pattern=_DURATION)
    autoscaling: Autoscaling | None = None

    @model_validator(mode="after")
    def _references(self) -> RoutePolicySpec:
        names = [m.name for m in self.models]
        seen: set[str] = set()
        for i, name in enumerate(names):
            if name in seen:
                raise ValueError(f"models[{i}].name: duplicate model name {name!r}")
            seen.add(name)

        def check(ref: str, where: str) -> None:
            if ref not in seen:
                raise ValueError(f"{where}: unknown model {ref!r} (models: {', '.join(names)})")

        for i, model in enumerate(self.models):
            for j, fallback in enumerate(model.fallbacks):
                check(fallback, f"models[{i}].fallbacks[{j}]")
                if fallback == model.name:
                    raise ValueError(
                        f"models[{i}].fallbacks[{j}]: a model cannot fall back to itself"
                    )
        strategy = self.strategy
        for i, rule in enumerate(strategy.rules):
            check(rule.route, f"strategy.rules[{i}].route")
            when = rule.when
            if (
                when.min_difficulty is not None
                and when.max_difficulty is not None
                and when.min_difficulty > when.max_difficulty
            ):
                raise ValueError(f"strategy.rules[{i}].when: minDifficulty > maxDifficulty")
        for i, tier in enumerate(strategy.tiers):
            check(tier.model, f"strategy.tiers[{i}].model")
        if strategy.default is not None:
            check(strategy.default, "strategy.default")
        if strategy.type is StrategyType.CLASSIFIER:
            if not strategy.tiers:
                raise ValueError("strategy.tiers: the classifier strategy needs at least one tier")
            bounds = [t.max_difficulty for t in strategy.tiers]
            if bounds[-1] is not None and bounds[-1] < 1.0:
                # The last tier takes whatever is left; an explicit cap would drop hard prompts.
                raise ValueError(
                    f"strategy.tiers[{len(bounds) - 1}].maxDifficulty: the last tier must be "
                    "unbounded (omit maxDifficulty) or 1.0"
                )
            for i, bound in enumerate(bounds[:-1]):
                if bound is None:
                    raise ValueError(
                        f"strategy.tiers[{i}].maxDifficulty: required on every tier but the last"
                    )
            known = [b for b in bounds if b is not None]
            if known != sorted(known):
                raise ValueError("strategy.tiers: maxDifficulty must increase from tier to tier")
        if strategy.type is StrategyType.RULES and strategy.default is None:
            raise ValueError("strategy.default: the rules strategy needs a default model")
        if strategy.type is StrategyType.WEIGHTED and not any(m.weight > 0 for m in self.models):
            raise ValueError(
                "models: the weighted strategy needs at least one model with weight > 0"
            )
        return self


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: Name
    namespace: str = "default"
    generation: int = 0


class RoutePolicy(BaseModel):
    """A whole RoutePolicy document."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")
    api_version: Literal["switchyard.dev/v1alpha1"]
    kind: Literal["RoutePolicy"]
    metadata: ObjectMeta
    spec: RoutePolicySpec

    @property
    def key(self) -> str:
        return f"{self.metadata.namespace}/{self.metadata.name}"


class PolicyError(ValueError):
    """A document that is not a valid RoutePolicy; the message names the field."""


def _field_path(loc: Iterable[Any]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += ("." if path else "") + str(part)
    return path


def parse_policy(document: dict[str, Any], source: str = "<policy>") -> RoutePolicy:
    """Validate one parsed document; raise PolicyError whose lines each name a field."""
    try:
        return RoutePolicy.model_validate(document)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            path = _field_path(err["loc"])
            message = err["msg"].removeprefix("Value error, ")
            lines.append(f"{path}: {message}" if path else message)
        raise PolicyError(f"{source}: invalid RoutePolicy\n  " + "\n  ".join(lines)) from None


def load_documents(text: str, source: str) -> list[dict[str, Any]]:
    """All YAML documents in ``text`` that are mappings (empty ones are skipped)."""
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: not valid YAML: {exc}") from None
    result = []
    for doc in docs:
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise PolicyError(f"{source}: every YAML document must be a mapping")
        result.append(doc)
    return result
