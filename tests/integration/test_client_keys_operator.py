"""ClientKeys resources on a real kube-apiserver, served by the operator process to a real Envoy
and ext_proc: the CRD's CEL rules and printer columns, keys from Secrets (hashed; only the hash
reaches the RoutingConfig), rotation of a Secret or of the resource live within a second (the
official ``openai`` client), an invalid or conflicting resource reported on its own status and
left out alone, fail closed with keys on, and a restarted operator that never serves without
them."""

from __future__ import annotations

import base64
import functools
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import kubernetes
import openai
import pytest
import yaml
from gateway_harness import REPO
from kube import KubeControlPlane
from operator_harness import SHORT, Cluster

from switchyard.api.v1 import config_stream_pb2 as cs
from switchyard.api.v1 import config_stream_pb2_grpc as cs_grpc
from switchyard.api.v1 import routing_pb2 as pb
from switchyard.local.runner import port_open, wait_until
from switchyard.operator.clientkeys import hash_key

CRD = REPO / "deploy" / "crds" / "clientkeys.yaml"
HI = [{"role": "user", "content": "hi"}]
ALICE = "sk-switchyard-alice-" + os.urandom(6).hex()
ALICE_ROTATED = "sk-switchyard-alice-rotated-" + os.urandom(6).hex()
BOB = "sk-switchyard-bob-" + os.urandom(6).hex()
BOB_ROTATED = "sk-switchyard-bob-rotated-" + os.urandom(6).hex()
CAROL = "sk-switchyard-carol-" + os.urandom(6).hex()
MALLORY = "sk-switchyard-mallory-" + os.urandom(6).hex()
ERIN = "sk-switchyard-erin-" + os.urandom(6).hex()
PLAIN_KEYS = (ALICE, ALICE_ROTATED, BOB, BOB_ROTATED, CAROL, MALLORY, ERIN)


@pytest.fixture(scope="module")
def clientkeys_crd(routepolicy_crd: KubeControlPlane) -> KubeControlPlane:
    routepolicy_crd.kubectl("apply", "-f", str(CRD))
    routepolicy_crd.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/clientkeys.switchyard.dev"
    )
    return routepolicy_crd


@pytest.fixture(scope="module")
def cluster(clientkeys_crd: KubeControlPlane) -> Iterator[Cluster]:
    running = Cluster(clientkeys_crd, prefix="ck", operator_args=["--fail-open-model", "light"])
    yield running
    running.close()


@pytest.fixture(scope="module")
def core(clientkeys_crd: KubeControlPlane) -> kubernetes.client.CoreV1Api:
    """A direct API client: rotation is timed from the API server's answer, not kubectl's."""
    config = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=str(clientkeys_crd.kubeconfig_path), client_configuration=config
    )
    return kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(config))


def keys_doc(name: str, namespace: str, keys: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "switchyard.dev/v1alpha1",
        "kind": "ClientKeys",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"tenants": [{"name": "team"}, {"name": "alice", "parent": "team"}], **spec,
                 "keys": keys},
    }  # fmt: skip


def clients_doc(namespace: str, bob: str = BOB) -> dict[str, Any]:
    return keys_doc(
        "clients",
        namespace,
        [
            {
                "name": "alice",
                "tenant": "alice",
                "secretRef": {"name": "alice-key", "key": "token"},
            },
            {"name": "bob", "tenant": "team", "sha256": hash_key(bob)},
        ],
    )


def secret(name: str, value: str) -> dict[str, Any]:
    # A trailing newline, as `kubectl create secret --from-file` leaves it: stripped.
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
            "stringData": {"token": value + "\n"}}  # fmt: skip


def apply(kube: KubeControlPlane, namespace: str, doc: dict[str, Any]) -> tuple[bool, str]:
    out = kube.kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(doc), check=False)
    return ("created" in out or "configured" in out or "unchanged" in out), out


def ready(cluster: Cluster, name: str) -> dict[str, Any]:
    out = cluster.kube.kubectl("get", "clientkeys", name, "-n", cluster.namespace, "-o", "json")
    status = json.loads(out).get("status", {})
    found = [c for c in status.get("conditions", []) if c["type"] == "Ready"]
    return {**status, **(found[0] if found else {})}


def status_code(cluster: Cluster, key: str | None) -> int:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    url = f"http://127.0.0.1:{cluster.port}/v1/chat/completions"
    return httpx.post(url, json=SHORT, headers=headers, timeout=10).status_code


def openai_client(cluster: Cluster, key: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{cluster.port}/v1", api_key=key, max_retries=0, timeout=10
    )


def served_config(cluster: Cluster) -> pb.RoutingConfig:
    """The RoutingConfig the operator serves now, read from its config stream as an observer
    (no node name, never ACKs, so it delays no apply)."""
    with grpc.insecure_channel(f"127.0.0.1:{cluster.xds}") as channel:
        stream = cs_grpc.ConfigStreamStub(channel).Subscribe(iter([cs.ConfigAck()]), timeout=10)
        return next(iter(stream))


def test_crd_validates_and_prints_columns(clientkeys_crd: KubeControlPlane, namespace: str) -> None:
    good = {"name": "k", "tenant": "team", "sha256": hash_key("x")}
    invalid = [
        ([{**good, "tenant": "ghost"}], {}, "spec.keys"),
        ([{**good, "secretRef": {"name": "s", "key": "k"}}], {}, "exactly one of sha256"),
        ([{"name": "k", "tenant": "team"}], {}, "exactly one of sha256"),
        ([{**good, "sha256": "not-a-hash"}], {}, "spec.keys[0].sha256"),
        ([good, good], {}, "Duplicate value"),
        ([good], {"tenants": [{"name": "team", "parent": "team"}]}, "spec.tenants[0].parent"),
        ([good], {"tenants": [{"name": "team", "parent": "ghost"}]}, "spec.tenants"),
        ([{**good, "models": ["m"] * 65}], {}, "spec.keys[0].models"),
        ([{**good, "limits": {"budgets": [{"usd": 1, "period": "week"}]}}], {},
         "spec.keys[0].limits.budgets[0].period"),
        ([{**good, "limits": {"requestsPerMinute": 0}}], {},
         "spec.keys[0].limits.requestsPerMinute"),
        ([good], {"store": {"onUnavailable": "maybe"}}, "spec.store.onUnavailable"),
    ]  # fmt: skip
    for keys, spec, message in invalid:
        accepted, out = apply(clientkeys_crd, namespace, keys_doc("bad", namespace, keys, **spec))
        assert not accepted and message in out, (keys, spec, out)
    accepted, out = apply(clientkeys_crd, namespace, keys_doc("good", namespace, [good]))
    assert accepted, out
    limited = {**good, "name": "l", "sha256": hash_key("y"), "limits": {"requestsPerMinute": 5}}
    limits = {
        "budgets": [{"usd": 10, "period": "month"}, {"usd": 1, "period": "24h"}],
        "tokensPerMinute": 1000,
        "perModel": {"light": {"requestsPerMinute": 2}},
    }
    accepted, out = apply(
        clientkeys_crd,
        namespace,
        keys_doc(
            "limited",
            namespace,
            [limited],
            tenants=[{"name": "team", "limits": limits}],
            store={"redisUrl": "redis://redis:6379/0", "onUnavailable": "closed"},
        ),
    )
    assert accepted, out
    crd = json.loads(
        clientkeys_crd.kubectl("get", "crd", "clientkeys.switchyard.dev", "-o", "json")
    )
    columns = {
        c["name"]: c["jsonPath"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]
    }
    assert columns["Tenants"] == ".status.tenantCount"
    assert columns["Active"] == ".status.activeKeys"
    assert columns["Spent USD"] == ".status.spentUsd"
    header = clientkeys_crd.kubectl("get", "clientkeys", "-n", namespace).splitlines()[0].split()
    assert header[:5] == ["NAME", "READY", "TENANTS", "KEYS", "ACTIVE"]
    assert "BUDGET" in header and "SPENT" in header


def test_keys_from_a_secret_and_a_hash_authenticate(cluster: Cluster) -> None:
    cluster.apply(cluster.policy)
    wait_until(lambda: cluster.condition("assistant").get("status") == "True", 60, "policy Ready")
    wait_until(lambda: port_open("127.0.0.1", cluster.port), 30, "gateway listener")
    wait_until(lambda: status_code(cluster, None) == 200, 30, "served without keys")
    assert not served_config(cluster).require_client_key
    ns = cluster.namespace
    apply(cluster.kube, ns, secret("alice-key", ALICE))
    accepted, out = apply(cluster.kube, ns, clients_doc(ns))
    assert accepted, out
    wait_until(lambda: ready(cluster, "clients").get("status") == "True", 30, "ClientKeys Ready")
    status = ready(cluster, "clients")
    assert (status["tenantCount"], status["keyCount"], status["activeKeys"]) == (2, 2, 2)
    printed = cluster.kube.kubectl("get", "clientkeys", "-n", ns).splitlines()[1].split()
    assert printed[:5] == ["clients", "True", "2", "2", "2"]
    wait_until(lambda: status_code(cluster, None) == 401, 10, "keys required")
    with pytest.raises(openai.AuthenticationError):
        openai_client(cluster, "sk-switchyard-unknown").chat.completions.create(
            model="auto", messages=HI
        )
    for key in (ALICE, BOB):
        reply = openai_client(cluster, key).chat.completions.create(model="auto", messages=HI)
        assert reply.choices[0].message.content
    config = served_config(cluster)
    assert config.require_client_key
    keys = {k.name: k for k in config.client_keys}
    assert set(keys) == {f"{ns}/alice", f"{ns}/bob"}
    assert keys[f"{ns}/alice"].sha256 == hash_key(ALICE)
    assert list(keys[f"{ns}/alice"].tenants) == [f"{ns}/alice", f"{ns}/team"]
    assert ALICE.encode() not in config.SerializeToString()


def _rotate(check: Callable[[], tuple[bool, bool]], change: Callable[[], None], what: str) -> float:
    """Seconds from ``change`` returning until the old key is refused and the new accepted,
    as the openai client sees it."""
    change()
    changed = time.monotonic()
    while check() != (False, True):
        assert time.monotonic() - changed < 1.0, f"{what}: not live within 1 s"
    return time.monotonic() - changed


def _both(cluster: Cluster, old: str, new: str) -> tuple[bool, bool]:
    return _works(cluster, old), _works(cluster, new)


def _child(cluster: Cluster, command: str) -> subprocess.Popen[bytes]:
    """The harness's process running ``switchyard <command>``."""
    return next(c for c in cluster.children if command in [str(a) for a in c.args])  # type: ignore[union-attr]


def _works(cluster: Cluster, key: str) -> bool:
    try:
        openai_client(cluster, key).chat.completions.create(model="auto", messages=HI)
    except openai.AuthenticationError:
        return False
    return True


def test_rotation_of_a_secret_or_the_resource_is_live_within_a_second(
    cluster: Cluster, core: kubernetes.client.CoreV1Api
) -> None:
    """Five rotations each way (old ⇄ new, ending on the new key)."""
    ns = cluster.namespace
    custom = kubernetes.client.CustomObjectsApi(core.api_client)
    group = ("switchyard.dev", "v1alpha1", ns, "clientkeys", "clients")

    def put_secret(value: str) -> None:
        data = {"token": base64.b64encode(value.encode()).decode()}
        core.patch_namespaced_secret("alice-key", ns, {"data": data})

    def put_resource(bob: str) -> None:
        current = custom.get_namespaced_custom_object(*group)
        custom.replace_namespaced_custom_object(
            *group, {**clients_doc(ns, bob=bob), "metadata": current["metadata"]}
        )

    timings: dict[str, list[float]] = {"Secret": [], "resource": []}
    for what, put, keys in (
        ("Secret", put_secret, [ALICE, ALICE_ROTATED]),
        ("resource", put_resource, [BOB, BOB_ROTATED]),
    ):
        for turn in range(5):
            old, new = keys[turn % 2], keys[(turn + 1) % 2]
            seconds = _rotate(
                functools.partial(_both, cluster, old, new),
                functools.partial(put, new),
                f"{what} rotation {turn}",
            )
            timings[what].append(seconds)
    print("rotation live after (s):", {k: [round(t, 3) for t in v] for k, v in timings.items()})


def test_invalid_or_conflicting_resources_are_reported_and_left_out_alone(
    cluster: Cluster,
) -> None:
    ns = cluster.namespace
    # Passes CEL (both parents exist), not the operator: a cycle.
    cyclic = keys_doc("cyclic", ns, [{"name": "m", "tenant": "a", "sha256": hash_key(MALLORY)}])
    cyclic["spec"]["tenants"] = [{"name": "a", "parent": "b"}, {"name": "b", "parent": "a"}]
    assert apply(cluster.kube, ns, cyclic)[0]
    wait_until(lambda: ready(cluster, "cyclic").get("reason") == "InvalidSpec", 30, "reported")
    assert "spec.tenants[0].parent" in ready(cluster, "cyclic")["message"]
    assert "cycle" in ready(cluster, "cyclic")["message"]
    assert ready(cluster, "cyclic")["status"] == "False"
    # The same key as another resource's: this one is left out, the first keeps serving.
    first = keys_doc("first", ns, [{"name": "erin", "tenant": "early", "sha256": hash_key(ERIN)}])
    first["spec"]["tenants"] = [{"name": "early"}]
    assert apply(cluster.kube, ns, first)[0]
    wait_until(lambda: ready(cluster, "first").get("status") == "True", 30, "first Ready")
    copycat = keys_doc(
        "copycat", ns, [{"name": "carol", "tenant": "guests", "sha256": hash_key(ERIN)}]
    )
    copycat["spec"]["tenants"] = [{"name": "guests"}]
    assert apply(cluster.kube, ns, copycat)[0]
    wait_until(lambda: ready(cluster, "copycat").get("reason") == "Conflict", 30, "conflict")
    message = ready(cluster, "copycat")["message"]
    assert "spec.keys[0]" in message and f"ClientKeys {ns}/first" in message
    assert not _works(cluster, MALLORY)
    assert _works(cluster, ERIN)
    assert _works(cluster, BOB_ROTATED) and _works(cluster, ALICE_ROTATED)
    assert ready(cluster, "clients")["status"] == "True"
    events = cluster.kube.kubectl("get", "events", "-n", ns)
    assert "InvalidSpec" in events and "Conflict" in events
    # The first one goes: the one it kept out is judged again and served.
    cluster.kube.kubectl("delete", "clientkeys", "first", "-n", ns)
    wait_until(lambda: ready(cluster, "copycat").get("status") == "True", 10, "copycat served")
    assert _works(cluster, ERIN)
    assert {k.name for k in served_config(cluster).client_keys} >= {f"{ns}/carol"}
    cluster.kube.kubectl("delete", "clientkeys", "cyclic", "copycat", "-n", ns)


def test_a_missing_secret_leaves_out_that_key_until_it_exists(cluster: Cluster) -> None:
    ns = cluster.namespace
    late = keys_doc("late", ns, [
        {"name": "carol", "tenant": "guests", "secretRef": {"name": "carol-key", "key": "token"}},
        {"name": "dave", "tenant": "guests", "sha256": hash_key(MALLORY), "revoked": True},
    ])  # fmt: skip
    late["spec"]["tenants"] = [{"name": "guests"}]
    assert apply(cluster.kube, ns, late)[0]
    wait_until(lambda: ready(cluster, "late").get("reason") == "SecretMissing", 30, "missing")
    assert "spec.keys[0].secretRef" in ready(cluster, "late")["message"]
    assert not _works(cluster, CAROL)
    apply(cluster.kube, ns, secret("carol-key", CAROL))
    wait_until(lambda: ready(cluster, "late").get("status") == "True", 10, "Secret created")
    assert ready(cluster, "late")["activeKeys"] == 1  # dave is revoked
    assert _works(cluster, CAROL) and not _works(cluster, MALLORY)


def test_deleting_the_secret_or_the_resources(cluster: Cluster) -> None:
    ns = cluster.namespace
    cluster.kube.kubectl("delete", "secret", "carol-key", "-n", ns)
    wait_until(lambda: not _works(cluster, CAROL), 10, "Secret deleted")
    assert ready(cluster, "late")["reason"] == "SecretMissing"
    cluster.kube.kubectl("delete", "clientkeys", "late", "-n", ns)
    assert _works(cluster, BOB_ROTATED) and status_code(cluster, None) == 401
    cluster.kube.kubectl("delete", "clientkeys", "clients", "-n", ns)
    wait_until(lambda: status_code(cluster, None) == 200, 10, "keys off with the last one")
    assert not served_config(cluster).require_client_key


def test_the_key_text_is_never_in_status_events_or_logs(cluster: Cluster) -> None:
    ns = cluster.namespace
    shown = cluster.kube.kubectl("get", "clientkeys,events", "-n", ns, "-o", "yaml")
    cluster.log.flush()
    logged = Path(cluster.log.name).read_text()
    for key in PLAIN_KEYS:
        assert key not in shown and key not in logged


def test_restarted_operator_never_serves_without_keys(cluster: Cluster) -> None:
    ns = cluster.namespace
    apply(cluster.kube, ns, clients_doc(ns))
    wait_until(lambda: status_code(cluster, None) == 401, 30, "keys on")
    operator = _child(cluster, "operator")
    operator.terminate()
    operator.wait(timeout=30)
    env = {**os.environ, "KUBECONFIG": str(cluster.kube.kubeconfig_path)}
    restarted = subprocess.Popen(
        operator.args, cwd=REPO, env=env, stdout=cluster.log, stderr=subprocess.STDOUT
    )
    cluster.children.append(restarted)
    deadline = time.monotonic() + 30
    while not served_config_or_none(cluster):
        assert time.monotonic() < deadline, "restarted operator serves no config"
        assert status_code(cluster, None) == 401
    # From its first config on, through its reconciles: keys on.
    until = time.monotonic() + 3
    while time.monotonic() < until:
        assert status_code(cluster, None) == 401
    config = served_config(cluster)
    assert config.require_client_key and {k.name for k in config.client_keys} == {
        f"{ns}/alice",
        f"{ns}/bob",
    }


def served_config_or_none(cluster: Cluster) -> pb.RoutingConfig | None:
    if not port_open("127.0.0.1", cluster.xds):
        return None
    try:
        return served_config(cluster)
    except (grpc.RpcError, StopIteration):
        return None


def test_with_keys_on_the_gateway_fails_closed_not_open(cluster: Cluster) -> None:
    """failOpenModel serves when the ext_proc is down, but not while keys are required:
    without the ext_proc no key can be checked."""
    ns = cluster.namespace
    extproc = _child(cluster, "extproc")
    extproc.terminate()
    extproc.wait(timeout=30)
    for key in (None, BOB):
        reply = httpx.post(
            f"http://127.0.0.1:{cluster.port}/v1/chat/completions",
            json=SHORT,
            headers={"authorization": f"Bearer {key}"} if key else {},
            timeout=10,
        )
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "router_unavailable"
    # Without client keys the same gateway fails open to the configured model.
    cluster.kube.kubectl("delete", "clientkeys", "clients", "-n", ns)
    wait_until(lambda: cluster.post().status_code == 200, 30, "fail-open without keys")
    assert cluster.post().headers["x-switchyard-reason"] == "fail-open: router unavailable"
