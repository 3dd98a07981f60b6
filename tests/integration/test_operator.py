"""The kopf operator against a real kube-apiserver, programming a real Envoy over ADS and a real
ext_proc over the config stream: kubectl apply → Ready → traffic routed as the policy says."""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import StartPrometheus
from kube import KubeControlPlane
from operator_harness import Cluster

from switchyard.local.ports import free_port_block
from switchyard.local.runner import port_open, wait_until


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port_block()


@pytest.fixture(scope="module")
def cluster(routepolicy_crd: KubeControlPlane, metrics_port: int) -> Iterator[Cluster]:
    running = Cluster(routepolicy_crd, operator_args=[f"--metrics-listen=127.0.0.1:{metrics_port}"])
    yield running
    running.close()


def test_applied_policy_becomes_ready_and_routes(cluster: Cluster) -> None:
    cluster.apply(cluster.policy)
    wait_until(lambda: cluster.condition("assistant").get("status") == "True", 60, "Ready")
    status = cluster.status()
    assert status["observedGeneration"] == 1
    assert status["modelCount"] == 3
    assert cluster.condition("assistant", "Degraded")["status"] == "False"
    wait_until(lambda: port_open("127.0.0.1", cluster.port), 30, "gateway listener")
    wait_until(lambda: cluster.model() == "light", 30, "routing")
    printed = cluster.kube.kubectl("get", "rp", "-n", cluster.namespace)
    assert "True" in printed and "classifier" in printed


def test_prometheus_scrapes_the_operators_metrics(
    cluster: Cluster, metrics_port: int, prometheus: StartPrometheus
) -> None:
    # Right after the first test: the policy was created once and is Ready.
    prom = prometheus({"operator": [f"127.0.0.1:{metrics_port}"]})
    prom.wait_scraped("operator", time.time())
    assert prom.value('switchyard_operator_policies{state="ready"}') == 1
    assert prom.value('switchyard_operator_policies{state="not_ready"}') == 0
    assert prom.value("sum(switchyard_operator_reconcile_errors_total)") is None
    # restored at start-up (nothing yet), then the policy's create: two configs
    assert prom.value("switchyard_operator_config_generation") == 2
    assert prom.value('switchyard_operator_config_applies_total{result="acked"}') == 1
    assert prom.value('switchyard_operator_connected_clients{kind="envoy"}') == 1
    assert prom.value('switchyard_operator_connected_clients{kind="extproc"}') == 1
    assert prom.value("sum(switchyard_operator_clients_behind)") == 0
    acks = prom.query('switchyard_operator_xds_responses_total{client="gateway-0",result="ack"}')
    assert {s.labels["type_url"].rsplit(".", 1)[-1] for s in acks} >= {
        "Cluster", "Listener", "RouteConfiguration"
    }  # fmt: skip
    assert all(s.value >= 1 for s in acks)


def test_hpa_and_pdb_follow_the_policy(cluster: Cluster) -> None:
    scaled = copy.deepcopy(cluster.policy)
    scaled["spec"]["autoscaling"] = {
        "minReplicas": 3,
        "maxReplicas": 7,
        "targetCPUUtilization": 60,
        "targetRequestsPerSecond": 400,
    }
    cluster.apply(scaled)

    def hpas() -> dict[str, Any]:
        out = cluster.kube.kubectl("get", "hpa", "-n", cluster.namespace, "-o", "json")
        return {h["metadata"]["name"]: h["spec"] for h in json.loads(out)["items"]}

    wait_until(lambda: hpas().get("switchyard-gateway", {}).get("minReplicas") == 3, 30, "hpa")
    for name in ("switchyard-gateway", "switchyard-extproc"):
        spec = hpas()[name]
        assert (spec["minReplicas"], spec["maxReplicas"]) == (3, 7)
        assert spec["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": name,
        }
        cpu, rps = spec["metrics"]
        assert cpu["resource"]["target"]["averageUtilization"] == 60
        assert rps["pods"]["metric"]["name"] == "switchyard_requests_per_second"
        assert rps["pods"]["target"]["averageValue"] == "400"
        pdb = json.loads(
            cluster.kube.kubectl("get", "pdb", name, "-n", cluster.namespace, "-o", "json")
        )
        assert pdb["spec"]["minAvailable"] == 2
        assert pdb["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": name}
    cluster.apply(cluster.policy)
    wait_until(lambda: hpas()["switchyard-gateway"]["minReplicas"] == 2, 30, "defaults back")


def test_edit_reroutes(cluster: Cluster) -> None:
    # How fast is measured by `make bench-control-plane`; here only that it happens.
    edited = copy.deepcopy(cluster.policy)
    edited["spec"]["strategy"] = {"type": "rules", "default": "capable"}
    cluster.apply(edited)
    wait_until(lambda: cluster.model() == "capable", 10, "rerouted")
    assert cluster.status()["observedGeneration"] >= 2
    cluster.apply(cluster.policy)
    wait_until(lambda: cluster.model() == "light", 10, "restored")


def test_invalid_edit_is_reported_and_last_good_keeps_serving(cluster: Cluster) -> None:
    broken = copy.deepcopy(cluster.policy)
    # Passes the CRD (CEL cannot compare neighbouring tiers) but not the operator's validation.
    broken["spec"]["strategy"]["tiers"][1]["maxDifficulty"] = 0.1
    cluster.apply(broken)
    wait_until(lambda: cluster.condition("assistant").get("reason") == "InvalidSpec", 30, "report")
    assert "maxDifficulty must increase" in cluster.condition("assistant")["message"]
    assert cluster.condition("assistant", "Degraded")["reason"] == "ServingLastGood"
    events = cluster.kube.kubectl("get", "events", "-n", cluster.namespace)
    assert "InvalidSpec" in events
    assert cluster.model() == "light"
    cluster.apply(cluster.policy)
    wait_until(lambda: cluster.condition("assistant").get("status") == "True", 30, "recovered")


def _slice(name: str, addresses: list[str]) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": name, "labels": {"kubernetes.io/service-name": "vllm"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}],
            "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses],
        }
    )


def test_service_backend_follows_its_endpoint_slices(cluster: Cluster) -> None:
    # Documentation addresses (TEST-NET-1): programmed into Envoy, never contacted.
    ns = ["-n", cluster.namespace]
    cluster.kube.kubectl(
        "apply", *ns, "-f", "-", stdin=_slice("vllm-a", ["192.0.2.10", "192.0.2.11"])
    )
    in_house = copy.deepcopy(cluster.policy)
    in_house["spec"]["models"].append(
        {
            "name": "in-house",
            "backend": {"service": {"name": "vllm", "port": 8000}},
            "upstreamModel": "meta-llama/Llama-3.1-8B-Instruct",
            "pricing": {"inputPer1M": 0.02, "outputPer1M": 0.02},
        }
    )
    cluster.apply(in_house)

    def members() -> set[str]:
        clusters = httpx.get(f"http://127.0.0.1:{cluster.admin}/clusters").text
        prefix = f"{cluster.namespace}.assistant.in-house::"
        return {
            line.split("::")[1]
            for line in clusters.splitlines()
            if line.startswith(prefix) and line.endswith("::cx_active::0")
        }

    wait_until(lambda: members() == {"192.0.2.10:8000", "192.0.2.11:8000"}, 30, "slice endpoints")

    def counted() -> dict[str, Any]:
        models = cluster.status().get("models", [])
        return next((m for m in models if m["name"] == "in-house"), {})

    wait_until(lambda: counted().get("endpoints") == 2, 30, "status")
    assert counted()["clusters"] == {"local": 2}
    cluster.kube.kubectl("apply", *ns, "-f", "-", stdin=_slice("vllm-a", ["192.0.2.12"]))
    wait_until(lambda: members() == {"192.0.2.12:8000"}, 30, "slice change")
    # The status follows the slices without any edit of the policy.
    wait_until(lambda: counted().get("endpoints") == 1, 30, "status follows the slice")
    cluster.kube.kubectl("delete", "endpointslice", "vllm-a", *ns)
    cluster.apply(cluster.policy)
    wait_until(lambda: cluster.model() == "light", 30, "back to the plain policy")


def test_api_key_from_a_secret_reaches_only_the_upstream(cluster: Cluster) -> None:
    key = "sk-test-" + os.urandom(8).hex()
    ns = ["-n", cluster.namespace]
    cluster.kube.kubectl(
        "create", "secret", "generic", "provider", f"--from-literal=token={key}", *ns
    )
    keyed = copy.deepcopy(cluster.policy)
    keyed["spec"]["models"][0]["backend"]["apiKeySecret"] = {"name": "provider", "key": "token"}
    cluster.apply(keyed)

    def upstream_auth() -> str:
        cluster.post()
        port = cluster.demo_ports["demo-light"]
        seen = httpx.get(f"http://127.0.0.1:{port}/_demo/last_request").json()
        return str({k.lower(): v for k, v in seen["headers"].items()}.get("authorization", ""))

    wait_until(lambda: upstream_auth() == f"Bearer {key}", 30, "key injected upstream")
    assert key not in cluster.kube.kubectl("get", "rp", "assistant", *ns, "-o", "yaml")
    assert key not in cluster.kube.kubectl("get", "events", *ns, "-o", "yaml")
    cluster.log.flush()
    assert key not in Path(cluster.log.name).read_text()
    # Rotating the Secret reaches the upstream with no edit of the policy.
    rotated = "sk-rotated-" + os.urandom(8).hex()
    secret = cluster.kube.kubectl(
        "create", "secret", "generic", "provider", f"--from-literal=token={rotated}",
        "--dry-run=client", "-o", "yaml", *ns,
    )  # fmt: skip
    cluster.kube.kubectl("apply", *ns, "-f", "-", stdin=secret)
    wait_until(lambda: upstream_auth() == f"Bearer {rotated}", 30, "rotated key upstream")
    cluster.log.flush()
    assert rotated not in Path(cluster.log.name).read_text()
    cluster.apply(cluster.policy)
    wait_until(lambda: upstream_auth() == "", 30, "key removed with the reference")


def test_config_envoy_rejects_is_reported_and_nothing_changes(cluster: Cluster) -> None:
    # Valid to the schema, but not an IP address Envoy accepts for a STATIC cluster.
    rejected = copy.deepcopy(cluster.policy)
    rejected["spec"]["models"][1]["backend"] = {"url": "http://999.1.1.1:8000"}
    rejected["spec"]["strategy"] = {"type": "rules", "default": "standard"}
    cluster.apply(rejected)
    wait_until(lambda: cluster.condition("assistant").get("reason") == "EnvoyRejected", 30, "nack")
    assert "malformed IP address" in cluster.condition("assistant")["message"]
    assert cluster.condition("assistant", "Degraded")["reason"] == "ServingLastGood"
    assert cluster.model() == "light"  # the last good config, in Envoy and ext_proc alike
    cluster.apply(cluster.policy)
    wait_until(lambda: cluster.condition("assistant").get("status") == "True", 30, "recovered")


def test_delete_removes_routes(cluster: Cluster) -> None:
    cluster.kube.kubectl("delete", "rp", "assistant", "-n", cluster.namespace, "--wait=true")
    wait_until(lambda: cluster.post().status_code == 404, 30, "routes removed")
    assert cluster.post().json()["error"]["code"] == "model_not_found"
