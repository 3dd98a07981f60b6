"""Client keys: schema, allowance merge up the tenant chain, lookup, expiry, the ext_proc's
401/403 and the Envoy routes that strip the client's key."""

from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from conftest import EXAMPLE
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2
from test_processor import error_of

from switchyard.cli import main
from switchyard.extproc.config import build_config
from switchyard.extproc.engine import exclusions, select_target
from switchyard.extproc.keys import KeyEntry, authenticate, denial, key_table
from switchyard.extproc.processor import Processor
from switchyard.extproc.request import Endpoint, parse_request
from switchyard.extproc.scoring import HeuristicScorer
from switchyard.extproc.state import RuntimeState
from switchyard.headers import EXTPROC_FILTER
from switchyard.local.documents import load_inputs
from switchyard.operator.clientkeys import (
    ClientKeysSpec,
    compile_client_keys,
    hash_key,
    new_key,
    parse_client_keys,
)
from switchyard.operator.compiler import compile_config
from switchyard.operator.envoy_config import GatewaySettings, build_route_config
from switchyard.operator.policy import PolicyError, parse_policy

ALICE = "sk-switchyard-alice-0123456789"
BOB = "sk-switchyard-bob-0123456789"
CAROL = "sk-switchyard-carol-0123456789"
DAVE = "sk-switchyard-dave-0123456789"
ERIN = "sk-switchyard-erin-0123456789"
HI = [{"role": "user", "content": "hi"}]


def keys_doc(*keys: dict[str, Any], tenants: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "switchyard.dev/v1alpha1",
        "kind": "ClientKeys",
        "metadata": {"name": "clients"},
        "spec": {"tenants": tenants or [{"name": "team"}], "keys": list(keys)},
    }


def key(name: str, secret: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "tenant": "team", "sha256": hash_key(secret), **extra}


def spec(doc: dict[str, Any]) -> ClientKeysSpec:
    return parse_client_keys(doc, "keys.yaml")


def table(doc: dict[str, Any]) -> dict[str, KeyEntry]:
    policies = [parse_policy(yaml.safe_load(EXAMPLE.read_text()))]
    config = compile_config(policies, client_keys=compile_client_keys([spec(doc)]))
    found = key_table(config)
    assert found is not None
    return found


def test_schema_errors_name_the_field() -> None:
    with pytest.raises(PolicyError, match=r"(?s)keys\.0\.sha256.*64 lowercase hex"):
        spec(keys_doc({"name": "a", "tenant": "team", "sha256": ALICE}))
    with pytest.raises(PolicyError, match=r"(?s)keys\.0\.expiresAt.*time zone"):
        spec(keys_doc(key("a", ALICE, expiresAt="2030-01-01T00:00:00")))
    with pytest.raises(PolicyError, match=r"(?s)keys\.0\.password.*Extra inputs"):
        spec(keys_doc(key("a", ALICE, password=ALICE)))
    with pytest.raises(PolicyError, match="tenant 'nobody' is not defined"):
        compile_client_keys([spec(keys_doc(key("a", ALICE, tenant="nobody")))])
    with pytest.raises(PolicyError, match="same sha256"):
        compile_client_keys([spec(keys_doc(key("a", ALICE), key("b", ALICE)))])
    loop = [{"name": "x", "parent": "y"}, {"name": "y", "parent": "x"}]
    with pytest.raises(PolicyError, match="cycle"):
        compile_client_keys([spec(keys_doc(key("a", ALICE, tenant="x"), tenants=loop))])


def test_allowance_is_the_intersection_up_the_tenant_chain() -> None:
    tenants = [
        {"name": "team", "models": ["light", "standard", "capable"], "dataClasses": ["public"]},
        {"name": "project", "parent": "team", "models": ["light", "standard"]},
        {"name": "user", "parent": "project", "policies": ["auto"]},
    ]
    doc = keys_doc(key("a", ALICE, tenant="user", models=["standard", "capable"]), tenants=tenants)
    (compiled,) = compile_client_keys([spec(doc)])
    assert list(compiled.tenants) == ["user", "project", "team"]
    entry = table(doc)[hash_key(ALICE)]
    assert entry.tenant == "user"
    assert entry.models == {"standard"}
    assert entry.aliases == {"auto"}
    assert entry.data_classes == {"public"}
    assert denial(entry, "auto", "standard", "public") == ""
    assert "model 'light'" in denial(entry, "auto", "light", "public")
    assert "model 'other'" in denial(entry, "other", "standard", "public")
    assert "data class 'pii'" in denial(entry, "auto", "standard", "pii")


def test_empty_lists_allow_anything_and_the_key_is_never_stored() -> None:
    doc = keys_doc(key("a", ALICE))
    entry = table(doc)[hash_key(ALICE)]
    assert entry.models is None and entry.aliases is None and entry.data_classes is None
    assert denial(entry, "anything", "any", "pii") == ""
    policies = [parse_policy(yaml.safe_load(EXAMPLE.read_text()))]
    config = compile_config(policies, client_keys=compile_client_keys([spec(doc)]))
    assert ALICE.encode() not in config.SerializeToString()


def test_lookup_missing_unknown_revoked_expired() -> None:
    past = "2020-01-01T00:00:00Z"
    doc = keys_doc(key("a", ALICE), key("b", BOB, revoked=True), key("c", "old", expiresAt=past))
    keys = table(doc)
    now = time.time()
    assert authenticate(keys, {"authorization": f"Bearer {ALICE}"}, now).name == "a"
    assert authenticate(keys, {"x-api-key": ALICE}, now).name == "a"
    cases = {
        "missing": {},
        "unknown": {"authorization": "Bearer sk-nope"},
        "revoked": {"x-api-key": BOB},
        "expired": {"authorization": "Bearer old"},
    }
    for word, headers in cases.items():
        with pytest.raises(Exception, match=word) as raised:
            authenticate(keys, headers, now)
        error = raised.value
        assert getattr(error, "status", None) == 401
        assert getattr(error, "code", None) == "invalid_api_key"
        assert BOB not in str(error) and "sk-nope" not in str(error)
    future = keys_doc(key("c", "soon", expiresAt="2030-01-01T00:00:00+00:00"))
    entry = table(future)[hash_key("soon")]
    assert authenticate(table(future), {"x-api-key": "soon"}, entry.expires_at - 1).name == "c"
    with pytest.raises(Exception, match="expired"):
        authenticate(table(future), {"x-api-key": "soon"}, entry.expires_at)


def test_new_keys_are_random_and_prefixed() -> None:
    a, b = new_key(), new_key()
    assert a != b and a.startswith("sk-switchyard-") and len(a) > 40
    assert hash_key(a) != hash_key(b) and len(hash_key(a)) == 64


def test_keys_turn_on_attributes_strip_headers_and_close_fail_open() -> None:
    policies = [parse_policy(yaml.safe_load(EXAMPLE.read_text()))]
    off = compile_config(policies, "light")
    assert not off.require_client_key and "authorization" not in off.request_headers
    on = compile_config(policies, "light", client_keys=compile_client_keys([]))
    assert on.require_client_key
    assert {"authorization", "x-api-key"} <= set(on.request_headers)
    for config in (off, on):
        routes = build_route_config(config, GatewaySettings()).virtual_hosts[0].routes
        upstream = [r for r in routes if r.route.cluster or r.route.cluster_header]
        assert upstream, "no route to an upstream"
        for route in upstream:
            assert {"authorization", "x-api-key"} <= set(route.request_headers_to_remove)
    names = {r.name for r in build_route_config(on, GatewaySettings()).virtual_hosts[0].routes}
    assert "fail_open" not in names and "unrouted" in names
    assert "fail_open" in {
        r.name for r in build_route_config(off, GatewaySettings()).virtual_hosts[0].routes
    }


def test_models_with_fallbacks_get_a_route_without_them_when_keys_are_on() -> None:
    policy = yaml.safe_load(EXAMPLE.read_text())
    policy["spec"]["models"][1]["fallbacks"] = ["capable"]
    policies = [parse_policy(policy)]

    def routes(config: Any) -> dict[str, Any]:
        built = build_route_config(config, GatewaySettings()).virtual_hosts[0].routes
        return {r.name: r for r in built}

    standard = "default.default.standard"
    assert f"{standard}~direct" not in routes(compile_config(policies))
    compiled = compile_config(policies, client_keys=compile_client_keys([]))
    on = routes(compiled)
    assert on[standard].route.cluster == f"{standard}~fallbacks"
    direct = on[f"{standard}~direct"]
    assert direct.route.cluster == standard  # the model's own cluster: no fallback attempt
    matched = direct.match.dynamic_metadata[0].value.string_match.exact
    assert matched == f"{standard}~direct"
    with_fallbacks = [m.backend_key for m in compiled.policies[0].models if m.fallbacks]
    assert [n for n in on if n.endswith("~direct")] == [f"{k}~direct" for k in with_fallbacks]


async def test_a_key_not_allowed_every_fallback_takes_the_route_without_them() -> None:
    policy = yaml.safe_load(EXAMPLE.read_text())
    policy["spec"]["models"][1]["fallbacks"] = ["capable"]
    doc = keys_doc(
        key("a", ALICE, models=["standard"]), key("b", BOB, models=["standard", "capable"])
    )
    config = build_config(
        compile_config([parse_policy(policy)], client_keys=compile_client_keys([spec(doc)]))
    )
    state = RuntimeState(scorer_loader=lambda _bundle: HeuristicScorer())
    state.swap((config, {b: HeuristicScorer() for b in config.router_bundles}))
    for secret, backend in (
        (ALICE, "default.default.standard~direct"),
        (BOB, "default.default.standard"),
    ):
        response = await send(state, "auto", x_api_key=secret)
        meta = response.dynamic_metadata.fields["switchyard"].struct_value.fields
        assert meta["backend"].string_value == backend


def test_local_mode_reads_client_keys_documents(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text(EXAMPLE.read_text())
    assert load_inputs([str(tmp_path)]).client_keys is None
    (tmp_path / "keys.yaml").write_text(yaml.safe_dump(keys_doc(key("a", ALICE))))
    keys = load_inputs([str(tmp_path)]).client_keys
    assert keys is not None and [k.name for k in keys] == ["a"]


def test_a_folder_is_read_without_its_subfolders(tmp_path: Path) -> None:
    """As `kubectl apply -f DIR`: `-f examples/` does not pick up examples/tenants/ (whose keys
    would switch authentication on for `make up`)."""
    (tmp_path / "policy.yaml").write_text(EXAMPLE.read_text())
    (tmp_path / "tenants").mkdir()
    (tmp_path / "tenants" / "keys.yaml").write_text(yaml.safe_dump(keys_doc(key("a", ALICE))))
    assert load_inputs([str(tmp_path)]).client_keys is None
    keys = load_inputs([str(tmp_path), str(tmp_path / "tenants")]).client_keys
    assert keys is not None and [k.name for k in keys] == ["a"]


def test_the_tenants_example_loads_with_the_demo_keys() -> None:
    inputs = load_inputs([str(EXAMPLE.parent / "tenants")])
    assert inputs.client_keys is not None
    assert sorted(k.name for k in inputs.client_keys) == ["batch", "demo"]
    digests = {k.name: k.sha256 for k in inputs.client_keys}
    assert digests["demo"] == hashlib.sha256(b"sk-switchyard-demo").hexdigest()
    assert digests["batch"] == hashlib.sha256(b"sk-switchyard-batch-demo").hexdigest()


def state_with(doc: dict[str, Any]) -> RuntimeState:
    policies = [parse_policy(yaml.safe_load(EXAMPLE.read_text()))]
    config = build_config(compile_config(policies, client_keys=compile_client_keys([spec(doc)])))
    state = RuntimeState(scorer_loader=lambda _bundle: HeuristicScorer())
    state.swap((config, {b: HeuristicScorer() for b in config.router_bundles}))
    return state


async def send(state: RuntimeState, model: str, **headers: str) -> ep.ProcessingResponse:
    body = orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
    attributes = struct_pb2.Struct()
    attributes.update(
        {"request.path": "/v1/chat/completions"}
        | {f"request.headers['{k.replace('_', '-')}']": v for k, v in headers.items()}
    )
    message = ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=True))
    message.attributes[EXTPROC_FILTER].CopyFrom(attributes)
    processor = Processor(state)
    raw, _ = await processor.message(processor.open(), message.SerializeToString())
    return ep.ProcessingResponse.FromString(raw)


async def test_processor_answers_401_and_403() -> None:
    doc = keys_doc(
        key("a", ALICE, models=["capable"]),
        key("b", BOB, revoked=True),
        key("c", CAROL, models=["elsewhere"]),
        key("d", DAVE, policies=["other"]),
    )
    state = state_with(doc)
    status, error = error_of(await send(state, "auto"))
    assert (status, error["code"]) == (401, "invalid_api_key")
    assert error["type"] == "invalid_request_error"
    status, error = error_of(await send(state, "auto", x_api_key=BOB))
    assert status == 401 and "revoked" in error["message"] and BOB not in error["message"]
    # No model of the policy is allowed: 403 naming them.
    status, error = error_of(await send(state, "auto", authorization=f"Bearer {CAROL}"))
    assert (status, error["code"], error["type"]) == (403, "permission_denied", "permission_error")
    assert "capable, light, standard" in error["message"] and CAROL not in error["message"]
    status, error = error_of(await send(state, "auto", x_api_key=DAVE))
    assert (status, error["code"]) == (403, "permission_denied") and "'auto'" in error["message"]
    status, error = error_of(await send(state, "light", x_api_key=ALICE))
    assert (status, error["code"]) == (403, "permission_denied")


async def test_the_model_allowance_is_a_routing_constraint() -> None:
    state = state_with(keys_doc(key("a", ALICE, models=["capable"]), key("e", ERIN)))
    # "hi" goes to the light model, unless the key only allows capable.
    free = await send(state, "auto", x_api_key=ERIN)
    meta = free.dynamic_metadata.fields["switchyard"].struct_value.fields
    assert meta["model"].string_value == "light"
    limited = await send(state, "auto", authorization=f"Bearer {ALICE}")
    meta = limited.dynamic_metadata.fields["switchyard"].struct_value.fields
    assert meta["model"].string_value == "capable"
    assert "constrained" in meta["reason"].string_value


def test_cli_new_prints_the_key_once_and_hash_matches(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["keys", "new", "--tenant", "alice", "--name", "laptop"]) == 0
    out = capsys.readouterr().out
    secret = out.split("): ", 1)[1].split("\n", 1)[0]
    assert secret.startswith("sk-switchyard-") and out.count(secret) == 1
    entry = yaml.safe_load(out.split("\n", 1)[1])[0]
    assert entry == {"name": "laptop", "tenant": "alice", "sha256": hash_key(secret)}
    monkeypatch.setattr("sys.stdin", io.StringIO(secret + "\n"))
    assert main(["keys", "hash"]) == 0
    assert capsys.readouterr().out.strip() == hash_key(secret)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["keys", "hash"]) == 1


def test_exclusions_name_the_models_a_key_may_not_use() -> None:
    config = state_with(keys_doc(key("a", ALICE))).config
    request = parse_request(Endpoint.CHAT, orjson.dumps({"model": "auto", "messages": HI}))
    target = select_target(config, request, {})
    why = exclusions(target, request, {}, frozenset({"capable"}))
    assert why == {
        "light": "not allowed for this API key",
        "standard": "not allowed for this API key",
        "capable": "",
    }
    assert set(exclusions(target, request, {}).values()) == {""}


async def list_models(state: RuntimeState, **headers: str) -> ep.ProcessingResponse:
    message = ep.ProcessingRequest()
    sent = message.request_headers
    sent.end_of_stream = True
    for name, value in {":method": "GET", ":path": "/v1/models", **headers}.items():
        sent.headers.headers.add(key=name.replace("_", "-"), raw_value=value.encode())
    processor = Processor(state)
    raw, done = await processor.message(processor.open(), message.SerializeToString())
    assert done  # answered at once, whatever the outcome
    return ep.ProcessingResponse.FromString(raw)


async def test_models_are_listed_per_key_when_keys_are_on() -> None:
    doc = keys_doc(key("a", ALICE, models=["capable"]), key("e", ERIN), key("b", BOB, revoked=True))
    state = state_with(doc)
    for refused in (await list_models(state), await list_models(state, x_api_key=BOB)):
        status, error = error_of(refused)
        assert (status, error["code"]) == (401, "invalid_api_key")
        assert BOB not in error["message"]

    def ids(response: ep.ProcessingResponse) -> list[str]:
        reply = response.immediate_response
        assert reply.status.code == 200
        return [m["id"] for m in orjson.loads(reply.body)["data"]]

    everything = ids(await list_models(state, authorization=f"Bearer {ERIN}"))
    assert {"auto", "light", "standard", "capable", "default/default/light"} <= set(everything)
    only = ids(await list_models(state, x_api_key=ALICE))
    assert only == ["auto", "capable", "default/default/capable"]


def test_the_models_route_asks_the_ext_proc_only_when_keys_are_on() -> None:
    policies = [parse_policy(yaml.safe_load(EXAMPLE.read_text()))]
    off = compile_config(policies)
    on = compile_config(policies, client_keys=compile_client_keys([]))

    def models_route(config: Any) -> Any:
        routes = build_route_config(config, GatewaySettings()).virtual_hosts[0].routes
        return next(r for r in routes if r.name == "models")

    plain = models_route(off)
    assert plain.direct_response.status == 200 and not plain.typed_per_filter_config
    assert b'"id": "auto"' in plain.direct_response.body.inline_string.encode()
    keyed = models_route(on)
    assert keyed.direct_response.status == 503  # only if the ext_proc did not answer
    assert "auto" not in keyed.direct_response.body.inline_string
    wrapped = route_components_pb2.FilterConfig()
    keyed.typed_per_filter_config[EXTPROC_FILTER].Unpack(wrapped)
    per_route = ext_proc_pb2.ExtProcPerRoute()
    wrapped.config.Unpack(per_route)
    overrides = per_route.overrides
    assert overrides.HasField("failure_mode_allow") and not overrides.failure_mode_allow.value
    mode = overrides.processing_mode
    assert (mode.request_header_mode, mode.request_body_mode) == (mode.SEND, mode.NONE)
    assert mode.response_body_mode == mode.NONE
