"""Generate the RoutePolicy CustomResourceDefinition from the pydantic schema.

One schema, two validators: the structural OpenAPI schema (types, enums, bounds, patterns,
descriptions, defaults) is derived from ``switchyard.operator.policy``, so `kubectl apply` and
local mode accept the same documents. Cross-field rules that OpenAPI cannot express are added
as CEL ``x-kubernetes-validations``; list and string bounds keep their cost within the API
server's budget. `make crd` writes it (and its copy in the Helm chart);
a unit test keeps the committed file in step.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

from switchyard.operator.clientkeys import SHA256_PATTERN, ClientKey, ClientKeysSpec
from switchyard.operator.policy import (
    MAX_ITEMS,
    RoutePolicySpec,
    builtin_bundles,
    builtin_kind,
    builtin_models,
)

GROUP = "switchyard.dev"
VERSION = "v1alpha1"
PLURAL = "routepolicies"

MAX_STRING = 253
MODEL_REFERENCES = {"fallbacks", "model", "route", "default"}

# Descriptions for `kubectl explain`, by property name, where the pydantic field has none.
DESCRIPTIONS = {
    "attempts": "Retries per request on the same model (0 disables retries).",
    "autoscaling": "Replica bounds and targets for the gateway and ext_proc Deployments.",
    "bundle": "Router bundle: builtin:default, builtin:minilm, builtin:heuristic, or the "
    "absolute path of a bundle directory on the ext_proc pods.",
    "capabilities": "Request features the model supports: tools, json, images.",
    "category": "Router categories that match (math, code, reasoning, knowledge, writing, "
    "extraction, chat).",
    "contextWindow": "Tokens the model accepts (prompt plus completion).",
    "dataClasses": "Data classes (x-switchyard-data-class) this model may see; default public.",
    "fallbacks": "Models tried, in order, when this one may not take a request.",
    "headers": "Exact request header values that must all match (names are case-insensitive).",
    "key": "Key inside the Secret.",
    "keywords": "Case-insensitive substrings of the prompt; any one matches.",
    "match": "Which requests this policy answers.",
    "maxDifficulty": "Highest router difficulty (0-1) routed here.",
    "maxPromptTokens": "Match only prompts of at most this many estimated tokens.",
    "maxReplicas": "Most replicas.",
    "minDifficulty": "Lowest router difficulty (0-1) that matches.",
    "minPromptTokens": "Match only prompts of at least this many estimated tokens.",
    "minReplicas": "Fewest replicas.",
    "model": "Name of a model of this policy.",
    "models": "Models this policy may route to (names unique), or aliases clients send.",
    "name": "Name (a DNS label).",
    "namespace": "Namespace; defaults to the policy's.",
    "on": "Conditions to retry on: connect-failure, reset, 429, 5xx.",
    "perTryTimeout": "Timeout of each attempt, e.g. 30s.",
    "port": "Service port.",
    "pricing": "List price in USD per 1M tokens.",
    "regex": "Regular expression searched in the prompt.",
    "region": "Region the backend runs in, for region constraints.",
    "retries": "Upstream retry policy for this policy's routes.",
    "route": "Model a matching request goes to.",
    "router": "The prompt router the classifier strategy and score-based rules use.",
    "rules": "Ordered conditions evaluated before the strategy; the first match routes.",
    "service": "In-cluster Service serving the model.",
    "sessionAffinity": "Keep each conversation on one model (stateless: requests with the "
    "header are routed on the conversation's first user message, or a hash of the header under "
    "the weighted strategy).",
    "strategy": "How a model is chosen: rules, classifier, weighted or predictive.",
    "targetCPUUtilization": "Target average CPU utilisation, percent.",
    "targetRequestsPerSecond": "Target requests per second per pod.",
    "tier": "Free-form tier label, for reporting.",
    "tiers": "Classifier tiers, cheapest first: the cost/quality knob.",
    "timeout": "Whole-request upstream timeout, e.g. 300s.",
    "type": "Strategy: rules, classifier, weighted or predictive (by a fitted router's "
    "predicted score per model and its price).",
    "url": "External OpenAI-compatible base URL (http or https).",
    "weight": "Share of traffic under the weighted strategy.",
    "when": "Conditions; all must hold.",
}

SPEC_RULES = [
    {
        "rule": "!has(self.budget) || !has(self.budget.downgradeTo) || "
        "self.budget.downgradeTo.all(d, self.models.exists(n, n.name == d))",
        "message": "budget.downgradeTo must name models of this policy",
        "fieldPath": ".budget.downgradeTo",
    },
    {
        "rule": "self.models.all(m, !has(m.fallbacks) || "
        "m.fallbacks.all(f, f != m.name && self.models.exists(n, n.name == f)))",
        "message": "models[].fallbacks must name other models of this policy",
        "fieldPath": ".models",
    },
    {
        "rule": "!has(self.strategy.tiers) || "
        "self.strategy.tiers.all(t, self.models.exists(n, n.name == t.model))",
        "message": "strategy.tiers[].model must name a model of this policy",
        "fieldPath": ".strategy.tiers",
    },
    {
        "rule": "!has(self.strategy.rules) || "
        "self.strategy.rules.all(r, self.models.exists(n, n.name == r.route))",
        "message": "strategy.rules[].route must name a model of this policy",
        "fieldPath": ".strategy.rules",
    },
    {
        "rule": "!has(self.strategy.default) || "
        "self.models.exists(n, n.name == self.strategy.default)",
        "message": "strategy.default must name a model of this policy",
        "fieldPath": ".strategy.default",
    },
    {
        "rule": "!has(self.strategy.rules) || self.strategy.rules.all(r, "
        "!has(r.when.models) || r.when.models.all(a, a in self.match.models))",
        "message": "strategy.rules[].when.models must be aliases of match.models "
        "(otherwise the rule never matches)",
        "fieldPath": ".strategy.rules",
    },
    {
        "rule": "!has(self.strategy.predictive) || !has(self.strategy.predictive.modelMap) || "
        "self.strategy.predictive.modelMap.all(k, self.models.exists(n, n.name == k))",
        "message": "strategy.predictive.modelMap keys must name models of this policy",
        "fieldPath": ".strategy.predictive.modelMap",
    },
    {
        "rule": "!has(self.timeout) || duration(self.timeout) <= duration('24h')",
        "message": "timeout must not exceed 24h",
        "fieldPath": ".timeout",
    },
]
RETRIES_RULES = [
    {
        "rule": "!has(self.perTryTimeout) || duration(self.perTryTimeout) <= duration('24h')",
        "message": "perTryTimeout must not exceed 24h",
        "fieldPath": ".perTryTimeout",
    },
]


def router_rules() -> list[dict[str, str]]:
    """The bundle reference: a builtin this build ships, or an absolute, normalised path."""
    builtins = ", ".join(f"'{b}'" for b in builtin_bundles())
    return [
        {
            "rule": f"!has(self.bundle) || (self.bundle.startsWith('builtin:') ? "
            f"self.bundle in [{builtins}] : "
            "(self.bundle.matches('^(/[^/]+)+$') && !self.bundle.matches('/[.][.]?(/|$)')))",
            "message": f"bundle must be one of {builtins.replace(chr(39), '')} or an absolute, "
            "normalised directory path",
            "fieldPath": ".bundle",
        }
    ]


def predictive_bundle_rule() -> dict[str, str]:
    """The predictive strategy names a fitted bundle: a path (checked where it exists) or a
    builtin that predicts per-model scores (package data, fixed)."""
    fitted = [b for b in builtin_bundles() if builtin_models(b)]
    allowed = f"self.router.bundle in [{', '.join(repr(b) for b in fitted)}] || " if fitted else ""
    return {
        "rule": "self.type != 'predictive' || (has(self.router) && has(self.router.bundle) && "
        f"({allowed}!self.router.bundle.startsWith('builtin:')))",
        "message": "the predictive strategy needs router.bundle: a bundle fitted with "
        "`switchyard router fit` (builtin bundles give no per-model predictions)",
        "fieldPath": ".router",
    }


def semantic_bundle_rule() -> dict[str, str]:
    """Semantic rule conditions embed with the policy's router bundle: a static builtin
    (package data, fixed) or a path (checked where it exists)."""
    static = ", ".join(repr(b) for b in builtin_bundles() if builtin_kind(b) == "static")
    return {
        "rule": "!has(self.rules) || !self.rules.exists(r, has(r.when.semantic)) || "
        "!has(self.router) || !has(self.router.bundle) || "
        f"!self.router.bundle.startsWith('builtin:') || self.router.bundle in [{static}]",
        "message": "semantic rule conditions need a static-embedding router.bundle "
        f"({static.replace(chr(39), '')}, or a bundle fitted from it)",
        "fieldPath": ".router",
    }


STRATEGY_RULES = [
    {
        "rule": "self.type != 'classifier' || (has(self.tiers) && size(self.tiers) > 0)",
        "message": "the classifier strategy needs at least one tier",
        "fieldPath": ".tiers",
    },
    {
        "rule": "!has(self.tiers) || size(self.tiers) == 0 || "
        "!has(self.tiers[size(self.tiers) - 1].maxDifficulty) || "
        "self.tiers[size(self.tiers) - 1].maxDifficulty == 1.0",
        "message": "the last tier must be unbounded (omit maxDifficulty) or 1.0",
        "fieldPath": ".tiers",
    },
    {
        "rule": "!has(self.tiers) || size(self.tiers.filter(t, !has(t.maxDifficulty))) == 0 || "
        "(size(self.tiers.filter(t, !has(t.maxDifficulty))) == 1 && "
        "!has(self.tiers[size(self.tiers) - 1].maxDifficulty))",
        "message": "maxDifficulty is required on every tier but the last",
        "fieldPath": ".tiers",
    },
    {
        "rule": "self.type != 'rules' || has(self.default)",
        "message": "the rules strategy needs a default model",
        "fieldPath": ".default",
    },
    {
        "rule": "(self.type == 'predictive') == has(self.predictive)",
        "message": "predictive is required by, and only read by, the predictive strategy",
        "fieldPath": ".predictive",
    },
    {
        "rule": "self.type != 'predictive' || has(self.default)",
        "message": "the predictive strategy needs a default model (used without predictions)",
        "fieldPath": ".default",
    },
    predictive_bundle_rule(),
    semantic_bundle_rule(),
]
PREDICTIVE_RULES = [
    {
        "rule": "has(self.maxQualityLoss) != has(self.costWeight)",
        "message": "set exactly one of maxQualityLoss or costWeight",
    }
]
BACKEND_RULES = [
    {"rule": "has(self.url) != has(self.service)", "message": "set exactly one of url or service"},
    {
        "rule": "!has(self.caBundle) || (has(self.url) && self.url.startsWith('https://'))",
        "message": "caBundle needs an https url",
    },
]
# Header names: RFC 9110 tokens (Envoy and the ext_proc match them lowercased).
HEADER_RULE = {
    "rule": "!has(self.headers) || self.headers.all(k, "
    "size(k) <= 128 && k.matches('^[A-Za-z0-9!#$%&\\'*+.^_`|~-]+$'))",
    "message": "header names must be HTTP tokens (letters, digits, !#$%&'*+.^_`|~-)",
    "fieldPath": ".headers",
}
WHEN_RULES = [
    {**HEADER_RULE},
    {
        "rule": "!has(self.minDifficulty) || !has(self.maxDifficulty) || "
        "self.minDifficulty <= self.maxDifficulty",
        "message": "minDifficulty must not exceed maxDifficulty",
    },
    {
        "rule": "!has(self.maxPromptTokens) || !has(self.minPromptTokens) || "
        "self.minPromptTokens <= self.maxPromptTokens",
        "message": "maxPromptTokens must not be below minPromptTokens",
    },
]
PERSONAL_DATA_RULES = [
    {
        "rule": "!((has(self.dataClass) ? self.dataClass : 'pii') in "
        "(has(self.raiseFrom) ? self.raiseFrom : ['public', 'internal']))",
        "message": "raiseFrom must not contain dataClass (nothing to raise)",
        "fieldPath": ".raiseFrom",
    }
]
AUTOSCALING_RULES = [
    {
        "rule": "self.minReplicas <= self.maxReplicas",
        "message": "minReplicas must not exceed maxReplicas",
    }
]
BUDGET_RULES = [
    {
        "rule": "(has(self.onExhausted) && self.onExhausted == 'downgrade') == "
        "(has(self.downgradeTo) && size(self.downgradeTo) > 0)",
        "message": "downgradeTo is required by, and only read by, onExhausted: downgrade",
        "fieldPath": ".downgradeTo",
    }
]
RULES_BY_DEF = {
    "BudgetSpec": BUDGET_RULES,
    "Strategy": STRATEGY_RULES,
    "Predictive": PREDICTIVE_RULES,
    "Router": router_rules(),
    "Retries": RETRIES_RULES,
    "Backend": BACKEND_RULES,
    "RuleWhen": WHEN_RULES,
    "Match": [{**HEADER_RULE}],
    "Autoscaling": AUTOSCALING_RULES,
    "PersonalData": PERSONAL_DATA_RULES,
}


def _structural(node: Any, defs: dict[str, Any], name: str = "", def_name: str = "") -> Any:
    """JSON Schema from pydantic → a Kubernetes structural schema."""
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        ref = node["$ref"].rsplit("/", 1)[-1]
        resolved = _structural(defs[ref], defs, name, ref)
        if "description" in node:
            resolved = {**resolved, "description": node["description"]}
        return resolved
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        merged = {k: v for k, v in node.items() if k != "anyOf"}
        if len(options) == 1:
            return _structural({**options[0], **merged}, defs, name, def_name)
        return _structural({**options[0], **merged}, defs, name, def_name)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("title", "$defs", "additionalProperties", "exclusiveMinimum"):
            continue
        if key == "properties":
            out[key] = {k: _structural(v, defs, k) for k, v in value.items()}
        elif key == "items":
            out[key] = _structural(value, defs, name)
            out[key].pop("description", None)
        elif key == "const":
            out["enum"] = [value]
        elif key == "default" and value is None:
            continue
        else:
            out[key] = value
    if node.get("type") == "object" and isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = _structural(node["additionalProperties"], defs, name)
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if out.get("type") == "array" and name in MAX_ITEMS and "maxItems" not in out:
        out["maxItems"] = MAX_ITEMS[name]
    if out.get("type") == "string" and "maxLength" not in out and "enum" not in out:
        # Strings that name models are DNS labels; bounding them keeps CEL costs low.
        out["maxLength"] = 63 if name in MODEL_REFERENCES else MAX_STRING
    if "description" not in out and name in DESCRIPTIONS:
        out["description"] = DESCRIPTIONS[name]
    if def_name in RULES_BY_DEF:
        out["x-kubernetes-validations"] = RULES_BY_DEF[def_name]
    return out


def spec_schema() -> dict[str, Any]:
    """The structural schema of ``spec``."""
    raw = RoutePolicySpec.model_json_schema(by_alias=True, mode="validation")
    schema: dict[str, Any] = _structural(raw, raw.get("$defs", {}))
    schema["description"] = "Which aliases this policy answers, its models, and how it routes."
    schema["x-kubernetes-validations"] = SPEC_RULES
    models = schema["properties"]["models"]
    # Unique model names and aliases, enforced by the API server itself.
    models["x-kubernetes-list-type"] = "map"
    models["x-kubernetes-list-map-keys"] = ["name"]
    schema["properties"]["match"]["properties"]["models"]["x-kubernetes-list-type"] = "set"
    personal = schema["properties"]["personalData"]["properties"]
    personal["detectors"]["x-kubernetes-list-type"] = "set"
    personal["raiseFrom"]["x-kubernetes-list-type"] = "set"
    return schema


def router_status_schema() -> dict[str, Any]:
    """status.router: the refit loop's state (``switchyard.operator.refit``)."""
    apgr = {
        "type": "object",
        "description": "Mean APGR of the fitted router, the length router and the default "
        "bundle's difficulty.",
        "properties": {k: {"type": "number"} for k in ("fitted", "length", "default")},
    }
    text = {"type": "string"}
    return {
        "type": "object",
        "description": "Router refits (spec.strategy.router.refit): the bundle in force and "
        "the ones kept for rollback.",
        "properties": {
            "activeBundle": {
                "type": "string",
                "description": "The fitted bundle in force (it overrides "
                "spec.strategy.router.bundle); unset until the first fit.",
            },
            "previousBundles": {
                "type": "array",
                "items": text,
                "description": "Bundles to roll back to, newest first (annotation "
                "switchyard.dev/rollback).",
            },
            "lastFit": {
                "type": "object",
                "description": "The fit that wrote the active bundle.",
                "properties": {
                    "job": text,
                    "time": text,
                    "bundle": text,
                    "outcomes": {"type": "integer"},
                    "prompts": {"type": "integer"},
                    "models": {"type": "array", "items": text},
                    "heldOutAPGR": apgr,
                    "crossValidatedAPGR": apgr,
                },
            },
            "lastAttempt": {
                "type": "object",
                "description": "The last refit Job and its result (Running, Fitted, "
                "TooFewOutcomes, FitFailed, NotServed).",
                "properties": {"job": text, "time": text, "result": text, "message": text},
            },
            "lastRollback": {
                "type": "object",
                "properties": {"time": text, "from": text, "to": text},
            },
        },
    }


def status_schema() -> dict[str, Any]:
    condition = {
        "type": "object",
        "required": ["type", "status"],
        "properties": {
            "type": {"type": "string", "maxLength": 64},
            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
            "reason": {"type": "string", "maxLength": 128},
            "message": {"type": "string", "maxLength": 4096},
            "lastTransitionTime": {"type": "string", "format": "date-time"},
            "observedGeneration": {"type": "integer", "format": "int64"},
        },
    }
    return {
        "type": "object",
        "properties": {
            "observedGeneration": {"type": "integer", "format": "int64"},
            "modelCount": {"type": "integer"},
            "configVersion": {"type": "string"},
            "conditions": {
                "type": "array",
                "items": condition,
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
            },
            "router": router_status_schema(),
            "models": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "endpoints": {
                            "type": "integer",
                            "description": "Usable endpoints (a URL backend counts as 1).",
                        },
                        "clusters": {
                            "type": "object",
                            "description": "Service backends: usable endpoints per cluster.",
                            "additionalProperties": {"type": "integer"},
                        },
                    },
                },
            },
        },
    }


READY_COLUMN = {
    "name": "Ready",
    "type": "string",
    "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
}
AGE_COLUMN = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


def namespaced_crd(
    kind: str,
    plural: str,
    short_name: str,
    columns: list[dict[str, str]],
    description: str,
    spec: dict[str, Any],
    status: dict[str, Any],
) -> dict[str, Any]:
    """A namespaced CustomResourceDefinition of this group and version, with a status
    subresource and the Ready, ``columns`` and Age printer columns."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short_name],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [READY_COLUMN, *columns, AGE_COLUMN],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": description,
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec,
                                "status": status,
                            },
                        }
                    },
                }
            ],
        },
    }


def crd() -> dict[str, Any]:
    """The whole RoutePolicy CustomResourceDefinition."""
    return namespaced_crd(
        "RoutePolicy",
        PLURAL,
        "rp",
        [
            {"name": "Strategy", "type": "string", "jsonPath": ".spec.strategy.type"},
            {"name": "Models", "type": "integer", "jsonPath": ".status.modelCount"},
            {
                "name": "Bundle",
                "type": "string",
                "description": "The fitted router bundle in force (refits).",
                "jsonPath": ".status.router.activeBundle",
            },
        ],
        "RoutePolicy routes OpenAI-style requests to the cheapest model that can answer them well.",
        spec_schema(),
        status_schema(),
    )


def render() -> str:
    header = "# Generated by `python -m switchyard.operator.crd`; do not edit.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=100)


# --- ClientKeys: tenants and their client API keys (switchyard.operator.clientkeys) ---------

CLIENT_KEYS_PLURAL = "clientkeys"
CLIENT_KEYS_SPEC_RULES = [
    {
        "rule": "!has(self.keys) || self.keys.all(k, "
        "has(self.tenants) && self.tenants.exists(t, t.name == k.tenant))",
        "message": "keys[].tenant must name a tenant of this resource",
        "fieldPath": ".keys",
    },
    {
        "rule": "!has(self.tenants) || self.tenants.all(t, "
        "!has(t.parent) || self.tenants.exists(p, p.name == t.parent))",
        "message": "tenants[].parent must name a tenant of this resource",
        "fieldPath": ".tenants",
    },
]
CLIENT_KEY_RULES = [
    {
        "rule": "has(self.sha256) != has(self.secretRef)",
        "message": "set exactly one of sha256 or secretRef",
    }
]
TENANT_RULES = [
    {
        "rule": "!has(self.parent) || self.parent != self.name",
        "message": "a tenant cannot be its own parent",
        "fieldPath": ".parent",
    }
]
JWKS_RULES = [
    {"rule": "has(self.inline) != has(self.uri)", "message": "set exactly one of inline or uri"}
]
RULES_BY_DEF.update({"ClientKey": CLIENT_KEY_RULES, "Tenant": TENANT_RULES, "Jwks": JWKS_RULES})


def client_keys_spec_schema() -> dict[str, Any]:
    """The structural schema of a ClientKeys ``spec``."""
    raw = ClientKeysSpec.model_json_schema(by_alias=True, mode="validation")
    schema: dict[str, Any] = _structural(raw, raw.get("$defs", {}))
    schema["description"] = "Tenants (team → project → user) and their clients' API keys."
    schema["x-kubernetes-validations"] = CLIENT_KEYS_SPEC_RULES
    for listed in ("tenants", "keys"):
        schema["properties"][listed]["x-kubernetes-list-type"] = "map"
        schema["properties"][listed]["x-kubernetes-list-map-keys"] = ["name"]
    key = schema["properties"]["keys"]["items"]["properties"]
    key["sha256"]["pattern"] = SHA256_PATTERN
    key["sha256"]["maxLength"] = 64
    key["secretRef"]["description"] = ClientKey.model_fields["secret_ref"].description
    return schema


def client_keys_status_schema() -> dict[str, Any]:
    """What the operator writes: counts, conditions, and spend against the limits."""
    conditions = status_schema()["properties"]["conditions"]
    spend = {
        "type": "object",
        "properties": {
            "tenant": {"type": "string"},
            "period": {"type": "string", "description": "day, month or a rolling window"},
            "budgetUsd": {"type": "number"},
            "spentUsd": {"type": "number", "description": "Spent in the current period."},
            "resetsAt": {
                "type": "string",
                "format": "date-time",
                "description": "End of the calendar period (day, month); absent when rolling.",
            },
        },
    }
    return {
        "type": "object",
        "properties": {
            "observedGeneration": {"type": "integer", "format": "int64"},
            "configVersion": {"type": "string"},
            "tenantCount": {"type": "integer"},
            "keyCount": {"type": "integer"},
            "activeKeys": {
                "type": "integer",
                "description": "Keys served, not revoked, not expired (at the last reconcile).",
            },
            "budgetUsd": {
                "type": "number",
                "description": "The tightest budget of this resource's tenants: the one with "
                "the largest share spent (with nothing spent, the smallest).",
            },
            "spentUsd": {
                "type": "number",
                "description": "Spent against that budget in its current period.",
            },
            "spend": {
                "type": "array",
                "items": spend,
                "description": "Every tenant budget and its spend, read from the limits "
                "store (Redis) every --spend-interval seconds.",
            },
            "conditions": conditions,
        },
    }


def client_keys_crd() -> dict[str, Any]:
    """The ClientKeys CustomResourceDefinition."""
    return namespaced_crd(
        "ClientKeys",
        CLIENT_KEYS_PLURAL,
        "ck",
        [
            {"name": "Tenants", "type": "integer", "jsonPath": ".status.tenantCount"},
            {"name": "Keys", "type": "integer", "jsonPath": ".status.keyCount"},
            {"name": "Active", "type": "integer", "jsonPath": ".status.activeKeys"},
            {"name": "Budget USD", "type": "number", "jsonPath": ".status.budgetUsd"},
            {"name": "Spent USD", "type": "number", "jsonPath": ".status.spentUsd"},
        ],
        "ClientKeys: tenants and the API keys clients send to the gateway (stored as SHA-256, "
        "or read from Secrets).",
        client_keys_spec_schema(),
        client_keys_status_schema(),
    )


def render_client_keys() -> str:
    header = "# Generated by `python -m switchyard.operator.crd clientkeys`; do not edit.\n"
    return header + yaml.safe_dump(client_keys_crd(), sort_keys=False, width=100)


if __name__ == "__main__":
    sys.stdout.write(render_client_keys() if sys.argv[1:] == ["clientkeys"] else render())
