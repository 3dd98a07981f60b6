"""Delegated JWT authentication: the ClientKeys ``jwt`` schema, its compiled form (tenant chains
and allowances, qualified in Kubernetes), the Envoy config (jwt_authn before the ext_proc on a
JWT-only twin of its routes, a client's payload header removed first, none forwarded
upstream, refusals OpenAI-style) and the ext_proc's claim → tenant mapping."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest
import yaml
from conftest import EXAMPLE
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.http.early_header_mutation.header_mutation.v3 import (
    header_mutation_pb2 as early_pb2,
)
from test_client_keys import send
from test_processor import error_of

from switchyard.api.v1 import routing_pb2 as pb
from switchyard.extproc.claims import MAX_SUBJECT, jwt_entry, jwt_table
from switchyard.extproc.config import build_config
from switchyard.extproc.errors import GatewayError
from switchyard.extproc.scoring import HeuristicScorer
from switchyard.extproc.state import RuntimeState
from switchyard.headers import EXTPROC_FILTER, JWT_PAYLOAD_HEADER, REQUEST_ID_HEADER
from switchyard.operator.clientkeys import (
    ClientKeysSpec,
    compile_client_keys,
    compile_jwt,
    compile_tenant_limits,
    hash_key,
    parse_client_keys,
)
from switchyard.operator.compiler import compile_config
from switchyard.operator.control_plane import ControlPlane
from switchyard.operator.envoy_config import (
    JWKS_CLUSTER,
    JWT_FILTER,
    GatewaySettings,
    build_clusters,
    build_listener,
    build_route_config,
)
from switchyard.operator.keyring import judge, served_jwt
from switchyard.operator.policy import PolicyError, parse_policy
from switchyard.operator.reconciler import Reconciler

JWKS = json.dumps({"keys": [{"kty": "RSA", "kid": "k1", "n": "AQAB", "e": "AQAB"}]})
KEY = "sk-switchyard-jwt-unit-0001"
TENANTS = [
    {"name": "org", "models": ["light", "capable"]},
    {"name": "research", "parent": "org", "models": ["capable", "standard"]},
    {"name": "metered", "parent": "org", "limits": {"requestsPerMinute": 5}},
]


def jwt_spec(**extra: Any) -> dict[str, Any]:
    return {"issuer": "https://idp.test", "jwks": {"inline": JWKS}, "tenantClaim": "team", **extra}


def doc(jwt: dict[str, Any] | None = None, namespace: str = "default") -> dict[str, Any]:
    spec: dict[str, Any] = {
        "tenants": TENANTS,
        "keys": [{"name": "k", "tenant": "metered", "sha256": hash_key(KEY)}],
    }
    if jwt is not None:
        spec["jwt"] = jwt
    return {
        "apiVersion": "switchyard.dev/v1alpha1",
        "kind": "ClientKeys",
        "metadata": {"name": "clients", "namespace": namespace},
        "spec": spec,
    }


def spec(document: dict[str, Any]) -> ClientKeysSpec:
    return parse_client_keys(document, "keys.yaml")


def config_for(*specs: ClientKeysSpec) -> pb.RoutingConfig:
    policies = [parse_policy(yaml.safe_load(EXAMPLE.read_text()))]
    return compile_config(
        policies,
        client_keys=compile_client_keys(specs),
        tenant_limits=compile_tenant_limits(specs),
        jwt=compile_jwt(specs),
    )


def payload(**claims: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()


def test_schema_errors_name_the_field() -> None:
    cases = [
        (jwt_spec(jwks={"inline": "not json"}), r"jwt\.jwks\.inline.*not JSON"),
        (jwt_spec(jwks={"inline": '{"keys": []}'}), r"jwt\.jwks\.inline.*non-empty"),
        (
            jwt_spec(jwks={"inline": json.dumps({"keys": [{"kty": "RSA", "d": "x"}]})}),
            r"jwt\.jwks\.inline.*private key",
        ),
        (jwt_spec(tenantClaim="a b"), r"jwt\.tenantClaim"),
        (jwt_spec(issuer="x" * 1025), r"jwt\.issuer"),
        (jwt_spec(audiences=["a"] * 17), r"jwt\.audiences"),
        (
            jwt_spec(jwks={"inline": JWKS, "uri": "https://idp.test/jwks"}),
            r"jwt\.jwks.*exactly one of inline or uri",
        ),
        (jwt_spec(jwks={"uri": "ftp://idp.test/jwks"}), r"jwt\.jwks\.uri"),
        (jwt_spec(jwks={"uri": "https://idp.test/j", "timeoutMs": 1}), r"jwt\.jwks\.timeoutMs"),
    ]
    for given, match in cases:
        with pytest.raises(PolicyError, match=f"(?s){match}"):
            spec(doc(given))
    two = [spec(doc(jwt_spec())), spec({**doc(jwt_spec()), "spec": {"jwt": jwt_spec()}})]
    with pytest.raises(PolicyError, match=r"spec\.jwt is set in more than one document"):
        compile_jwt(two)


def test_compiled_tenants_carry_their_chain_and_merged_allowance() -> None:
    compiled = compile_jwt([spec(doc(jwt_spec(audiences=["gw"])))])
    assert compiled is not None
    assert (compiled.issuer, list(compiled.audiences)) == ("https://idp.test", ["gw"])
    assert (compiled.tenant_claim, compiled.subject_claim) == ("team", "sub")
    tenants = {t.name: t for t in compiled.tenants}
    assert list(tenants["research"].tenants) == ["research", "org"]
    assert list(tenants["research"].allowance.models.values) == ["capable"]
    assert not tenants["metered"].allowance.HasField("aliases")
    assert compile_jwt([spec(doc())]) is None


def test_without_jwt_nothing_changes() -> None:
    plain = config_for(spec(doc()))
    assert not plain.HasField("jwt") and JWT_PAYLOAD_HEADER not in plain.request_headers
    listener = str(build_listener(plain, GatewaySettings()))
    routes = build_route_config(plain, GatewaySettings())
    assert JWT_FILTER not in listener and JWT_PAYLOAD_HEADER not in listener
    assert JWT_PAYLOAD_HEADER not in str(routes) and JWT_FILTER not in str(routes)


def _hcm(config: pb.RoutingConfig) -> hcm_pb2.HttpConnectionManager:
    listener = build_listener(config, GatewaySettings())
    hcm = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    return hcm


def test_envoy_verifies_before_the_ext_proc_and_strips_a_forged_payload() -> None:
    config = config_for(spec(doc(jwt_spec(audiences=["gw"]))))
    assert JWT_PAYLOAD_HEADER in config.request_headers
    hcm = _hcm(config)
    names = [f.name for f in hcm.http_filters]
    assert names.index(JWT_FILTER) == names.index(EXTPROC_FILTER) - 1
    authn = jwt_pb2.JwtAuthentication()
    hcm.http_filters[names.index(JWT_FILTER)].typed_config.Unpack(authn)
    (provider,) = authn.providers.values()
    assert provider.issuer == "https://idp.test" and list(provider.audiences) == ["gw"]
    assert provider.local_jwks.inline_string == JWKS
    assert provider.forward_payload_header == JWT_PAYLOAD_HEADER and not provider.forward
    assert not authn.rules  # only routes that ask verify
    # A client's own payload header is removed before any filter runs, with its request id.
    early = early_pb2.HeaderMutation()
    hcm.early_header_mutation_extensions[0].typed_config.Unpack(early)
    assert {m.remove for m in early.mutations} == {REQUEST_ID_HEADER, JWT_PAYLOAD_HEADER}
    # jwt_authn's refusals become OpenAI-style 401s.
    mapper = hcm.local_reply_config.mappers[1]
    assert mapper.status_code.value == 401
    assert "jwt_authn" in str(mapper.filter)
    assert "invalid_api_key" in str(mapper.body_format_override.json_format)

    routes = build_route_config(config, GatewaySettings()).virtual_hosts[0].routes
    with_extproc = [r for r in routes if EXTPROC_FILTER in r.typed_per_filter_config]
    twins = [r for r in with_extproc if JWT_FILTER in r.typed_per_filter_config]
    assert twins and len(twins) * 2 == len(with_extproc)
    for twin in twins:
        (bearer,) = [h for h in twin.match.headers if h.name == "authorization"]
        regex = bearer.string_match.safe_regex.regex
        assert regex.startswith("^Bearer ") and twin.name.endswith("_jwt")
        after = routes[list(routes).index(twin) + 1]
        assert after.name == twin.name.removesuffix("_jwt")
        assert JWT_FILTER not in after.typed_per_filter_config
    for route in routes:
        if route.HasField("route"):
            assert JWT_PAYLOAD_HEADER in route.request_headers_to_remove


def _state(config: pb.RoutingConfig) -> RuntimeState:
    compiled = build_config(config)
    state = RuntimeState(scorer_loader=lambda _bundle: HeuristicScorer())
    state.swap((compiled, {b: HeuristicScorer() for b in compiled.router_bundles}))
    return state


def test_the_claim_maps_to_the_tenant_with_its_allowance_and_limits() -> None:
    table = jwt_table(config_for(spec(doc(jwt_spec()))))
    assert table is not None and jwt_table(config_for(spec(doc()))) is None
    assert jwt_entry(table, {}) is None  # no verified token: the key path decides
    research = jwt_entry(table, {JWT_PAYLOAD_HEADER: payload(team="research", sub="ana")})
    assert research is not None and research.name == "jwt:ana"
    assert research.tenant == "research" and research.models == {"capable"}
    assert research.limits is None
    metered = jwt_entry(table, {JWT_PAYLOAD_HEADER: payload(team="metered", sub="s" * 500)})
    assert metered is not None and metered.name == "jwt:" + "s" * MAX_SUBJECT
    assert metered.limits is not None
    assert {c.scope for c in metered.limits.counters} == {"tenant 'metered'"}
    nameless = jwt_entry(table, {JWT_PAYLOAD_HEADER: payload(team="research", sub={"x": 1})})
    assert nameless is not None and nameless.name == "jwt:-"
    for claims, text in (({"team": "nobody"}, "names no tenant"), ({}, "has no 'team' claim")):
        with pytest.raises(GatewayError) as raised:
            jwt_entry(table, {JWT_PAYLOAD_HEADER: payload(**claims)})
        assert raised.value.status == 403 and text in raised.value.message
        assert "nobody" not in raised.value.message
    with pytest.raises(GatewayError) as broken:
        jwt_entry(table, {JWT_PAYLOAD_HEADER: "!!not base64 json"})
    assert broken.value.status == 500


async def test_the_processor_takes_the_verified_tenant_before_the_key() -> None:
    state = _state(config_for(spec(doc(jwt_spec()))))
    headers = {JWT_PAYLOAD_HEADER.replace("-", "_"): payload(team="research", sub="ana")}
    routed = await send(state, "auto", **headers)
    meta = routed.dynamic_metadata.fields["switchyard"].struct_value.fields
    assert meta["model"].string_value == "capable"  # research may only use capable
    status, error = error_of(await send(state, "light", **headers))
    assert (status, error["code"]) == (403, "permission_denied")
    unknown = {JWT_PAYLOAD_HEADER.replace("-", "_"): payload(team="ghost")}
    status, error = error_of(await send(state, "auto", **unknown))
    assert status == 403 and "'team'" in error["message"] and "ghost" not in error["message"]
    # Without a verified payload the key path decides, as before.
    keyed = await send(state, "auto", x_api_key=KEY)
    assert keyed.WhichOneof("response") != "immediate_response"
    status, error = error_of(await send(state, "auto"))
    assert (status, error["code"]) == (401, "invalid_api_key")


def test_kubernetes_resources_serve_qualified_tenant_chains() -> None:
    verdict = judge(doc(jwt_spec(), namespace="team-a"), {}, [])
    assert verdict.ready and verdict.jwt is not None
    tenants = {t.name: list(t.tenants) for t in verdict.jwt.tenants}
    assert tenants["research"] == ["team-a/research", "team-a/org"]
    assert served_jwt([verdict]) is verdict.jwt
    assert served_jwt([judge(doc(), {}, [])]) is None

    reconciler = Reconciler(ControlPlane(GatewaySettings(), ack_timeout_s=0.01))

    async def scenario() -> None:
        reconciler.restore_client_keys([doc(jwt_spec(), namespace="team-a")], {})
        await reconciler.restore([])
        config = reconciler.plane.stream.config
        assert config.HasField("jwt") and JWT_PAYLOAD_HEADER in config.request_headers
        table = jwt_table(config)
        assert table is not None
        entry = jwt_entry(table, {JWT_PAYLOAD_HEADER: payload(team="metered")})
        assert entry is not None and entry.tenant == "team-a/metered"
        assert entry.limits is not None  # the qualified tenant's served limits

    asyncio.run(scenario())


def test_a_remote_jwks_is_fetched_by_envoy_through_its_own_cluster() -> None:
    remote = {"uri": "https://idp.test:8443/.well-known/jwks.json", "cacheS": 60}
    config = config_for(spec(doc(jwt_spec(jwks=remote))))
    hcm = _hcm(config)
    authn = jwt_pb2.JwtAuthentication()
    (jwt_filter,) = [f for f in hcm.http_filters if f.name == JWT_FILTER]
    jwt_filter.typed_config.Unpack(authn)
    (provider,) = authn.providers.values()
    assert not provider.HasField("local_jwks")
    fetched = provider.remote_jwks
    assert fetched.http_uri.uri == remote["uri"] and fetched.http_uri.cluster == JWKS_CLUSTER
    assert fetched.http_uri.timeout.ToMilliseconds() == 2000
    assert fetched.cache_duration.seconds == 60 and fetched.async_fetch.fast_listener
    clusters = {c.name: c for c in build_clusters(config, GatewaySettings(), {})}
    jwks = clusters[JWKS_CLUSTER]
    assert jwks.type == jwks.STRICT_DNS and jwks.transport_socket.name.endswith("tls")
    (member,) = jwks.load_assignment.endpoints[0].lb_endpoints
    address = member.endpoint.address.socket_address
    assert (address.address, address.port_value) == ("idp.test", 8443)
    plain = config_for(spec(doc(jwt_spec(jwks={"uri": "http://10.0.0.7/jwks"}))))
    jwks = {c.name: c for c in build_clusters(plain, GatewaySettings(), {})}[JWKS_CLUSTER]
    assert jwks.type == jwks.STATIC and not jwks.HasField("transport_socket")
    assert JWKS_CLUSTER not in {
        c.name for c in build_clusters(config_for(spec(doc(jwt_spec()))), GatewaySettings(), {})
    }
