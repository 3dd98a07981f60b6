"""Requests replayed through the gateway's own routing path, off the gateway.

Policy files are compiled by the operator's compiler and loaded by the ext_proc's
``RuntimeState`` (the same tables, the same bundle loading and checks); each request then goes
through the processor's steps: ``parse_request`` → ``select_target`` → personal-data
``screen`` → ``session_view`` → the policy's scorer → ``decide``. Client-key authentication is
not replayed (a log holds no keys). ``switchyard router calibrate`` and ``switchyard simulate``
build on this.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml

from switchyard.api.v1.routing_pb2 import Strategy
from switchyard.extproc.config import CompiledConfig, CompiledPolicy, ModelRoute, build_config
from switchyard.extproc.engine import Decision, decide, select_target, session_view
from switchyard.extproc.errors import GatewayError
from switchyard.extproc.request import Endpoint, ParsedRequest, parse_request, screen
from switchyard.extproc.scoring import RouterScores, Scorer
from switchyard.extproc.state import RuntimeState, default_scorer_loader
from switchyard.local.documents import load_inputs
from switchyard.operator.compiler import compile_config
from switchyard.operator.policy import RoutePolicy, parse_policy

#: Completion tokens assumed per request for cost (capped by the request's max_tokens).
OUTPUT_TOKENS = 256


class ReplayError(ValueError):
    """Input calibrate or simulate cannot use; the message says which file, line or field."""


@functools.cache
def _cached_loader(bundle: str) -> Scorer:
    return default_scorer_loader(bundle)


@dataclass
class Routing:
    """Policy files compiled and loaded as an ext_proc worker loads them."""

    policies: list[RoutePolicy]
    state: RuntimeState
    source: str

    @property
    def config(self) -> CompiledConfig:
        return self.state.config

    def policy(self, key: str | None = None) -> CompiledPolicy:
        """The policy ``key`` (namespace/name), or the only one; ReplayError otherwise."""
        served = {p.key: p for group in self.config.policies_by_alias.values() for p in group}
        if key is None:
            if len(served) != 1:
                raise ReplayError(
                    f"{self.source}: {len(served)} policies ({', '.join(sorted(served))}); "
                    "name one with --policy NAMESPACE/NAME"
                )
            return next(iter(served.values()))
        if key not in served:
            raise ReplayError(
                f"{self.source}: unknown policy {key!r} (policies: {', '.join(sorted(served))})"
            )
        return served[key]

    def document(self, key: str) -> RoutePolicy:
        return next(p for p in self.policies if p.key == key)


def load_routing(
    paths: Sequence[str],
    bundle: str | None = None,
    loader: Callable[[str], Scorer] | None = None,
) -> Routing:
    """Compile and load policy files (``bundle`` replaces every policy's router bundle)."""
    source = ", ".join(str(p) for p in paths)
    inputs = load_inputs(list(paths))  # PolicyError names the file and field
    policies = inputs.policies
    if not policies:
        raise ReplayError(f"{source}: no RoutePolicy document")
    if bundle is not None:
        policies = [with_changes(p, {"strategy": {"router": {"bundle": bundle}}}) for p in policies]
    state = RuntimeState(scorer_loader=loader or _cached_loader)
    state.swap(state.prepare(compile_config(policies)))  # CompileError names the field
    errors = state.config.policy_errors
    if errors:
        raise ReplayError(
            "; ".join(
                f"{source}: policy {key} would not be served: {why}" for key, why in errors.items()
            )
        )
    return Routing(policies, state, source)


def _merge(base: dict[str, Any], change: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in change.items():
        out[k] = _merge(out.get(k) or {}, v) if isinstance(v, Mapping) else v
    return out


def policy_document(policy: RoutePolicy) -> dict[str, Any]:
    """The policy as a YAML-ready document (fields the file set, camelCase)."""
    return policy.model_dump(by_alias=True, exclude_unset=True, mode="json")


def with_changes(policy: RoutePolicy, spec_change: Mapping[str, Any]) -> RoutePolicy:
    """``policy`` with ``spec_change`` merged into its spec, validated again like a file."""
    doc = policy_document(policy)
    doc["spec"] = _merge(doc["spec"], spec_change)
    return parse_policy(doc, policy.key)


def compile_one(policy: RoutePolicy) -> CompiledPolicy:
    """One policy through the compiler and the ext_proc's table builder."""
    config = build_config(compile_config([policy]))
    if config.policy_errors:
        raise ReplayError(f"policy {policy.key}: {config.policy_errors[policy.key]}")
    return next(p for group in config.policies_by_alias.values() for p in group)


def id_draw(request_id: object) -> float:
    """A draw in [0, 1) from a request id: replays a weighted choice the same way every time
    (the gateway itself draws at random unless the request has a session)."""
    digest = hashlib.blake2b(str(request_id).encode(), digest_size=8).digest()
    return int.from_bytes(digest) / 2**64


def endpoint_of(body: Mapping[str, Any]) -> Endpoint:
    return Endpoint.CHAT if "messages" in body or "prompt" not in body else Endpoint.COMPLETIONS


@dataclass(slots=True)
class Prepared:
    """One request parsed, screened and scored, ready for ``decide`` (under any knob)."""

    request: ParsedRequest
    routed: ParsedRequest
    headers: Mapping[str, str]
    target: CompiledPolicy | ModelRoute
    scores: RouterScores | None
    session_draw: float | None


async def prepare(
    routing: Routing, endpoint: Endpoint, headers: Mapping[str, str], body: bytes
) -> Prepared:
    """The processor's steps up to ``decide``; raises GatewayError as the gateway would."""
    request = parse_request(endpoint, body)
    target = select_target(routing.config, request, headers)
    if target.personal_data is not None:
        rule = target.personal_data
        screen(request, rule.scanner, rule.redact)
    routed, draw = session_view(target, request, headers)
    scores = None
    if isinstance(target, CompiledPolicy) and target.needs_scores:
        scores = await routing.state.scorer_for(target.router_bundle).score(routed.prompt)
    return Prepared(request, routed, headers, target, scores, draw)


@dataclass(frozen=True, slots=True)
class Routed:
    """Where one request went (``model`` None: rejected, ``reason`` says how)."""

    model: ModelRoute | None
    reason: str
    policy: str
    random: bool = False
    """The weighted strategy chose with a draw the gateway takes at random (no session)."""


def rejected(error: GatewayError) -> Routed:
    return Routed(None, f"rejected {error.status} {error.code}", "")


def choose(prepared: Prepared, draw: float, policy: CompiledPolicy | None = None) -> Routed:
    """``decide`` for a prepared request (``policy`` replaces its target: a knob variant)."""
    target = policy or prepared.target
    session = prepared.session_draw
    try:
        decision: Decision = decide(
            target,
            prepared.routed,
            prepared.headers,
            prepared.scores,
            draw if session is None else session,
        )
    except GatewayError as error:
        return rejected(error)
    random = (
        session is None
        and isinstance(target, CompiledPolicy)
        and target.strategy == Strategy.WEIGHTED
        and decision.reason.startswith("weighted")
    )
    return Routed(decision.model, decision.reason, decision.policy, random)


def completion_tokens(request: ParsedRequest, output_tokens: int) -> int:
    cap = request.max_output_tokens
    return min(cap, output_tokens) if cap else output_tokens


def request_cost(model: ModelRoute, request: ParsedRequest, output_tokens: int) -> float:
    """USD for one request on ``model``: its prices x the prompt's tokens and the assumed
    completion tokens."""
    return model.estimated_cost(request.prompt_tokens, completion_tokens(request, output_tokens))


def labels_of(policy: CompiledPolicy | ModelRoute) -> dict[str, str]:
    """Model name → its label in a bundle's predictions (the name itself unless modelMap)."""
    if isinstance(policy, CompiledPolicy) and policy.predictive is not None:
        return {m.name: label for m, label, _ in policy.predictive.candidates}
    return {}


def chat_body(alias: str, text: str) -> bytes:
    return orjson.dumps({"model": alias, "messages": [{"role": "user", "content": text}]})


def ensure_file(path: Path) -> None:
    if not path.exists():
        raise ReplayError(f"{path}: no such file or directory")


def fitted_on(routing: Routing, files: Mapping[str, str]) -> list[str]:
    """Which of the outcome ``files`` (path → sha256) a policy's router bundle was fitted on
    (``training.outcomes.files`` in its router.yaml): figures on them are in-sample."""
    hashes = {digest: path for path, digest in files.items()}
    found: list[str] = []
    for bundle in sorted(routing.config.router_bundles):
        meta = Path(bundle) / "router.yaml"
        if bundle.startswith("builtin:") or not meta.is_file():
            continue
        try:
            doc = yaml.safe_load(meta.read_text(encoding="utf-8")) or {}
            used = doc.get("training", {}).get("outcomes", {}).get("files", {}) or {}
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        found += [hashes[d] for d in used.values() if d in hashes and hashes[d] not in found]
    return found


def in_sample_note(files: Sequence[str]) -> str:
    return (
        f"note: the router bundle was fitted on {', '.join(files)}: figures on the outcomes it "
        "learned from are optimistic; use outcomes the fit did not see for a fair estimate"
    )
