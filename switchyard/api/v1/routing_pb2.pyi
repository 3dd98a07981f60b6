from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RoutingConfig(_message.Message):
    __slots__ = ("version", "policies", "fail_open_backend", "request_headers", "client_keys", "require_client_key", "tenant_limits", "limit_store", "jwt")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    FAIL_OPEN_BACKEND_FIELD_NUMBER: _ClassVar[int]
    REQUEST_HEADERS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_KEYS_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_CLIENT_KEY_FIELD_NUMBER: _ClassVar[int]
    TENANT_LIMITS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_STORE_FIELD_NUMBER: _ClassVar[int]
    JWT_FIELD_NUMBER: _ClassVar[int]
    version: str
    policies: _containers.RepeatedCompositeFieldContainer[Policy]
    fail_open_backend: str
    request_headers: _containers.RepeatedScalarFieldContainer[str]
    client_keys: _containers.RepeatedCompositeFieldContainer[ClientKey]
    require_client_key: bool
    tenant_limits: _containers.RepeatedCompositeFieldContainer[TenantLimits]
    limit_store: LimitStore
    jwt: JwtAuth
    def __init__(self, version: _Optional[str] = ..., policies: _Optional[_Iterable[_Union[Policy, _Mapping]]] = ..., fail_open_backend: _Optional[str] = ..., request_headers: _Optional[_Iterable[str]] = ..., client_keys: _Optional[_Iterable[_Union[ClientKey, _Mapping]]] = ..., require_client_key: _Optional[bool] = ..., tenant_limits: _Optional[_Iterable[_Union[TenantLimits, _Mapping]]] = ..., limit_store: _Optional[_Union[LimitStore, _Mapping]] = ..., jwt: _Optional[_Union[JwtAuth, _Mapping]] = ...) -> None: ...

class JwtAuth(_message.Message):
    __slots__ = ("issuer", "audiences", "jwks_inline", "tenant_claim", "subject_claim", "tenants", "jwks_uri", "jwks_timeout_ms", "jwks_cache_s")
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    AUDIENCES_FIELD_NUMBER: _ClassVar[int]
    JWKS_INLINE_FIELD_NUMBER: _ClassVar[int]
    TENANT_CLAIM_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_CLAIM_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    JWKS_URI_FIELD_NUMBER: _ClassVar[int]
    JWKS_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    JWKS_CACHE_S_FIELD_NUMBER: _ClassVar[int]
    issuer: str
    audiences: _containers.RepeatedScalarFieldContainer[str]
    jwks_inline: str
    tenant_claim: str
    subject_claim: str
    tenants: _containers.RepeatedCompositeFieldContainer[ClientKey]
    jwks_uri: str
    jwks_timeout_ms: int
    jwks_cache_s: int
    def __init__(self, issuer: _Optional[str] = ..., audiences: _Optional[_Iterable[str]] = ..., jwks_inline: _Optional[str] = ..., tenant_claim: _Optional[str] = ..., subject_claim: _Optional[str] = ..., tenants: _Optional[_Iterable[_Union[ClientKey, _Mapping]]] = ..., jwks_uri: _Optional[str] = ..., jwks_timeout_ms: _Optional[int] = ..., jwks_cache_s: _Optional[int] = ...) -> None: ...

class TenantLimits(_message.Message):
    __slots__ = ("tenant", "limits")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    limits: ClientLimits
    def __init__(self, tenant: _Optional[str] = ..., limits: _Optional[_Union[ClientLimits, _Mapping]] = ...) -> None: ...

class ClientLimits(_message.Message):
    __slots__ = ("budgets", "requests_per_minute", "tokens_per_minute", "per_model")
    class PerModelEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ModelRateLimits
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ModelRateLimits, _Mapping]] = ...) -> None: ...
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    PER_MODEL_FIELD_NUMBER: _ClassVar[int]
    budgets: _containers.RepeatedCompositeFieldContainer[SpendBudget]
    requests_per_minute: int
    tokens_per_minute: int
    per_model: _containers.MessageMap[str, ModelRateLimits]
    def __init__(self, budgets: _Optional[_Iterable[_Union[SpendBudget, _Mapping]]] = ..., requests_per_minute: _Optional[int] = ..., tokens_per_minute: _Optional[int] = ..., per_model: _Optional[_Mapping[str, ModelRateLimits]] = ...) -> None: ...

class ModelRateLimits(_message.Message):
    __slots__ = ("requests_per_minute", "tokens_per_minute")
    REQUESTS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    requests_per_minute: int
    tokens_per_minute: int
    def __init__(self, requests_per_minute: _Optional[int] = ..., tokens_per_minute: _Optional[int] = ...) -> None: ...

class SpendBudget(_message.Message):
    __slots__ = ("usd", "period", "window_s")
    USD_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    usd: float
    period: str
    window_s: int
    def __init__(self, usd: _Optional[float] = ..., period: _Optional[str] = ..., window_s: _Optional[int] = ...) -> None: ...

class LimitStore(_message.Message):
    __slots__ = ("redis_url", "redis_url_env", "fail_closed", "timeout_ms")
    REDIS_URL_FIELD_NUMBER: _ClassVar[int]
    REDIS_URL_ENV_FIELD_NUMBER: _ClassVar[int]
    FAIL_CLOSED_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    redis_url: str
    redis_url_env: str
    fail_closed: bool
    timeout_ms: int
    def __init__(self, redis_url: _Optional[str] = ..., redis_url_env: _Optional[str] = ..., fail_closed: _Optional[bool] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class ClientKey(_message.Message):
    __slots__ = ("name", "sha256", "tenants", "expires_at", "revoked", "allowance", "limits")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    ALLOWANCE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    name: str
    sha256: str
    tenants: _containers.RepeatedScalarFieldContainer[str]
    expires_at: int
    revoked: bool
    allowance: Allowance
    limits: ClientLimits
    def __init__(self, name: _Optional[str] = ..., sha256: _Optional[str] = ..., tenants: _Optional[_Iterable[str]] = ..., expires_at: _Optional[int] = ..., revoked: _Optional[bool] = ..., allowance: _Optional[_Union[Allowance, _Mapping]] = ..., limits: _Optional[_Union[ClientLimits, _Mapping]] = ...) -> None: ...

class Allowance(_message.Message):
    __slots__ = ("aliases", "models", "data_classes")
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DATA_CLASSES_FIELD_NUMBER: _ClassVar[int]
    aliases: AllowList
    models: AllowList
    data_classes: AllowList
    def __init__(self, aliases: _Optional[_Union[AllowList, _Mapping]] = ..., models: _Optional[_Union[AllowList, _Mapping]] = ..., data_classes: _Optional[_Union[AllowList, _Mapping]] = ...) -> None: ...

class AllowList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, values: _Optional[_Iterable[str]] = ...) -> None: ...

class Policy(_message.Message):
    __slots__ = ("name", "namespace", "generation", "aliases", "match_headers", "models", "strategy", "retries", "timeout_ms", "session_header", "personal_data", "recording", "budget")
    class MatchHeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    MATCH_HEADERS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    RETRIES_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    SESSION_HEADER_FIELD_NUMBER: _ClassVar[int]
    PERSONAL_DATA_FIELD_NUMBER: _ClassVar[int]
    RECORDING_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    name: str
    namespace: str
    generation: int
    aliases: _containers.RepeatedScalarFieldContainer[str]
    match_headers: _containers.ScalarMap[str, str]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    strategy: Strategy
    retries: Retries
    timeout_ms: int
    session_header: str
    personal_data: PersonalData
    recording: Recording
    budget: BudgetAction
    def __init__(self, name: _Optional[str] = ..., namespace: _Optional[str] = ..., generation: _Optional[int] = ..., aliases: _Optional[_Iterable[str]] = ..., match_headers: _Optional[_Mapping[str, str]] = ..., models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ..., strategy: _Optional[_Union[Strategy, _Mapping]] = ..., retries: _Optional[_Union[Retries, _Mapping]] = ..., timeout_ms: _Optional[int] = ..., session_header: _Optional[str] = ..., personal_data: _Optional[_Union[PersonalData, _Mapping]] = ..., recording: _Optional[_Union[Recording, _Mapping]] = ..., budget: _Optional[_Union[BudgetAction, _Mapping]] = ...) -> None: ...

class BudgetAction(_message.Message):
    __slots__ = ("on_exhausted", "downgrade_to")
    class OnExhausted(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        REJECT: _ClassVar[BudgetAction.OnExhausted]
        DOWNGRADE: _ClassVar[BudgetAction.OnExhausted]
    REJECT: BudgetAction.OnExhausted
    DOWNGRADE: BudgetAction.OnExhausted
    ON_EXHAUSTED_FIELD_NUMBER: _ClassVar[int]
    DOWNGRADE_TO_FIELD_NUMBER: _ClassVar[int]
    on_exhausted: BudgetAction.OnExhausted
    downgrade_to: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, on_exhausted: _Optional[_Union[BudgetAction.OnExhausted, str]] = ..., downgrade_to: _Optional[_Iterable[str]] = ...) -> None: ...

class Recording(_message.Message):
    __slots__ = ("record", "max_age_s", "max_bytes", "shadow")
    class Record(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OFF: _ClassVar[Recording.Record]
        DECISIONS: _ClassVar[Recording.Record]
        PROMPTS: _ClassVar[Recording.Record]
    OFF: Recording.Record
    DECISIONS: Recording.Record
    PROMPTS: Recording.Record
    class Shadow(_message.Message):
        __slots__ = ("fraction", "model", "judge", "max_concurrent")
        FRACTION_FIELD_NUMBER: _ClassVar[int]
        MODEL_FIELD_NUMBER: _ClassVar[int]
        JUDGE_FIELD_NUMBER: _ClassVar[int]
        MAX_CONCURRENT_FIELD_NUMBER: _ClassVar[int]
        fraction: float
        model: str
        judge: str
        max_concurrent: int
        def __init__(self, fraction: _Optional[float] = ..., model: _Optional[str] = ..., judge: _Optional[str] = ..., max_concurrent: _Optional[int] = ...) -> None: ...
    RECORD_FIELD_NUMBER: _ClassVar[int]
    MAX_AGE_S_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    record: Recording.Record
    max_age_s: int
    max_bytes: int
    shadow: Recording.Shadow
    def __init__(self, record: _Optional[_Union[Recording.Record, str]] = ..., max_age_s: _Optional[int] = ..., max_bytes: _Optional[int] = ..., shadow: _Optional[_Union[Recording.Shadow, _Mapping]] = ...) -> None: ...

class PersonalData(_message.Message):
    __slots__ = ("detectors", "action", "data_class", "raise_from")
    class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ROUTE: _ClassVar[PersonalData.Action]
        REDACT: _ClassVar[PersonalData.Action]
    ROUTE: PersonalData.Action
    REDACT: PersonalData.Action
    DETECTORS_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    DATA_CLASS_FIELD_NUMBER: _ClassVar[int]
    RAISE_FROM_FIELD_NUMBER: _ClassVar[int]
    detectors: _containers.RepeatedScalarFieldContainer[str]
    action: PersonalData.Action
    data_class: str
    raise_from: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, detectors: _Optional[_Iterable[str]] = ..., action: _Optional[_Union[PersonalData.Action, str]] = ..., data_class: _Optional[str] = ..., raise_from: _Optional[_Iterable[str]] = ...) -> None: ...

class Retries(_message.Message):
    __slots__ = ("attempts", "per_try_timeout_ms", "retry_on", "retriable_status_codes")
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    PER_TRY_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    RETRY_ON_FIELD_NUMBER: _ClassVar[int]
    RETRIABLE_STATUS_CODES_FIELD_NUMBER: _ClassVar[int]
    attempts: int
    per_try_timeout_ms: int
    retry_on: str
    retriable_status_codes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, attempts: _Optional[int] = ..., per_try_timeout_ms: _Optional[int] = ..., retry_on: _Optional[str] = ..., retriable_status_codes: _Optional[_Iterable[int]] = ...) -> None: ...

class Model(_message.Message):
    __slots__ = ("name", "backend_key", "upstream_model", "input_per_1m", "output_per_1m", "context_window", "capabilities", "data_classes", "fallbacks", "tier", "weight", "backend", "region", "cluster")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BACKEND_KEY_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_PER_1M_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PER_1M_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_WINDOW_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    DATA_CLASSES_FIELD_NUMBER: _ClassVar[int]
    FALLBACKS_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    name: str
    backend_key: str
    upstream_model: str
    input_per_1m: float
    output_per_1m: float
    context_window: int
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    data_classes: _containers.RepeatedScalarFieldContainer[str]
    fallbacks: _containers.RepeatedScalarFieldContainer[str]
    tier: str
    weight: float
    backend: Backend
    region: str
    cluster: str
    def __init__(self, name: _Optional[str] = ..., backend_key: _Optional[str] = ..., upstream_model: _Optional[str] = ..., input_per_1m: _Optional[float] = ..., output_per_1m: _Optional[float] = ..., context_window: _Optional[int] = ..., capabilities: _Optional[_Iterable[str]] = ..., data_classes: _Optional[_Iterable[str]] = ..., fallbacks: _Optional[_Iterable[str]] = ..., tier: _Optional[str] = ..., weight: _Optional[float] = ..., backend: _Optional[_Union[Backend, _Mapping]] = ..., region: _Optional[str] = ..., cluster: _Optional[str] = ...) -> None: ...

class Backend(_message.Message):
    __slots__ = ("url", "service", "api_key_env", "endpoints", "api_key_secret", "resolved", "ca_bundle")
    URL_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    API_KEY_ENV_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    API_KEY_SECRET_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_FIELD_NUMBER: _ClassVar[int]
    CA_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    url: str
    service: ServiceRef
    api_key_env: str
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    api_key_secret: SecretKeyRef
    resolved: bool
    ca_bundle: str
    def __init__(self, url: _Optional[str] = ..., service: _Optional[_Union[ServiceRef, _Mapping]] = ..., api_key_env: _Optional[str] = ..., endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ..., api_key_secret: _Optional[_Union[SecretKeyRef, _Mapping]] = ..., resolved: _Optional[bool] = ..., ca_bundle: _Optional[str] = ...) -> None: ...

class SecretKeyRef(_message.Message):
    __slots__ = ("name", "key")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    name: str
    key: str
    def __init__(self, name: _Optional[str] = ..., key: _Optional[str] = ...) -> None: ...

class Endpoint(_message.Message):
    __slots__ = ("address", "port", "zone", "cluster", "region", "priority")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    address: str
    port: int
    zone: str
    cluster: str
    region: str
    priority: int
    def __init__(self, address: _Optional[str] = ..., port: _Optional[int] = ..., zone: _Optional[str] = ..., cluster: _Optional[str] = ..., region: _Optional[str] = ..., priority: _Optional[int] = ...) -> None: ...

class ServiceRef(_message.Message):
    __slots__ = ("name", "namespace", "port")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    name: str
    namespace: str
    port: int
    def __init__(self, name: _Optional[str] = ..., namespace: _Optional[str] = ..., port: _Optional[int] = ...) -> None: ...

class Strategy(_message.Message):
    __slots__ = ("type", "router_bundle", "tiers", "rules", "default_model", "predictive")
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        RULES: _ClassVar[Strategy.Type]
        CLASSIFIER: _ClassVar[Strategy.Type]
        WEIGHTED: _ClassVar[Strategy.Type]
        PREDICTIVE: _ClassVar[Strategy.Type]
    RULES: Strategy.Type
    CLASSIFIER: Strategy.Type
    WEIGHTED: Strategy.Type
    PREDICTIVE: Strategy.Type
    TYPE_FIELD_NUMBER: _ClassVar[int]
    ROUTER_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    PREDICTIVE_FIELD_NUMBER: _ClassVar[int]
    type: Strategy.Type
    router_bundle: str
    tiers: _containers.RepeatedCompositeFieldContainer[Tier]
    rules: _containers.RepeatedCompositeFieldContainer[Rule]
    default_model: str
    predictive: Predictive
    def __init__(self, type: _Optional[_Union[Strategy.Type, str]] = ..., router_bundle: _Optional[str] = ..., tiers: _Optional[_Iterable[_Union[Tier, _Mapping]]] = ..., rules: _Optional[_Iterable[_Union[Rule, _Mapping]]] = ..., default_model: _Optional[str] = ..., predictive: _Optional[_Union[Predictive, _Mapping]] = ...) -> None: ...

class Predictive(_message.Message):
    __slots__ = ("max_quality_loss", "cost_weight", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MAX_QUALITY_LOSS_FIELD_NUMBER: _ClassVar[int]
    COST_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    max_quality_loss: float
    cost_weight: float
    labels: _containers.ScalarMap[str, str]
    def __init__(self, max_quality_loss: _Optional[float] = ..., cost_weight: _Optional[float] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Tier(_message.Message):
    __slots__ = ("model", "max_difficulty")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_DIFFICULTY_FIELD_NUMBER: _ClassVar[int]
    model: str
    max_difficulty: float
    def __init__(self, model: _Optional[str] = ..., max_difficulty: _Optional[float] = ...) -> None: ...

class Rule(_message.Message):
    __slots__ = ("name", "when", "route")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WHEN_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    name: str
    when: RuleMatch
    route: str
    def __init__(self, name: _Optional[str] = ..., when: _Optional[_Union[RuleMatch, _Mapping]] = ..., route: _Optional[str] = ...) -> None: ...

class RuleMatch(_message.Message):
    __slots__ = ("aliases", "headers", "min_prompt_tokens", "max_prompt_tokens", "keywords", "regex", "categories", "min_difficulty", "max_difficulty", "semantic")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    MIN_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KEYWORDS_FIELD_NUMBER: _ClassVar[int]
    REGEX_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    MIN_DIFFICULTY_FIELD_NUMBER: _ClassVar[int]
    MAX_DIFFICULTY_FIELD_NUMBER: _ClassVar[int]
    SEMANTIC_FIELD_NUMBER: _ClassVar[int]
    aliases: _containers.RepeatedScalarFieldContainer[str]
    headers: _containers.ScalarMap[str, str]
    min_prompt_tokens: int
    max_prompt_tokens: int
    keywords: _containers.RepeatedScalarFieldContainer[str]
    regex: str
    categories: _containers.RepeatedScalarFieldContainer[str]
    min_difficulty: float
    max_difficulty: float
    semantic: SemanticMatch
    def __init__(self, aliases: _Optional[_Iterable[str]] = ..., headers: _Optional[_Mapping[str, str]] = ..., min_prompt_tokens: _Optional[int] = ..., max_prompt_tokens: _Optional[int] = ..., keywords: _Optional[_Iterable[str]] = ..., regex: _Optional[str] = ..., categories: _Optional[_Iterable[str]] = ..., min_difficulty: _Optional[float] = ..., max_difficulty: _Optional[float] = ..., semantic: _Optional[_Union[SemanticMatch, _Mapping]] = ...) -> None: ...

class SemanticMatch(_message.Message):
    __slots__ = ("examples", "threshold")
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    examples: _containers.RepeatedScalarFieldContainer[str]
    threshold: float
    def __init__(self, examples: _Optional[_Iterable[str]] = ..., threshold: _Optional[float] = ...) -> None: ...
