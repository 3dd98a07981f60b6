"""The single-node cluster itself: pods of the project's images run, a Service answers through
its ClusterIP and by name through CoreDNS (from the node's netns and from a pod), and names
outside the cluster do not resolve (nothing leaves the node)."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator

import pytest
from node import KubeNode

# Polls until the deadline (kube-proxy programs a new Service a moment after its endpoints are
# ready), then prints what it got; run inside the node's netns.
CLIENT = r"""
import json, socket, sys, time, urllib.request
url, deadline = sys.argv[1], time.monotonic() + 60
while True:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            print(json.dumps({"status": response.status, "body": json.load(response)}))
            break
    except OSError as exc:
        if time.monotonic() > deadline:
            sys.exit(f"{url}: {exc}")
        time.sleep(0.2)
"""

RESOLVE = r"""
import json, socket, sys
try:
    print(json.dumps(sorted({a[4][0] for a in socket.getaddrinfo(sys.argv[1], 80)})))
except socket.gaierror as exc:
    print(json.dumps({"error": exc.errno}))
"""


UPSTREAM_ARGS = ["demo-upstream", "--name", "light", "--port", "8000", "--host", "0.0.0.0"]


def upstream_manifest(namespace: str, image: str) -> str:
    """Two demo upstreams named 'light' behind the Service 'light' (port 80 -> 8000)."""
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "light", "namespace": namespace},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "light"}},
            "template": {
                "metadata": {"labels": {"app": "light"}},
                "spec": {
                    "containers": [
                        {
                            "name": "upstream",
                            "image": image,
                            "imagePullPolicy": "Never",
                            "args": UPSTREAM_ARGS,
                            "ports": [{"containerPort": 8000}],
                            "readinessProbe": {
                                "httpGet": {"path": "/v1/models", "port": 8000},
                                "periodSeconds": 1,
                            },
                        }
                    ]
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "light", "namespace": namespace},
        "spec": {"selector": {"app": "light"}, "ports": [{"port": 80, "targetPort": 8000}]},
    }
    return "\n---\n".join(json.dumps(doc) for doc in (deployment, service))


@pytest.fixture(scope="module")
def upstream(kube_node: KubeNode, images: dict[str, str]) -> Iterator[str]:
    """A namespace with the 'light' Deployment rolled out and both endpoints ready."""
    namespace = f"node-{uuid.uuid4().hex[:8]}"
    kube_node.kubectl("create", "namespace", namespace)
    kube_node.kubectl("apply", "-f", "-", input=upstream_manifest(namespace, images["switchyard"]))
    kube_node.wait_ready("deployment", "light", namespace, timeout=180)
    kube_node.wait_endpoints("light", 2, namespace)
    yield namespace
    kube_node.kubectl("delete", "namespace", namespace, "--wait=false")


def in_netns(kube_node: KubeNode, script: str, *args: str) -> object:
    result = kube_node.run([sys.executable, "-c", script, *args], timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_node_is_ready_with_coredns(kube_node: KubeNode, images: dict[str, str]) -> None:
    conditions = json.loads(kube_node.kubectl("get", "node", "node0", "-o", "json"))["status"]
    ready = {c["type"]: c["status"] for c in conditions["conditions"]}["Ready"]
    assert ready == "True"
    dns = kube_node.kubectl(
        "-n", "kube-system", "get", "deploy", "coredns", "-o", "jsonpath={.status.readyReplicas}"
    )
    assert dns == "1"
    assert isinstance(json.loads(kube_node.helm("list", "--all-namespaces", "-o", "json")), list)
    assert set(images) == {"pause", "busybox", "coredns", "switchyard", "envoy"}
    assert all(ref.startswith(f"localhost/{name}:") for name, ref in images.items())


def test_service_answers_on_cluster_ip_from_the_netns(kube_node: KubeNode, upstream: str) -> None:
    cluster_ip = kube_node.kubectl(
        "-n", upstream, "get", "svc", "light", "-o", "jsonpath={.spec.clusterIP}"
    )
    assert cluster_ip.startswith("10.96.")
    got = in_netns(kube_node, CLIENT, f"http://{cluster_ip}/v1/models")
    assert got == {
        "status": 200,
        "body": {
            "object": "list",
            "data": [
                {"id": "light", "object": "model", "created": 0, "owned_by": "switchyard-demo"}
            ],
        },
    }


def test_service_name_resolves_through_coredns(kube_node: KubeNode, upstream: str) -> None:
    cluster_ip = kube_node.kubectl(
        "-n", upstream, "get", "svc", "light", "-o", "jsonpath={.spec.clusterIP}"
    )
    name = f"light.{upstream}.svc.cluster.local"
    # from the netns (its resolv.conf names CoreDNS's Service) ...
    assert in_netns(kube_node, RESOLVE, name) == [cluster_ip]
    got = in_netns(kube_node, CLIENT, f"http://{name}/v1/models")
    assert isinstance(got, dict) and got["body"]["data"][0]["id"] == "light"
    # ... and nothing outside cluster.local resolves: there is no upstream DNS
    assert in_netns(kube_node, RESOLVE, "example.com") == {"error": -2}  # EAI_NONAME


def test_pod_reaches_service_by_short_name(kube_node: KubeNode, upstream: str) -> None:
    cluster_ip = kube_node.kubectl(
        "-n", upstream, "get", "svc", "light", "-o", "jsonpath={.spec.clusterIP}"
    )
    script = (
        "import json, socket, urllib.request;"
        "ip = socket.gethostbyname('light');"
        "body = json.load(urllib.request.urlopen('http://light/v1/models', timeout=10));"
        "print(json.dumps([ip, body['data'][0]['id']]))"
    )
    out = kube_node.kubectl(
        "-n", upstream, "exec", "deploy/light", "--", "python3", "-c", script, timeout=60
    )
    assert json.loads(out) == [cluster_ip, "light"]


def test_envoy_image_runs(kube_node: KubeNode, images: dict[str, str]) -> None:
    namespace = f"envoy-{uuid.uuid4().hex[:8]}"
    kube_node.kubectl("create", "namespace", namespace)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "envoy-version", "namespace": namespace},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "envoy",
                    "image": images["envoy"],
                    "imagePullPolicy": "Never",
                    "command": ["envoy"],
                    "args": ["--version"],
                }
            ],
        },
    }
    kube_node.kubectl("apply", "-f", "-", input=json.dumps(pod))
    kube_node.kubectl(
        "-n", namespace, "wait", "pod/envoy-version",
        "--for=jsonpath={.status.phase}=Succeeded", "--timeout=120s",
    )  # fmt: skip
    logs = kube_node.kubectl("-n", namespace, "logs", "envoy-version")
    assert "envoy" in logs and "version:" in logs
    exit_code = kube_node.kubectl(
        "-n", namespace, "get", "pod", "envoy-version",
        "-o", "jsonpath={.status.containerStatuses[0].state.terminated.exitCode}",
    )  # fmt: skip
    assert exit_code == "0"
    kube_node.kubectl("delete", "namespace", namespace, "--wait=false")
