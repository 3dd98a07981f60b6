"""One policy's blast radius: what the operator refuses before compiling (each error names the
field), and how the ext_proc and the operator isolate a policy only the data plane rejects."""

from __future__ import annotations

import asyncio
import copy
import math
from typing import Any, get_args

import orjson
import pytest
from conftest import compile_docs

from switchyard.api.v1 import config_stream_pb2 as cs
from switchyard.api.v1 import routing_pb2 as pb
from switchyard.extproc.config import build_config
from switchyard.extproc.config_client import ConfigStreamClient
from switchyard.extproc.engine import select_target
from switchyard.extproc.errors import GatewayError
from switchyard.extproc.processor import Processor
from switchyard.extproc.request import Endpoint, parse_request
from switchyard.extproc.scoring import CATEGORIES, HeuristicScorer, Scorer
from switchyard.extproc.state import HEURISTIC_BUNDLE, RuntimeState
from switchyard.operator.compiler import CompileError, compile_config
from switchyard.operator.config_stream import ConfigStreamServer
from switchyard.operator.control_plane import ApplyResult
from switchyard.operator.metrics import OperatorMetrics
from switchyard.operator.policy import (
    HEURISTIC_BUNDLE as POLICY_HEURISTIC,
)
from switchyard.operator.policy import (
    Category,
    PolicyError,
    parse_policy,
)
from switchyard.operator.reconciler import Reconciler


def _at(doc: dict[str, Any], path: str) -> tuple[Any, str | int]:
    node: Any = doc
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    last = parts[-1]
    return node, int(last) if last.isdigit() else last


INVALID = [
    ("spec.strategy.router.bundle", "builtin:nope", "spec.strategy.router.bundle: unknown builtin"),
    ("spec.strategy.router.bundle", "builtin:", "spec.strategy.router.bundle: unknown builtin"),
    ("spec.strategy.router.bundle", "bundles/mine", "spec.strategy.router.bundle: router bundle"),
    ("spec.strategy.router.bundle", "/srv/../etc", "spec.strategy.router.bundle: router bundle"),
    ("spec.strategy.router.bundle", "/srv/bundle/", "spec.strategy.router.bundle: router bundle"),
    ("spec.strategy.router.bundle", "/srv//b", "spec.strategy.router.bundle: router bundle"),
    ("spec.strategy.router.bundle", "/srv/b\n", "spec.strategy.router.bundle: router bundle"),
    ("spec.match.headers", {"x tenant": "a"}, "spec.match.headers: 'x tenant'"),
    ("spec.match.headers", {":path": "/"}, "spec.match.headers: ':path'"),
    ("spec.match.headers", {f"h{i}": "v" for i in range(17)}, "spec.match.headers"),
    ("spec.strategy.rules.0.when.headers", {"x(y)": "1"}, "spec.strategy.rules[0].when.headers"),
    ("spec.match.models", [""], "spec.match.models[0]"),
    ("spec.match.models", ["gpt 4"], "spec.match.models[0]"),
    ("spec.match.models", ["auto", "auto"], "spec: match.models[1]: duplicate alias 'auto'"),
    ("spec.match.models", [f"a{i}" for i in range(33)], "spec.match.models"),
    ("spec.strategy.rules.0.when.models", ["ghost"], "strategy.rules[0].when.models[0]: 'ghost'"),
    ("spec.strategy.rules.0.when.keywords", [""], "spec.strategy.rules[0].when.keywords[0]"),
    ("spec.strategy.rules.0.when.category", ["maths"], "spec.strategy.rules[0].when.category[0]"),
    ("spec.strategy.rules.0.when.regex", "a(", "spec.strategy.rules[0].when.regex"),
    (
        "spec.strategy.rules.0.when.maxPromptTokens",
        5,
        "spec.strategy.rules[0].when: maxPromptTokens",
    ),
    ("spec.models.0.contextWindow", 10**12, "spec.models[0].contextWindow"),
    ("spec.models.0.pricing.inputPer1M", math.inf, "spec.models[0].pricing.inputPer1M"),
    ("spec.models.0.weight", math.nan, "spec.models[0].weight"),
    ("spec.timeout", "25h", "spec.timeout: '25h' exceeds 24h"),
    ("spec.retries.perTryTimeout", "1441m", "spec.retries.perTryTimeout: '1441m' exceeds 24h"),
]


@pytest.mark.parametrize(
    ("path", "value", "message"), INVALID, ids=[f"{c[0]}={c[1]!r}"[:60] for c in INVALID]
)
def test_invalid_values_are_refused_naming_the_field(
    policy_doc: dict[str, Any], path: str, value: Any, message: str
) -> None:
    if ".when." in path:
        policy_doc["spec"]["strategy"]["rules"][0]["when"]["minPromptTokens"] = 10
    node, key = _at(policy_doc, path)
    node[key] = value
    with pytest.raises(PolicyError) as raised:
        parse_policy(policy_doc)
    assert message in str(raised.value)


@pytest.mark.parametrize(
    "bundle", ["builtin:default", "builtin:minilm", "builtin:heuristic", "/var/lib/b/x.v2"]
)
def test_valid_bundle_references(policy_doc: dict[str, Any], bundle: str) -> None:
    policy_doc["spec"]["strategy"]["router"]["bundle"] = bundle
    assert parse_policy(policy_doc).spec.strategy.router.bundle == bundle


def test_header_names_are_lowercased(policy_doc: dict[str, Any]) -> None:
    policy_doc["spec"]["match"]["headers"] = {"X-Tenant": "a"}
    assert parse_policy(policy_doc).spec.match.headers == {"x-tenant": "a"}


def test_schema_constants_follow_the_data_plane() -> None:
    assert set(get_args(Category)) == set(CATEGORIES)
    assert POLICY_HEURISTIC == HEURISTIC_BUNDLE


def _named(doc: dict[str, Any], name: str, **match: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    doc["metadata"]["name"] = name
    doc["spec"]["match"].update(match)
    return doc


def test_an_alias_answered_twice_under_the_same_headers_does_not_compile(
    policy_doc: dict[str, Any],
) -> None:
    first, second = _named(policy_doc, "a"), _named(policy_doc, "b", models=["other", "auto"])
    with pytest.raises(CompileError, match=r"spec.match.models\[1\]: alias 'auto'.*default/a"):
        compile_config([parse_policy(first), parse_policy(second)])
    # under a header condition it is a more specific policy, not a conflict
    specific = _named(policy_doc, "b", headers={"x-tenant": "acme"})
    compile_config([parse_policy(first), parse_policy(specific)])


# ext_proc: isolation of what only the data plane can reject.


def _two_policies(policy_doc: dict[str, Any]) -> pb.RoutingConfig:
    good = _named(policy_doc, "good", models=["good"])
    bad = _named(policy_doc, "bad", models=["bad"])
    return compile_config([parse_policy(good), parse_policy(bad)])


def _target(config: Any, model: str, **headers: str) -> Any:
    request = parse_request(
        Endpoint.CHAT,
        b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}]}' % (model.encode()),
    )
    return select_target(config, request, headers)


def test_a_policy_that_does_not_build_is_left_out_alone(policy_doc: dict[str, Any]) -> None:
    proto = _two_policies(policy_doc)
    bad = next(p for p in proto.policies if p.name == "bad")
    bad.strategy.rules[0].when.regex = "("
    config = build_config(proto)
    assert set(config.policy_errors) == {"default/bad"}
    assert config.policy_errors["default/bad"].startswith("strategy.rules[0].when.regex:")
    assert _target(config, "good").key == "default/good"
    for name in ("bad", "default/bad/light"):
        with pytest.raises(GatewayError) as raised:
            _target(config, name)
        assert (raised.value.status, raised.value.code) == (503, "policy_unavailable")
        assert "default/bad" in raised.value.message
    with pytest.raises(GatewayError) as raised:
        _target(config, "typo")
    assert raised.value.code == "model_not_found"
    assert "bad" not in config.served_names


def test_unavailable_alias_under_other_headers_is_503(policy_doc: dict[str, Any]) -> None:
    good = _named(policy_doc, "good", headers={"x-tenant": "a"})
    bad = _named(policy_doc, "bad")
    proto = compile_config([parse_policy(good), parse_policy(bad)])
    proto.policies[0].strategy.tiers[0].model = "ghost"  # default/bad sorts first
    config = build_config(proto)
    assert config.policy_errors == {"default/bad": "strategy.tiers[0].model: unknown model 'ghost'"}
    assert _target(config, "auto", **{"x-tenant": "a"}).key == "default/good"
    with pytest.raises(GatewayError, match="RoutePolicy default/bad") as raised:
        _target(config, "auto")
    assert raised.value.status == 503


class _Loader:
    """Loads every bundle but ``missing``, counting calls."""

    def __init__(self, missing: str) -> None:
        self.missing = missing
        self.calls: list[str] = []

    def __call__(self, bundle: str) -> Scorer:
        self.calls.append(bundle)
        if bundle == self.missing:
            raise ValueError(f"router bundle {bundle!r}: no such directory")
        return HeuristicScorer()


def test_a_bundle_that_does_not_load_leaves_out_only_its_policies(
    policy_doc: dict[str, Any],
) -> None:
    proto = _two_policies(policy_doc)
    next(p for p in proto.policies if p.name == "bad").strategy.router_bundle = "/srv/missing"
    loader = _Loader("/srv/missing")
    state = RuntimeState(scorer_loader=loader)
    config, scorers = state.prepare(proto)
    assert set(scorers) == {"builtin:default"}
    assert list(config.policy_errors) == ["default/bad"]
    message = config.policy_errors["default/bad"]
    assert message.startswith("spec.strategy.router.bundle: router bundle '/srv/missing'")
    assert "no such directory" in message
    assert _target(config, "good").router_bundle == "builtin:default"
    # a restarted replica (fresh state) makes the same choice; the bundle is tried again
    again = RuntimeState(scorer_loader=loader).prepare(proto)[0]
    assert again.policy_errors == config.policy_errors
    assert loader.calls.count("/srv/missing") == 2


def test_the_ack_lists_the_policies_left_out(policy_doc: dict[str, Any]) -> None:
    proto = _two_policies(policy_doc)
    next(p for p in proto.policies if p.name == "bad").strategy.router_bundle = "/srv/missing"
    client = ConfigStreamClient(
        "unused:0", "pod-1", RuntimeState(scorer_loader=_Loader("/srv/missing"))
    )
    ack = asyncio.run(client.apply(proto))
    assert (ack.node, ack.version, ack.error) == ("pod-1", proto.version, "")
    assert [(e.policy, e.message[:28]) for e in ack.policy_errors] == [
        ("default/bad", "spec.strategy.router.bundle:")
    ]
    assert client.first_config.is_set()
    assert _target(client.state.config, "good").key == "default/good"


# Operator: status of exactly the policies the data plane left out.


class _Plane:
    """A ControlPlane stand-in: replica pod-1 leaves out every policy whose bundle is under
    /srv/missing, pod-2 serves everything."""

    def __init__(self) -> None:
        self.metrics = OperatorMetrics()
        self.stream = ConfigStreamServer(metrics=self.metrics)
        self.published: list[pb.RoutingConfig] = []

    async def apply(self, config: pb.RoutingConfig) -> ApplyResult:
        self.published.append(config)
        await self.stream.publish(config)
        errors = {
            f"{p.namespace}/{p.name}": f"router bundle {p.strategy.router_bundle!r} did not load"
            for p in config.policies
            if p.strategy.router_bundle.startswith("/srv/missing")
        }
        self.stream.policy_errors["pod-1"] = (config.version, errors)
        self.stream.policy_errors["pod-2"] = (config.version, {})
        return ApplyResult(config.version, True, True, 0.0)

    async def prime(self, config: pb.RoutingConfig) -> None:
        await self.stream.publish(config)


def _missing_bundle(doc: dict[str, Any], bundle: str = "/srv/missing") -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    doc["spec"]["strategy"]["router"]["bundle"] = bundle
    return doc


def test_only_the_policy_the_data_plane_left_out_is_not_ready(policy_doc: dict[str, Any]) -> None:
    plane = _Plane()
    reconciler = Reconciler(plane)  # type: ignore[arg-type]

    async def scenario() -> list[Any]:
        return [
            await reconciler.upsert(_named(policy_doc, "good", models=["good"])),
            await reconciler.upsert(_missing_bundle(_named(policy_doc, "bad", models=["bad"]))),
            await reconciler.upsert(_named(policy_doc, "later", models=["later"])),
        ]

    first, bad, later = asyncio.run(scenario())
    assert first.conditions[0].status == "True"
    assert later.conditions[0].status == "True"
    ready, degraded = bad.conditions
    assert (ready.status, ready.reason) == ("False", "DataPlaneRejected")
    assert ready.message == "not served: ext_proc pod-1: router bundle '/srv/missing' did not load"
    assert (degraded.status, degraded.reason) == ("True", "NotServing")
    # a new policy has no previous generation: it stays in the config, and every replica (a
    # restarted one too) isolates it the same way until its bundle exists there
    assert sorted(p.name for p in reconciler.config.policies) == ["bad", "good", "later"]
    metrics = plane.metrics.registry
    assert metrics.get_sample_value("switchyard_operator_policies", {"state": "ready"}) == 2
    assert metrics.get_sample_value("switchyard_operator_policies", {"state": "not_ready"}) == 1
    errors = "switchyard_operator_reconcile_errors_total"
    assert metrics.get_sample_value(errors, {"reason": "DataPlaneRejected"}) == 1
    asyncio.run(reconciler.delete("default", "bad"))
    assert metrics.get_sample_value("switchyard_operator_policies", {"state": "not_ready"}) == 0


def test_an_edit_the_data_plane_rejects_rolls_back_to_the_previous_generation(
    policy_doc: dict[str, Any],
) -> None:
    plane = _Plane()
    reconciler = Reconciler(plane)  # type: ignore[arg-type]

    async def scenario() -> list[Any]:
        return [
            await reconciler.upsert(policy_doc),
            await reconciler.upsert(_missing_bundle(policy_doc)),
            await reconciler.upsert(_missing_bundle(policy_doc, "/srv/missing-too")),
        ]

    good, edited, again = asyncio.run(scenario())
    assert good.conditions[0].status == "True"
    for outcome in (edited, again):
        ready, degraded = outcome.conditions
        assert (ready.status, ready.reason) == ("False", "DataPlaneRejected")
        assert (degraded.status, degraded.reason) == ("True", "ServingLastGood")
    assert "/srv/missing-too" in again.conditions[0].message
    served = plane.published[-1].policies[0].strategy.router_bundle
    assert served == reconciler.config.policies[0].strategy.router_bundle == "builtin:default"
    assert outcome.config_version == reconciler.config.version


def test_an_alias_conflict_is_reported_on_the_newcomer(policy_doc: dict[str, Any]) -> None:
    reconciler = Reconciler(_Plane())  # type: ignore[arg-type]

    async def scenario() -> tuple[Any, Any]:
        first = await reconciler.upsert(_named(policy_doc, "b"))
        return first, await reconciler.upsert(_named(policy_doc, "a"))

    first, second = asyncio.run(scenario())
    assert first.conditions[0].status == "True"
    ready = second.conditions[0]
    assert (ready.status, ready.reason) == ("False", "AliasConflict")
    assert ready.message.startswith("spec.match.models[0]: alias 'auto'")
    assert "default/b" in ready.message
    assert [p.name for p in reconciler.config.policies] == ["b"]


def test_compiled_example_has_no_policy_errors(policy_doc: dict[str, Any]) -> None:
    assert compile_docs(policy_doc).policy_errors == {}


def test_rejected_policies_are_per_version() -> None:
    stream = ConfigStreamServer()
    stream.policy_errors = {
        "pod-1": ("v2", {"ns/a": "boom"}),
        "pod-2": ("v1", {"ns/a": "old", "ns/b": "old"}),
    }
    assert stream.rejected_policies("v2") == {"ns/a": {"pod-1": "boom"}}
    assert cs.ConfigAck(policy_errors=[cs.PolicyError(policy="ns/a")]).policy_errors[0].policy


def test_the_ext_proc_answers_an_isolated_policy_with_an_openai_503(
    policy_doc: dict[str, Any],
) -> None:
    proto = _two_policies(policy_doc)
    next(p for p in proto.policies if p.name == "bad").strategy.router_bundle = "/srv/missing"
    state = RuntimeState(scorer_loader=_Loader("/srv/missing"))
    state.swap(state.prepare(proto))
    body = b'{"model": "bad", "messages": [{"role": "user", "content": "hi"}]}'
    response = asyncio.run(Processor(state).route(Endpoint.CHAT, {}, body))
    reply = response.immediate_response
    assert reply.status.code == 503
    error = orjson.loads(reply.body)["error"]
    assert (error["code"], error["type"], error["param"]) == (
        "policy_unavailable",
        "server_error",
        "model",
    )
    assert "RoutePolicy default/bad" in error["message"]


def test_a_replica_that_acks_later_updates_the_status(policy_doc: dict[str, Any]) -> None:
    plane = _Plane()
    reconciler = Reconciler(plane)  # type: ignore[arg-type]
    outcome = asyncio.run(reconciler.upsert(policy_doc))
    assert outcome.conditions[0].status == "True"
    assert reconciler.data_plane_changes() == {}  # the reconcile reported it already

    version = reconciler.config.version
    plane.stream.policy_errors["pod-3"] = (version, {"default/default": "bundle gone"})
    changes = reconciler.data_plane_changes()
    assert list(changes) == ["default/default"]
    ready = changes["default/default"][0]
    assert (ready.status, ready.reason) == ("False", "DataPlaneRejected")
    assert ready.message == "not served: ext_proc pod-3: bundle gone"
    assert reconciler.data_plane_changes() == {}

    plane.stream.policy_errors["pod-3"] = (version, {})
    ready = reconciler.data_plane_changes()["default/default"][0]
    assert (ready.status, ready.reason) == ("True", "Programmed")


def test_requests_for_a_left_out_specific_policy_do_not_fall_to_a_generic_one(
    policy_doc: dict[str, Any],
) -> None:
    generic = _named(policy_doc, "generic")
    specific = _named(policy_doc, "acme", headers={"x-tenant": "acme"})
    proto = compile_config([parse_policy(generic), parse_policy(specific)])
    proto.policies[0].strategy.rules[0].when.regex = "("  # default/acme sorts first
    config = build_config(proto)
    assert list(config.policy_errors) == ["default/acme"]
    with pytest.raises(GatewayError, match="RoutePolicy default/acme") as raised:
        _target(config, "auto", **{"x-tenant": "acme"})
    assert raised.value.status == 503
    assert _target(config, "auto", **{"x-tenant": "other"}).key == "default/generic"
    assert "auto" in config.served_names


def test_the_policy_with_the_fail_open_model_is_not_needed_by_the_others(
    policy_doc: dict[str, Any],
) -> None:
    reconciler = Reconciler(_Plane(), fail_open_model="light")  # type: ignore[arg-type]
    other = _named(policy_doc, "other", models=["other"])
    other["spec"]["models"][0]["name"] = "small"
    other["spec"]["models"][0]["fallbacks"] = []
    other["spec"]["strategy"]["tiers"][0]["model"] = "small"
    other["spec"]["strategy"]["rules"][0]["route"] = "small"

    async def scenario() -> list[Any]:
        await reconciler.restore([])  # an empty cluster: fails closed, starts
        with_it = await reconciler.upsert(policy_doc)
        fail_open = reconciler.config.fail_open_backend
        await reconciler.delete("default", "default")
        return [with_it, fail_open, reconciler.config, await reconciler.upsert(other)]

    with_it, fail_open, after_delete, outcome = asyncio.run(scenario())
    assert with_it.conditions[0].status == "True"
    assert fail_open == "default.default.light"
    assert (len(after_delete.policies), after_delete.fail_open_backend) == (0, "")
    assert outcome.conditions[0].status == "True"
    assert reconciler.config.fail_open_backend == ""
