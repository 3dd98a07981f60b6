"""RoutePolicy documents: the schema users write (YAML or `kubectl apply`) and its validation.

The same document is read from files in local mode and from the Kubernetes API by the operator.
Validation errors name the offending field path (``spec.models[1].pricing.inputPer1M``).

Everything the data plane checks when it loads a policy is checked here first (router bundle
references, regexes, header names, aliases, sizes), so a policy the ext_proc would refuse is
reported on its own status instead of reaching the data plane. What only a data-plane pod can
know (whether a bundle path exists there) is left to the ext_proc, which isolates that policy.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from enum import StrEnum
from typing import Annotated, Any, Literal, get_args

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

from switchyard.extproc.router.bundle import BUILTIN_PREFIX, BUNDLES_DIR, bundle_models

API_VERSION = "switchyard.dev/v1alpha1"
KIND = "RoutePolicy"

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
Name = Annotated[str, Field(pattern=DNS_LABEL, max_length=63)]
HTTP_TOKEN = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"
"""RFC 9110 token: a valid header name."""
Alias = Annotated[
    str,
    Field(
        min_length=1,
        max_length=253,
        pattern=r"^\S+$",
        description="A model name clients send (no whitespace).",
    ),
]
HeaderValue = Annotated[str, Field(max_length=253)]
MAX_HEADERS = 16
MAX_TOKENS = 100_000_000
"""Upper bound of token counts (context windows, prompt sizes)."""
MAX_DURATION_MS = 24 * 3_600_000
# List bounds, in the schema itself so local mode and the CRD (whose CEL cost they keep
# finite) accept the same documents.
MAX_ITEMS = {
    "models": 32,
    "fallbacks": 8,
    "rules": 64,
    "tiers": 16,
    "capabilities": 8,
    "dataClasses": 16,
    "keywords": 64,
    "category": 16,
    "on": 8,
    "detectors": 8,
    "raiseFrom": 16,
    "examples": 32,
}
MAX_EXAMPLE_CHARS = 1000
"""Longest example utterance of a semantic condition (the router reads 512 tokens at most)."""
HEURISTIC_BUNDLE = "builtin:heuristic"
"""The placeholder scorer (``switchyard.extproc.state``), not a directory."""
Category = Literal["math", "code", "reasoning", "knowledge", "writing", "extraction", "chat"]
"""The router's categories (``switchyard.extproc.scoring.CATEGORIES``; a unit test keeps them
in step): a rule naming another one would never match."""


@functools.cache
def builtin_bundles() -> tuple[str, ...]:
    """Every ``builtin:<name>`` router bundle this build ships (package data: fixed)."""
    names = [p.name for p in BUNDLES_DIR.iterdir() if (p / "router.yaml").is_file()]
    return tuple(sorted([HEURISTIC_BUNDLE, *(BUILTIN_PREFIX + n for n in names)]))


@functools.cache
def builtin_kind(ref: str) -> str:
    """``kind`` of a builtin bundle's router.yaml (static, encoder); "" when it has none (the
    heuristic placeholder)."""
    try:
        doc = yaml.safe_load((BUNDLES_DIR / ref[len(BUILTIN_PREFIX) :] / "router.yaml").read_text())
    except OSError:
        return ""
    return str(doc.get("kind", "")) if isinstance(doc, dict) else ""


def check_bundle(ref: str) -> str:
    """A builtin bundle that exists, or an absolute, normalised path (checked on the pods)."""
    if ref.startswith(BUILTIN_PREFIX):
        known = builtin_bundles()
        if ref not in known:
            raise ValueError(f"unknown builtin router bundle {ref!r} (known: {', '.join(known)})")
        return ref
    if not ref.startswith("/"):
        raise ValueError(
            f"router bundle {ref!r} must be builtin:<name> or an absolute directory path"
        )
    parts = ref.split("/")[1:]
    if any(part in ("", ".", "..") for part in parts) or any(
        ord(c) < 32 or c == "\x7f" for c in ref
    ):
        raise ValueError(
            f"router bundle path {ref!r} must be normalised (no empty, '.' or '..' segments, "
            "no trailing '/', no control characters)"
        )
    return ref


@functools.cache
def builtin_models(ref: str) -> tuple[str, ...]:
    """The models a builtin bundle predicts scores for (none for an unfitted bundle)."""
    if ref == HEURISTIC_BUNDLE:
        return ()
    return bundle_models(ref) or ()


def missing_predictions(spec: RoutePolicySpec, labels: tuple[str, ...]) -> str:
    """Why a predictive policy cannot use a bundle predicting ``labels``; "" when it can."""
    assert spec.strategy.predictive is not None
    mapping = spec.strategy.predictive.model_map
    bundle = spec.strategy.router.bundle
    if not labels:
        return (
            f"router bundle {bundle!r} gives no per-model predictions; the predictive strategy "
            "needs one fitted with `switchyard router fit`"
        )
    missing = [
        m.name if mapping.get(m.name, m.name) == m.name else f"{m.name} (as {mapping[m.name]})"
        for m in spec.models
        if mapping.get(m.name, m.name) not in labels
    ]
    if not missing:
        return ""
    return (
        f"router bundle {bundle!r} has no prediction for model(s) {', '.join(missing)} "
        f"(it predicts: {', '.join(labels)}); map policy models to its labels with "
        "strategy.predictive.modelMap"
    )


def check_header_names(headers: dict[str, str]) -> dict[str, str]:
    """Header names must be HTTP tokens; they are matched lowercased."""
    for name in headers:
        if not re.fullmatch(HTTP_TOKEN, name) or len(name) > 128:
            raise ValueError(f"{name!r} is not a valid HTTP header name")
    return {k.lower(): v for k, v in headers.items()}


_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}


def duration_ms(text: str) -> int:
    """'1m30s' → 90000 (the policy's duration syntax, already validated)."""
    return round(
        sum(
            float(n) * _UNITS_MS[u]
            for n, _, u in re.findall(r"([0-9]+(\.[0-9]+)?)(ms|s|m|h)", text)
        )
    )


class Capability(StrEnum):
    """Optional request features a model must support to receive a request that uses them."""

    TOOLS = "tools"
    JSON = "json"
    IMAGES = "images"


Detector = Literal[
    "email", "phone", "payment-card", "iban", "us-ssn", "uk-nino", "de-tax-id", "es-dni"
]
"""The built-in personal-data detectors (``switchyard.extproc.pii.DETECTORS``; a unit test
keeps them in step)."""
DataClass = Annotated[str, Field(pattern=DNS_LABEL, max_length=63)]


class PersonalDataAction(StrEnum):
    ROUTE = "route"
    REDACT = "redact"


class StrategyType(StrEnum):
    RULES = "rules"
    CLASSIFIER = "classifier"
    WEIGHTED = "weighted"
    PREDICTIVE = "predictive"


class _Spec(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        allow_inf_nan=False,
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
    input_per_1m: float = Field(ge=0, le=1_000_000, description="USD per 1M input tokens.")
    output_per_1m: float = Field(ge=0, le=1_000_000, description="USD per 1M output tokens.")


class ModelSpec(_Spec):
    name: Name
    backend: Backend
    upstream_model: str = Field(min_length=1, description="Model id sent to the backend.")
    pricing: Pricing
    context_window: int = Field(default=8192, ge=256, le=MAX_TOKENS)
    capabilities: list[Capability] = Field(
        default_factory=list, max_length=MAX_ITEMS["capabilities"]
    )
    tier: str | None = None
    data_classes: list[DataClass] = Field(
        default_factory=lambda: ["public"], max_length=MAX_ITEMS["dataClasses"]
    )
    fallbacks: list[str] = Field(default_factory=list, max_length=MAX_ITEMS["fallbacks"])
    weight: float = Field(default=1.0, ge=0, le=1_000_000)
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
    models: list[Alias] = Field(
        min_length=1, max_length=MAX_ITEMS["models"], description="Aliases clients send as `model`."
    )
    headers: dict[str, HeaderValue] = Field(default_factory=dict, max_length=MAX_HEADERS)

    @field_validator("headers")
    @classmethod
    def _lower_headers(cls, headers: dict[str, str]) -> dict[str, str]:
        return check_header_names(headers)


class SemanticWhen(_Spec):
    """Prompts similar to a few example utterances (no training data needed)."""

    examples: list[Annotated[str, Field(min_length=1, max_length=MAX_EXAMPLE_CHARS)]] = Field(
        min_length=1,
        max_length=MAX_ITEMS["examples"],
        description=(
            "Example prompts of the intent (1-32); a prompt matches by its cosine similarity "
            "to the closest one, in the router bundle's static token embeddings."
        ),
    )
    threshold: float = Field(
        ge=0,
        le=1,
        description=(
            "Lowest similarity (0-1) that matches; unrelated prompts score about 0.25, "
            "paraphrases about 0.6 (0.5 matched 69-81% of paraphrases and 0.5-3.7% of others, "
            "docs/router-model.md)."
        ),
    )

    @field_validator("examples")
    @classmethod
    def _not_blank(cls, examples: list[str]) -> list[str]:
        for i, example in enumerate(examples):
            if not example.strip():
                raise ValueError(f"examples[{i}]: blank (no words to compare)")
        return examples


class RuleWhen(_Spec):
    models: list[Alias] = Field(default_factory=list, max_length=MAX_ITEMS["models"])
    headers: dict[str, HeaderValue] = Field(default_factory=dict, max_length=MAX_HEADERS)
    min_prompt_tokens: int = Field(default=0, ge=0, le=MAX_TOKENS)
    max_prompt_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    keywords: list[Annotated[str, Field(min_length=1, max_length=253)]] = Field(
        default_factory=list, max_length=MAX_ITEMS["keywords"]
    )
    regex: str | None = Field(default=None, max_length=1024)
    category: list[Category] = Field(default_factory=list, max_length=MAX_ITEMS["category"])
    min_difficulty: float | None = Field(default=None, ge=0, le=1)
    max_difficulty: float | None = Field(default=None, ge=0, le=1)
    semantic: SemanticWhen | None = Field(
        default=None,
        description="Match prompts similar to example utterances (the router's embeddings).",
    )

    @model_validator(mode="after")
    def _token_range(self) -> RuleWhen:
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < self.min_prompt_tokens:
            raise ValueError("maxPromptTokens must not be below minPromptTokens (never matches)")
        return self

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
        return check_header_names(headers)


class Rule(_Spec):
    name: str | None = None
    when: RuleWhen
    route: str


class Tier(_Spec):
    model: str
    max_difficulty: float | None = Field(default=None, ge=0, le=1)


CRON = (
    r"^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|"
    r"[0-9A-Za-z*/,?-]+( [0-9A-Za-z*/,?-]+){4})$"
)
"""A CronJob schedule: five fields, or a macro such as @daily (the API server checks the rest)."""


class Refit(_Spec):
    """Refit the router on the deployment's own outcomes: the operator runs
    ``switchyard router fit`` in a Job (on ``schedule``, and on demand with the annotation
    ``switchyard.dev/refit``), and each bundle it writes becomes the policy's router
    (``status.router.activeBundle``); the previous ones are kept for rollback."""

    schedule: str = Field(
        pattern=CRON,
        max_length=64,
        description="When to refit, as a CronJob schedule (e.g. '0 3 * * *': daily at 03:00).",
    )
    min_outcomes: int = Field(
        default=300,
        ge=1,
        le=100_000_000,
        description="Fewer outcome records than this: no fit (the bundle in force stays).",
    )
    models: list[Annotated[str, Field(min_length=1, max_length=253)]] = Field(
        default_factory=list,
        max_length=MAX_ITEMS["models"],
        description="Models the bundle predicts (fit --models); empty: every model present.",
    )
    keep: int = Field(
        default=3,
        ge=2,
        le=20,
        description="Bundles kept: the active one and keep - 1 to roll back to (older fitted "
        "bundles are deleted).",
    )
    suspend: bool = Field(
        default=False, description="Stop scheduled refits (on-demand ones still run)."
    )


class Router(_Spec):
    bundle: str = Field(default="builtin:default", max_length=253)
    refit: Refit | None = None

    @field_validator("bundle")
    @classmethod
    def _bundle(cls, bundle: str) -> str:
        return check_bundle(bundle)


class Predictive(_Spec):
    """The predictive strategy's knob: exactly one of ``maxQualityLoss`` or ``costWeight``."""

    max_quality_loss: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description=(
            "Pick the cheapest allowed model whose predicted score is at least the best allowed "
            "model's minus this (scores are in [0, 1]; 0.02 = give up at most 2 points)."
        ),
    )
    cost_weight: float | None = Field(
        default=None,
        ge=0,
        le=1000,
        description=(
            "Lambda: pick the allowed model maximising predicted score - costWeight x blended "
            "price (USD per 1M tokens, 3 input : 1 output)."
        ),
    )
    model_map: dict[str, Annotated[str, Field(min_length=1, max_length=253)]] = Field(
        default_factory=dict,
        max_length=MAX_ITEMS["models"],
        description=(
            "Policy model name -> the bundle's model label (labels.models), for models whose "
            "names differ; unlisted models are looked up by their own name."
        ),
    )

    @model_validator(mode="after")
    def _one_knob(self) -> Predictive:
        if (self.max_quality_loss is None) == (self.cost_weight is None):
            raise ValueError("set exactly one of maxQualityLoss or costWeight")
        return self


class Strategy(_Spec):
    type: StrategyType
    router: Router = Field(default_factory=Router)
    predictive: Predictive | None = Field(
        default=None,
        description="The predictive strategy's knob (required by, and only for, that strategy).",
    )
    tiers: list[Tier] = Field(default_factory=list, max_length=MAX_ITEMS["tiers"])
    rules: list[Rule] = Field(default_factory=list, max_length=MAX_ITEMS["rules"])
    default: str | None = Field(
        default=None,
        description=(
            "Model used when no rule matches (rules strategy), or when the router gives no "
            "prediction (predictive strategy)."
        ),
    )


_DURATION = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"


def _bounded(duration: str | None) -> str | None:
    if duration is not None and duration_ms(duration) > MAX_DURATION_MS:
        raise ValueError(f"{duration!r} exceeds 24h")
    return duration


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


class PersonalData(_Spec):
    """Built-in personal-data detection on every message: it can only make a class stricter."""

    detect: bool = Field(
        default=True, description="Scan requests for personal data (default true)."
    )
    action: PersonalDataAction = Field(
        default=PersonalDataAction.ROUTE,
        description=(
            "route: raise the request's data class to dataClass, so only models allowing it "
            "are candidates (403 data_class_not_allowed when none may take it); redact: "
            "replace each match with [REDACTED:<detector>] in the body sent upstream and keep "
            "the declared class."
        ),
    )
    detectors: list[Detector] = Field(
        default_factory=lambda: list(get_args(Detector)),
        min_length=1,
        max_length=MAX_ITEMS["detectors"],
        description=(
            "Detectors to run (default all): email, phone, payment-card (Luhn), iban "
            "(mod-97), us-ssn, uk-nino, de-tax-id (Steuer-ID check digit), es-dni (DNI/NIE "
            "check letter)."
        ),
    )
    data_class: DataClass = Field(
        default="pii", description="route: the data class a request with personal data gets."
    )
    raise_from: list[DataClass] = Field(
        default_factory=lambda: ["public", "internal"],
        max_length=MAX_ITEMS["raiseFrom"],
        description=(
            "route: the declared classes (unset means public) that detection raises to "
            "dataClass; any other declared class is kept, as at least as strict."
        ),
    )

    @field_validator("detectors")
    @classmethod
    def _unique(cls, detectors: list[str]) -> list[str]:
        if len(set(detectors)) != len(detectors):
            raise ValueError("detectors must not repeat")
        return detectors

    @model_validator(mode="after")
    def _strict_class(self) -> PersonalData:
        if self.data_class in self.raise_from:
            raise ValueError("raiseFrom must not contain dataClass (nothing to raise)")
        return self


class RecordMode(StrEnum):
    NONE = "none"
    DECISIONS = "decisions"
    PROMPTS = "prompts"


_AGE = r"^[0-9]+(d|h|m)$"
_BYTES = r"^[0-9]+(Ki|Mi|Gi|Ti)?$"
_AGE_S = {"d": 86_400, "h": 3_600, "m": 60}
_BYTES_UNIT = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}


def age_seconds(text: str) -> int:
    """'30d' → 2592000 (an already validated ``retention.maxAge``)."""
    return int(text[:-1]) * _AGE_S[text[-1]]


def byte_count(text: str) -> int:
    """'1Gi' → 1073741824 (an already validated ``retention.maxBytes``)."""
    unit = text[-2:]
    return int(text[:-2]) * _BYTES_UNIT[unit] if unit in _BYTES_UNIT else int(text)


class Retention(_Spec):
    """How long the recording directory keeps files (the strictest policy's applies to all)."""

    max_age: str = Field(
        default="30d",
        pattern=_AGE,
        max_length=16,
        description="Files older than this are deleted (e.g. 30d, 12h; 0d: no age limit).",
    )
    max_bytes: str = Field(
        default="1Gi",
        pattern=_BYTES,
        max_length=24,
        description="The directory is pruned, oldest files first, to at most this size "
        "(bytes, or Ki/Mi/Gi/Ti; 0: no size limit).",
    )

    @field_validator("max_bytes", mode="before")
    @classmethod
    def _number(cls, value: object) -> object:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class Shadow(_Spec):
    """Shadow evaluation: a share of the requests also go to a second model (never returned to
    the client), and a judge model scores both answers as feedback."""

    fraction: float = Field(
        ge=0.0,
        le=1.0,
        description="Share of the policy's requests shadowed (chosen by a hash of the request "
        "id); 0 turns it off.",
    )
    model: str = Field(
        min_length=1, max_length=253, description="The policy's model that answers as well."
    )
    judge: str = Field(
        min_length=1, max_length=253, description="The policy's model that scores both answers."
    )
    max_concurrent: int = Field(
        default=4,
        ge=1,
        le=256,
        description="Shadow evaluations in flight at once per ext_proc worker; more wait in a "
        "bounded queue, and past it are dropped (switchyard_shadow_evaluations_total).",
    )


class Outcomes(_Spec):
    """Request recording, so that outcomes (POST /v1/feedback) accrue for router fit."""

    record: RecordMode = Field(
        default=RecordMode.NONE,
        description="none (default); decisions: each routed request's id, time, alias, chosen "
        "model, reason and routing headers; prompts: the same plus the client's request body.",
    )
    retention: Retention = Field(default_factory=Retention)
    shadow: Shadow | None = Field(
        default=None,
        description="Off unless set. Needs record: prompts; model and judge name models of "
        "this policy. Its requests cost like any other (switchyard_shadow_cost_usd_total).",
    )

    @field_validator("record", mode="before")
    @classmethod
    def _yaml_off(cls, value: object) -> object:
        return "none" if value is False else value  # YAML 1.1 reads `off`/`no` as false

    @model_validator(mode="after")
    def _shadow_records_prompts(self) -> Outcomes:
        if self.shadow is not None and self.record is not RecordMode.PROMPTS:
            raise ValueError(
                "outcomes.shadow: needs outcomes.record: prompts (the judge reads the prompt, "
                "and its scores are joined to the recorded request)"
            )
        return self


class RetryOn(StrEnum):
    CONNECT_FAILURE = "connect-failure"
    RESET = "reset"
    STATUS_429 = "429"
    STATUS_5XX = "5xx"


class Retries(_Spec):
    attempts: int = Field(default=1, ge=0, le=10)
    per_try_timeout: str | None = Field(default=None, pattern=_DURATION, max_length=32)
    on: list[RetryOn] = Field(
        default_factory=lambda: [RetryOn.CONNECT_FAILURE, RetryOn.RESET], max_length=MAX_ITEMS["on"]
    )

    _per_try_bounded = field_validator("per_try_timeout")(_bounded)


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


class BudgetOnExhausted(StrEnum):
    REJECT = "reject"
    DOWNGRADE = "downgrade"


class BudgetSpec(_Spec):
    """What a request gets once its client key's tenant has spent a budget (ClientKeys
    ``limits.budgets``)."""

    on_exhausted: BudgetOnExhausted = Field(
        default=BudgetOnExhausted.REJECT,
        description=(
            "reject: 429 with Retry-After naming the budget; downgrade: route among "
            "downgradeTo (within the key's allowance), served past the budget and still counted"
        ),
    )
    downgrade_to: list[str] = Field(
        default_factory=list,
        max_length=MAX_ITEMS["models"],
        description="downgrade: the (cheaper) models of this policy a request may still use",
    )

    @model_validator(mode="after")
    def _models_for_downgrade(self) -> BudgetSpec:
        downgrade = self.on_exhausted is BudgetOnExhausted.DOWNGRADE
        if downgrade != bool(self.downgrade_to):
            raise ValueError(
                "downgradeTo: required by onExhausted: downgrade"
                if downgrade
                else "downgradeTo: only onExhausted: downgrade reads it"
            )
        return self


class RoutePolicySpec(_Spec):
    match: Match
    models: list[ModelSpec] = Field(min_length=1, max_length=MAX_ITEMS["models"])
    strategy: Strategy
    session_affinity: SessionAffinity | None = None
    personal_data: PersonalData = Field(default_factory=PersonalData)
    outcomes: Outcomes = Field(default_factory=Outcomes)
    retries: Retries = Field(default_factory=Retries)
    timeout: str = Field(default="300s", pattern=_DURATION, max_length=32)
    autoscaling: Autoscaling | None = None
    budget: BudgetSpec | None = Field(
        default=None, description="Spent client budgets (unset: 429 with Retry-After)."
    )

    _timeout_bounded = field_validator("timeout")(_bounded)

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
        aliases = self.match.models
        for i, alias in enumerate(aliases):
            if alias in aliases[:i]:
                raise ValueError(f"match.models[{i}]: duplicate alias {alias!r}")
        strategy = self.strategy
        for i, rule in enumerate(strategy.rules):
            check(rule.route, f"strategy.rules[{i}].route")
            for j, alias in enumerate(rule.when.models):
                if alias not in self.match.models:
                    raise ValueError(
                        f"strategy.rules[{i}].when.models[{j}]: {alias!r} is not one of "
                        "match.models, so the rule would never match"
                    )
            when = rule.when
            if when.semantic is not None:
                self._check_semantic(i)
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
        shadow = self.outcomes.shadow
        if shadow is not None:
            check(shadow.model, "outcomes.shadow.model")
            check(shadow.judge, "outcomes.shadow.judge")
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
        self._check_predictive(names)
        if strategy.type is StrategyType.WEIGHTED and not any(m.weight > 0 for m in self.models):
            raise ValueError(
                "models: the weighted strategy needs at least one model with weight > 0"
            )
        return self

    @model_validator(mode="after")
    def _budget_models(self) -> RoutePolicySpec:
        if self.budget is not None:
            names = [m.name for m in self.models]
            for i, name in enumerate(self.budget.downgrade_to):
                if name not in names:
                    raise ValueError(
                        f"budget.downgradeTo[{i}]: unknown model {name!r} "
                        f"(models: {', '.join(names)})"
                    )
        return self

    def _check_semantic(self, index: int) -> None:
        """A semantic condition embeds with the policy's router bundle: a static one (paths are
        checked where they exist, by the ext_proc)."""
        bundle = self.strategy.router.bundle
        if bundle.startswith(BUILTIN_PREFIX) and builtin_kind(bundle) != "static":
            raise ValueError(
                f"strategy.rules[{index}].when.semantic: needs a static-embedding router bundle "
                f"(builtin:default, or one fitted from it); strategy.router.bundle is {bundle!r}"
            )

    def _check_predictive(self, names: list[str]) -> None:
        strategy = self.strategy
        predictive = strategy.type is StrategyType.PREDICTIVE
        if (strategy.predictive is not None) != predictive:
            raise ValueError(
                "strategy.predictive: required by the predictive strategy"
                if predictive
                else "strategy.predictive: only the predictive strategy reads it"
            )
        if strategy.predictive is None:
            return
        if strategy.default is None:
            raise ValueError(
                "strategy.default: the predictive strategy needs a default model (used when "
                "the router gives no prediction)"
            )
        for name in strategy.predictive.model_map:
            if name not in names:
                raise ValueError(
                    f"strategy.predictive.modelMap.{name}: unknown model {name!r} "
                    f"(models: {', '.join(names)})"
                )
        bundle = strategy.router.bundle
        if bundle.startswith(BUILTIN_PREFIX):
            # Package data, fixed: check it here. Paths are checked where they exist.
            missing = missing_predictions(self, builtin_models(bundle))
            if missing:
                raise ValueError(f"strategy.router.bundle: {missing}")


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
