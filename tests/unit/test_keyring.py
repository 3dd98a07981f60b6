"""ClientKeys resources as the operator judges them (operator/keyring.py) and serves them
(Reconciler): field paths without input values, Secrets resolved to hashes, names qualified
by namespace, conflicts between resources, and keys on from the operator's first config."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest

from switchyard.operator.clientkeys import compile_client_keys, hash_key, parse_client_keys
from switchyard.operator.control_plane import ControlPlane
from switchyard.operator.envoy_config import GatewaySettings
from switchyard.operator.keyring import judge, secret_refs
from switchyard.operator.policy import PolicyError
from switchyard.operator.reconciler import Reconciler

ALICE = "sk-switchyard-alice-unit-0001"
BOB = "sk-switchyard-bob-unit-0002"


def doc(name: str = "clients", namespace: str = "team-a", **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "tenants": [{"name": "team"}, {"name": "alice", "parent": "team"}],
        "keys": [
            {"name": "alice", "tenant": "alice", "secretRef": {"name": "s", "key": "token"}},
            {"name": "bob", "tenant": "team", "sha256": hash_key(BOB)},
        ],
    }
    return {
        "apiVersion": "switchyard.dev/v1alpha1",
        "kind": "ClientKeys",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {**base, **spec},
    }


HASHES = {("s", "token"): hash_key(ALICE)}


def test_secret_refs_resolve_to_hashes_and_names_are_qualified() -> None:
    verdict = judge(doc(), HASHES, [])
    assert verdict.ready and verdict.reason == "Programmed"
    assert (verdict.tenant_count, verdict.key_count, verdict.active_keys) == (2, 2, 2)
    keys = {k.name: k for k in verdict.served}
    assert keys["team-a/alice"].sha256 == hash_key(ALICE)
    assert list(keys["team-a/alice"].tenants) == ["team-a/alice", "team-a/team"]
    assert verdict.tenants == {"team-a/team", "team-a/alice"}
    assert secret_refs(doc()) == {("s", "token")}
    assert secret_refs({"spec": {"keys": [{"secretRef": "nonsense"}, 7]}}) == set()


def test_a_missing_secret_leaves_out_that_key_alone() -> None:
    verdict = judge(doc(), {}, [])
    assert not verdict.ready and verdict.reason == "SecretMissing"
    assert verdict.message.startswith("spec.keys[0].secretRef: Secret 's' has no key 'token'")
    assert [k.name for k in verdict.served] == ["team-a/bob"]


def test_schema_errors_name_the_field_and_never_echo_the_value() -> None:
    pasted = doc(keys=[{"name": "k", "tenant": "team", "sha256": ALICE}])
    verdict = judge(pasted, HASHES, [])
    assert verdict.reason == "InvalidSpec" and not verdict.served
    assert verdict.message.startswith("spec.keys[0].sha256: must be 64 lowercase hex")
    assert ALICE not in verdict.message
    extra = doc(keys=[{"name": "k", "tenant": "team", "sha256": hash_key(BOB), "key": ALICE}])
    assert ALICE not in judge(extra, HASHES, []).message


def test_references_and_cycles_are_named_by_field() -> None:
    cases = [
        ({"tenants": [{"name": "a", "parent": "b"}, {"name": "b", "parent": "a"}],
          "keys": []}, "spec.tenants[0].parent: the parent chain of 'a' has a cycle"),
        ({"keys": [{"name": "k", "tenant": "ghost", "sha256": hash_key("x")}]},
         "spec.keys[0].tenant: no tenant 'ghost' in this resource"),
        ({"keys": [{"name": "k", "tenant": "team", "sha256": hash_key("x")},
                   {"name": "j", "tenant": "team", "sha256": hash_key("x")}]},
         "spec.keys[1].sha256: the same as spec.keys[0]"),
        ({"tenants": [{"name": "t", "parent": "ghost"}], "keys": []},
         "spec.tenants[0].parent: no tenant 'ghost' in this resource"),
    ]  # fmt: skip
    for spec, message in cases:
        verdict = judge(doc(**spec), HASHES, [])
        assert verdict.reason == "InvalidSpec" and verdict.message == message


def test_a_resource_conflicting_with_a_served_one_is_left_out() -> None:
    first = judge(doc(), HASHES, [])
    same_key = doc("copy", keys=[{"name": "eve", "tenant": "team", "sha256": hash_key(BOB)}])
    same_key["spec"]["tenants"] = [{"name": "team2"}]
    same_key["spec"]["keys"][0]["tenant"] = "team2"
    verdict = judge(same_key, HASHES, [first])
    assert verdict.reason == "Conflict" and not verdict.served
    assert (
        verdict.message == "spec.keys[0]: the same key as 'team-a/bob' of ClientKeys team-a/clients"
    )
    same_tenant = judge(doc("other", keys=[]), HASHES, [first])
    assert same_tenant.reason == "Conflict"
    assert same_tenant.message.startswith("spec.tenants[0].name: tenant 'team' is already")
    # Another namespace has its own tenants: no conflict by name.
    elsewhere = doc(
        "clients", "team-b", keys=[{"name": "bob", "tenant": "team", "sha256": hash_key("y")}]
    )
    assert judge(elsewhere, HASHES, [first]).ready


def test_active_keys_leave_out_revoked_and_expired() -> None:
    keys = [
        {"name": n, "tenant": "team", "sha256": hash_key(n), **extra}
        for n, extra in (
            ("a", {"revoked": True}),
            ("b", {"expiresAt": "2020-01-01T00:00:00Z"}),
            ("c", {"expiresAt": "2999-01-01T00:00:00Z"}),
        )
    ]
    verdict = judge(doc(keys=keys), HASHES, [])
    assert (verdict.key_count, verdict.active_keys, len(verdict.served)) == (3, 1, 3)


def _reconciler() -> Reconciler:
    plane = ControlPlane(GatewaySettings(), ack_timeout_s=0.01)
    return Reconciler(plane)


def test_the_first_config_has_the_keys_and_an_invalid_resource_keeps_them_required() -> None:
    reconciler = _reconciler()

    async def scenario() -> None:
        reconciler.restore_client_keys([doc()], {"team-a": HASHES})
        await reconciler.restore([])
        primed = reconciler.plane.stream.config
        assert primed.require_client_key
        assert {k.name for k in primed.client_keys} == {"team-a/alice", "team-a/bob"}
        # Broken by an edit: its keys go, authentication stays on (fail closed).
        broken = copy.deepcopy(doc())
        broken["spec"]["tenants"][0]["parent"] = "alice"
        verdict, version = await reconciler.upsert_client_keys(broken, HASHES)
        assert verdict.reason == "InvalidSpec" and "cycle" in verdict.message
        config = reconciler.plane.stream.config
        assert config.version == version and config.require_client_key
        assert not config.client_keys
        # Fixed; the Secret rotated: the new hash replaces the old.
        rotated = {("s", "token"): hash_key("sk-rotated")}
        verdict, _ = await reconciler.upsert_client_keys(doc(), rotated)
        served = {k.name: k.sha256 for k in reconciler.plane.stream.config.client_keys}
        assert verdict.ready and served["team-a/alice"] == hash_key("sk-rotated")
        await reconciler.delete_client_keys("team-a", "clients")
        assert not reconciler.plane.stream.config.require_client_key

    asyncio.run(scenario())


def test_an_unchanged_resource_publishes_nothing_new() -> None:
    reconciler = _reconciler()

    async def scenario() -> None:
        _, first = await reconciler.upsert_client_keys(doc(), HASHES)
        _, again = await reconciler.upsert_client_keys(doc(), HASHES)
        assert first == again == reconciler.config.version

    asyncio.run(scenario())


def test_secret_users_follow_the_stored_resources() -> None:
    reconciler = _reconciler()

    async def scenario() -> None:
        await reconciler.upsert_client_keys(doc(), HASHES)
        await reconciler.upsert_client_keys(doc("other", "team-b", keys=[]), {})
        assert reconciler.secret_users("team-a", "s") == ["team-a/clients"]
        assert reconciler.secret_users("team-b", "s") == []
        assert reconciler.secret_users("team-a", "unrelated") == []
        await reconciler.delete_client_keys("team-a", "clients")
        assert reconciler.secret_users("team-a", "s") == []

    asyncio.run(scenario())


def test_local_mode_refuses_a_secret_ref_it_cannot_read() -> None:
    spec = parse_client_keys(doc(), "keys.yaml")
    with pytest.raises(PolicyError, match="key 'alice': secretRef is read by the Kubernetes"):
        compile_client_keys([spec])
    both = doc(keys=[{"name": "k", "tenant": "team", "sha256": hash_key("x"),
                      "secretRef": {"name": "s", "key": "k"}}])  # fmt: skip
    with pytest.raises(PolicyError, match="exactly one of sha256 or secretRef"):
        parse_client_keys(both, "keys.yaml")
