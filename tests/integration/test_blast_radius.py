"""One bad RoutePolicy among good ones, with real parts: a kube-apiserver, the operator
process, Envoy on its ADS, an ext_proc on its config stream and demo upstreams.

What the operator can check is refused before anything is compiled (by the CRD's CEL rules, or
on the policy's status); a router bundle path that does not exist on the ext_proc is only found
there, and leaves out that one policy. The claim measured: a good policy's request is never
answered 404 or ``policy_unavailable``, whether the policy was applied before or after the bad
one; every request is 200 except while the ext_proc process is down for its restart (from
SIGTERM until the new process serves again), when Envoy answers the documented fail-closed 503
``router_unavailable``. The restarted ext_proc serves every good policy again at once.
"""

from __future__ import annotations

import copy
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from gateway_harness import DEMO_NAMES, REPO, Gateway, policy_for_ports, start_gateway
from kube import KubeControlPlane
from operator_harness import Cluster

from switchyard.local.ports import free_port_block
from switchyard.local.runner import port_open, wait_until

MISSING_BUNDLE = "/nonexistent/switchyard-bundles/router-v9"


@dataclass(frozen=True)
class Sent:
    alias: str
    started: float
    ended: float
    status: int
    code: str


@pytest.fixture(scope="module")
def cluster(routepolicy_crd: KubeControlPlane) -> Iterator[Cluster]:
    running = Cluster(routepolicy_crd, prefix="br")
    yield running
    running.close()


def _policy(cluster: Cluster, name: str, alias: str, bundle: str = "") -> dict[str, Any]:
    policy = copy.deepcopy(cluster.policy)
    policy["metadata"] = {"name": name, "namespace": cluster.namespace}
    policy["spec"]["match"]["models"] = [alias]
    if bundle:
        policy["spec"]["strategy"]["router"] = {"bundle": bundle}
    return policy


def _post(client: httpx.Client, port: int, alias: str) -> Sent:
    body = {"model": alias, "messages": [{"role": "user", "content": "Say hello."}]}
    started = time.monotonic()
    try:
        response = client.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body)
    except httpx.TransportError as error:
        return Sent(alias, started, time.monotonic(), 0, type(error).__name__)
    code = "" if response.status_code == 200 else response.json()["error"]["code"]
    return Sent(alias, started, time.monotonic(), response.status_code, code)


class Traffic:
    """Requests for the given aliases in turn, from a thread, until stopped."""

    def __init__(self, port: int, aliases: list[str]) -> None:
        self.port = port
        self.aliases = aliases
        self.sent: list[Sent] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                for alias in list(self.aliases):
                    self.sent.append(_post(client, self.port, alias))

    def count(self, alias: str) -> int:
        return sum(1 for s in self.sent if s.alias == alias)

    def stop(self) -> list[Sent]:
        self._stop.set()
        self._thread.join()
        return self.sent


def _restart_extproc(cluster: Cluster) -> tuple[float, subprocess.Popen[bytes]]:
    """Stop the ext_proc process and start it again with the same arguments."""
    old = next(c for c in cluster.children if isinstance(c.args, list) and "extproc" in c.args)
    stopped = time.monotonic()
    old.terminate()
    old.wait(timeout=20)
    new = subprocess.Popen(old.args, cwd=REPO)
    cluster.children.append(new)
    return stopped, new


def _events(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    out = cluster.kube.kubectl(
        "get", "events", "-n", cluster.namespace,
        "--field-selector", f"involvedObject.name={name}", "-o", "json",
    )  # fmt: skip
    return list(json.loads(out)["items"])


def test_checks_the_operator_can_make_are_refused_before_compiling(cluster: Cluster) -> None:
    unknown = _policy(cluster, "unknown-builtin", "unknown", "builtin:nope")
    refused = cluster.kube.kubectl("apply", "-f", "-", stdin=json.dumps(unknown), check=False)
    assert "spec.strategy.router.bundle" in refused and "builtin:default" in refused
    relative = _policy(cluster, "relative", "relative", "bundles/mine")
    refused = cluster.kube.kubectl("apply", "-f", "-", stdin=json.dumps(relative), check=False)
    assert "spec.strategy.router.bundle" in refused and "absolute" in refused

    bad_header = _policy(cluster, "bad-header", "bad-header")
    bad_header["spec"]["match"]["headers"] = {"x tenant": "acme"}
    refused = cluster.kube.kubectl("apply", "-f", "-", stdin=json.dumps(bad_header), check=False)
    assert "spec.match.headers" in refused and "HTTP tokens" in refused

    # what CEL cannot check (an alias another policy answers) is on the policy's status, and
    # an Event
    cluster.apply(_policy(cluster, "first", "shared"))
    wait_until(lambda: cluster.condition("first").get("status") == "True", 60, "first Ready")
    cluster.apply(_policy(cluster, "second", "shared"))
    wait_until(lambda: cluster.condition("second").get("status") == "False", 60, "status")
    ready = cluster.condition("second")
    assert ready["reason"] == "AliasConflict"
    assert ready["message"].startswith("spec.match.models[0]: alias 'shared' is already answered")
    wait_until(lambda: bool(_events(cluster, "second")), 30, "event")
    assert _events(cluster, "second")[0]["reason"] == "AliasConflict"


def test_a_policy_the_ext_proc_cannot_load_stops_only_itself(cluster: Cluster) -> None:
    cluster.apply(_policy(cluster, "alpha", "alpha"))
    wait_until(lambda: cluster.condition("alpha").get("status") == "True", 60, "alpha Ready")
    wait_until(lambda: port_open("127.0.0.1", cluster.port), 30, "gateway listener")
    traffic = Traffic(cluster.port, ["alpha"])
    try:
        wait_until(lambda: traffic.count("alpha") >= 10, 30, "alpha traffic")

        cluster.apply(_policy(cluster, "broken", "broken", MISSING_BUNDLE))
        wait_until(lambda: cluster.condition("broken").get("status") == "False", 60, "rejected")
        ready = cluster.condition("broken")
        assert ready["reason"] == "DataPlaneRejected"
        assert "ext_proc" in ready["message"] and MISSING_BUNDLE in ready["message"]
        assert "spec.strategy.router.bundle" in ready["message"]
        assert cluster.condition("broken", "Degraded")["reason"] == "NotServing"
        wait_until(lambda: bool(_events(cluster, "broken")), 30, "event")
        event = _events(cluster, "broken")[0]
        assert event["reason"] == "DataPlaneRejected" and MISSING_BUNDLE in event["message"]

        # applied after the broken one: served at once (this used to be a 404)
        cluster.apply(_policy(cluster, "beta", "beta"))
        wait_until(lambda: cluster.condition("beta").get("status") == "True", 60, "beta Ready")
        traffic.aliases.append("beta")
        wait_until(lambda: traffic.count("beta") >= 10, 30, "beta traffic")

        stopped, new = _restart_extproc(cluster)
        before = len(traffic.sent)
        wait_until(
            lambda: any(s.status == 200 and s.started > stopped for s in traffic.sent[before:]),
            60,
            "the restarted ext_proc serving",
        )
        back = min(s.ended for s in traffic.sent if s.started > stopped and s.status == 200)
        after = len(traffic.sent)
        wait_until(lambda: len(traffic.sent) >= after + 20, 30, "requests after the restart")
    finally:
        sent = traffic.stop()

    assert new.poll() is None
    for s in sent:
        in_restart = s.ended >= stopped and s.started <= back
        allowed = {(200, "")} | ({(503, "router_unavailable")} if in_restart else set())
        assert (s.status, s.code) in allowed, s
    after_restart = [s for s in sent if s.started > back]
    assert {s.alias for s in after_restart} == {"alpha", "beta"}
    assert all(s.status == 200 for s in after_restart)

    # the restarted ext_proc's own ACK is reported on the broken policy's status
    restarted = f"ext_proc {socket.gethostname()}/{new.pid}: spec.strategy.router.bundle"
    wait_until(lambda: restarted in cluster.condition("broken")["message"], 30, "new verdict")
    assert cluster.condition("broken")["status"] == "False"

    def event_names_it() -> bool:
        return any(restarted in e["message"] for e in _events(cluster, "broken"))

    wait_until(event_names_it, 30, "an Event naming the restarted ext_proc")
    with httpx.Client(timeout=10) as client:
        answer = _post(client, cluster.port, "broken")
    # Not a 404 that looks like a typo: the ext_proc's 503 policy_unavailable reaches the
    # client as it wrote it (Envoy's local-reply mappers leave the ext_proc's answers alone).
    assert (answer.status, answer.code) == (503, "policy_unavailable")
    for name in ("alpha", "beta"):
        assert cluster.condition(name)["status"] == "True"


def _demo_ports() -> dict[str, int]:
    first = free_port_block(len(DEMO_NAMES))
    return {name: first + i for i, name in enumerate(DEMO_NAMES)}


def _write(directory: Path, ports: dict[str, int], *names: str) -> None:
    """Policies named ``names`` (each its own alias) next to the example one; "broken" names
    a router bundle path that does not exist."""
    for name in names:
        policy = policy_for_ports(ports)
        policy["metadata"]["name"] = name
        policy["spec"]["match"]["models"] = [name]
        if name == "broken":
            policy["spec"]["strategy"]["router"] = {"bundle": MISSING_BUNDLE}
        (directory / f"{name}.yaml").write_text(yaml.safe_dump(policy))


def _up(directory: Path, ports: dict[str, int]) -> Gateway:
    """`switchyard up` on the example policy and whatever else ``directory`` holds."""
    demos = [{"name": n, "port": p} for n, p in ports.items()]
    return start_gateway(directory, policy_for_ports(ports), demoUpstreams=demos)


def _status(gateway: Gateway, alias: str) -> int:
    with httpx.Client(timeout=10) as client:
        return _post(client, gateway.port, alias).status


def test_local_mode_starts_serving_the_good_policies_next_to_a_broken_one(
    tmp_path: Path,
) -> None:
    # An edit that breaks a policy restores the last good config (tests/integration/
    # test_local_reload.py); a start has none, and serves every policy that loads.
    ports = _demo_ports()
    _write(tmp_path, ports, "broken", "later")
    gateway = _up(tmp_path, ports)
    try:
        assert [_status(gateway, a) for a in ("auto", "later", "broken")] == [200, 200, 503]
    finally:
        assert gateway.stop() == 0, "".join(gateway.output)
