"""Switchyard installed with Helm on a real single-node cluster, used as a person would: the
README's "Install on Kubernetes" commands, the official openai client through the gateway
Service, a model pod deleted and an ext_proc scaled out under load, an upgrade under load, and
an uninstall that leaves only the CRD.

One module-scoped install; the tests run in file order and each starts from what the one
before left (pytest runs a module's tests in order)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from node import KubeNode, poll

REPO = Path(__file__).resolve().parents[2]
CLIENT = Path(__file__).with_name("gateway_client.py")
README = (REPO / "README.md").read_text()
NAMESPACE = "switchyard"
RELEASE = "switchyard"
# The README's commands, word for word (test_the_readme_commands_are_the_ones_run checks).
INSTALL = (
    "helm install switchyard helm/switchyard --namespace switchyard --create-namespace "
    "--set demo.enabled=true --wait --timeout 5m"
)
APPLY = "kubectl apply -f deploy/examples/routepolicy.yaml"
WAIT_READY = (
    "kubectl wait --namespace switchyard routepolicy/assistant --for=condition=Ready --timeout=60s"
)
UNINSTALL = "helm uninstall switchyard --namespace switchyard --wait"
PORT_FORWARD = "kubectl -n switchyard port-forward svc/switchyard-gateway 8080:80"
FIRST_REQUEST = "curl -s http://127.0.0.1:8080/v1/chat/completions"


def _words(command: str) -> list[str]:
    """A README command's arguments (without the program), repository paths made absolute."""
    return [str(REPO / w) if (REPO / w).exists() and "/" in w else w for w in command.split()[1:]]


@dataclass
class Install:
    node: KubeNode
    values: Path

    def gateway_url(self) -> str:
        ip = self.node.kubectl(
            "-n", NAMESPACE, "get", "svc", f"{RELEASE}-gateway", "-o=jsonpath={.spec.clusterIP}"
        )
        return f"http://{ip}:80"

    def client(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.node.run([sys.executable, str(CLIENT), *args], timeout=120)

    def check(self) -> dict[str, Any]:
        result = self.client("check", self.gateway_url())
        assert result.returncode == 0, result.stderr
        return dict(json.loads(result.stdout))

    def pods(self, component: str) -> list[dict[str, Any]]:
        out = self.node.kubectl(
            "-n", NAMESPACE, "get", "pods", "-o", "json",
            f"-l=app.kubernetes.io/name={RELEASE}-{component}",
        )  # fmt: skip
        return [p for p in json.loads(out)["items"] if not p["metadata"].get("deletionTimestamp")]

    def load(self) -> Load:
        return Load(self)


class Load:
    """gateway_client.py ``load`` in the netns until ``stop()``: the requests' outcomes."""

    def __init__(self, install: Install) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="swy-load-"))
        self.stop_file, self.out = self.directory / "stop", self.directory / "requests.jsonl"
        self.process = subprocess.Popen(
            install.node.netns_argv(
                [sys.executable, str(CLIENT), "load", install.gateway_url(),
                 str(self.stop_file), str(self.out)]
            )
        )  # fmt: skip
        poll(lambda: len(self.records()) >= 10, 60, "the load's first requests")

    def records(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        lines = self.out.read_text().splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]

    def stop(self) -> list[dict[str, Any]]:
        self.stop_file.touch()
        assert self.process.wait(timeout=60) == 0
        return self.records()


def _failed(records: list[dict[str, Any]]) -> list[str]:
    """Each failed request as one readable line."""
    return [
        f"#{r['n']} {'stream' if r['stream'] else 'chat'} {r['status']}: {r.get('error', '')}"
        for r in records
        if r["status"] != 200
    ]


@pytest.fixture(scope="module")
def install(kube_node: KubeNode, images: dict[str, str]) -> Iterator[Install]:
    """The test images and small resource requests (two cores host the whole cluster)."""
    repository, tag = images["switchyard"].rsplit(":", 1)
    envoy_repository, envoy_tag = images["envoy"].rsplit(":", 1)
    small = {"requests": {"cpu": "50m", "memory": "64Mi"}}
    values = {
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "envoyImage": {"repository": envoy_repository, "tag": envoy_tag, "pullPolicy": "Never"},
        "gateway": {"resources": small},
        "extproc": {"resources": small},
        "operator": {"resources": small},
        "demo": {"resources": small},
    }
    path = Path(tempfile.mkdtemp(prefix="swy-values-")) / "test-images.yaml"
    path.write_text(yaml.safe_dump(values))
    yield Install(kube_node, path)
    # Shown by pytest only when a test failed: what the pods were doing.
    sys.stderr.write(kube_node.kubectl("get", "pods", "-A", "-o", "wide", check=False))
    for component in ("operator", "extproc", "gateway"):
        logs = kube_node.kubectl(
            "-n", NAMESPACE, "logs", f"deployment/{RELEASE}-{component}", "--tail=30",
            check=False,
        )  # fmt: skip
        sys.stderr.write(f"--- {component}\n{logs}\n")
    # Whatever a failed test left: gone before the node stops.
    kube_node.helm("uninstall", RELEASE, "-n", NAMESPACE, "--wait", check=False)


def test_the_readme_commands_are_the_ones_run() -> None:
    section = README.split("## Install on Kubernetes", 1)[1].split("\n## ", 1)[0]
    for command in (INSTALL, APPLY, WAIT_READY, PORT_FORWARD, FIRST_REQUEST, UNINSTALL):
        assert command in section, command


def test_helm_install_brings_every_pod_to_ready(install: Install) -> None:
    node = install.node
    node.helm(*_words(INSTALL), "-f", str(install.values), timeout=400)
    pods = json.loads(node.kubectl("-n", NAMESPACE, "get", "pods", "-o", "json"))["items"]
    components = {p["metadata"]["labels"].get("app.kubernetes.io/component") for p in pods}
    assert {"gateway", "extproc", "operator", "demo-light"} <= components
    for pod in pods:
        ready = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
        assert ready.get("Ready") == "True", (pod["metadata"]["name"], pod["status"])
        for container in pod["spec"]["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert container["securityContext"]["runAsNonRoot"] is True


def test_a_policy_applied_with_kubectl_routes_the_openai_client(install: Install) -> None:
    node = install.node
    node.kubectl(*_words(APPLY))
    node.kubectl(*_words(WAIT_READY), timeout=90)
    seen = install.check()
    assert seen["easy"]["model"] == "light" and seen["easy"]["served_by"] == "demo-light-8b"
    assert seen["hard"]["model"] in ("standard", "capable")
    assert seen["stream"]["model"] == "light" and seen["stream"]["chunks"] >= 2
    assert seen["stream"]["text"].strip()
    assert {"auto", "light", "standard", "capable"} <= set(seen["models"])
    assert seen["unknown_model"]["status"] == 404
    assert seen["unknown_model"]["class"] == "NotFoundError"
    assert seen["bad_messages"]["status"] == 400
    assert seen["bad_messages"]["class"] == "BadRequestError"
    assert seen["bad_json"]["status"] == 400 and seen["bad_json"]["error"]["message"]


def test_the_first_request_through_port_forward(install: Install) -> None:
    """What the README (and NOTES.txt) tell a person to type, from the node's network."""
    node = install.node
    env = {**os.environ, "KUBECONFIG": str(node.kubeconfig)}
    forward = subprocess.Popen(
        node.netns_argv([str(node.bin_dir / "kubectl"), *_words(PORT_FORWARD)]),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert forward.stdout is not None
        # kubectl prints this once it listens.
        assert "Forwarding from 127.0.0.1:8080" in forward.stdout.readline()
        body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": "Hi!"}]})
        answer = node.run(
            [*FIRST_REQUEST.split(), "-i", "-H", "content-type: application/json", "-d", body]
        )
        assert answer.returncode == 0, answer.stderr
        head, _, payload = answer.stdout.partition("\n\n")  # text mode: \r\n read as \n
        assert head.startswith("HTTP/1.1 200"), head
        assert "x-switchyard-model: light" in head.lower()
        assert json.loads(payload)["choices"][0]["message"]["content"]
    finally:
        forward.terminate()
        forward.wait(timeout=30)


TRIAL_KEY = "sk-switchyard-e2e-trial"
TRIAL_KEYS = f"""
apiVersion: switchyard.dev/v1alpha1
kind: ClientKeys
metadata: {{name: trial, namespace: {NAMESPACE}}}
spec:
  tenants:
  - {{name: trial, limits: {{requestsPerMinute: 3}}}}
  keys:
  - {{name: trial, tenant: trial, sha256: {hashlib.sha256(TRIAL_KEY.encode()).hexdigest()}}}
"""


def test_clientkeys_applied_with_kubectl_give_401_then_429(install: Install) -> None:
    """README "Tenants and limits": a ClientKeys resource switches keys on (401 without one);
    its tenant's rate limit answers 429 with Retry-After; deleting it switches keys off. No
    Redis in this install: each ext_proc worker counts on its own (the limit holds per worker)."""
    node = install.node
    url = install.gateway_url() + "/v1/chat/completions"
    body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi"}]})

    def call(key: str | None = None) -> tuple[int, str]:
        argv = ["curl", "-s", "-o", "/dev/null", "-D", "-", "-w", "%{http_code}", url]
        argv += ["-H", "content-type: application/json", "-d", body]
        if key is not None:
            argv += ["-H", f"authorization: Bearer {key}"]
        out = node.run(argv, timeout=30).stdout
        return int(out[-3:]), out[:-3].lower()

    node.kubectl("apply", "-f", "-", input=TRIAL_KEYS)
    poll(lambda: call()[0] == 401, 60, "keys switched on (401 without a key)", interval=0.5)
    ready = node.kubectl("-n", NAMESPACE, "get", "clientkeys", "trial", "--no-headers")
    assert ready.split()[1] == "True", ready  # the READY printer column
    codes: list[int] = []
    for _ in range(40):
        code, head = call(TRIAL_KEY)
        codes.append(code)
        if code == 429:
            assert "retry-after:" in head, head
            break
    assert codes[0] == 200 and codes[-1] == 429, codes
    assert set(codes) == {200, 429}, codes
    node.kubectl("-n", NAMESPACE, "delete", "clientkeys", "trial")
    poll(lambda: call()[0] == 200, 60, "keys switched off again", interval=0.5)


def test_a_deleted_model_pod_fails_over_then_recovers(install: Install) -> None:
    node = install.node
    (old,) = install.pods("demo-light")
    load = install.load()
    node.kubectl("-n", NAMESPACE, "delete", "pod", old["metadata"]["name"], "--wait=false")
    # Recovery is driven by EndpointSlices: the new pod is Ready, the operator pushes its
    # address, and easy prompts are served by light again.
    node.wait_ready("deployment", f"{RELEASE}-demo-light", NAMESPACE, timeout=120)
    (new,) = poll(lambda: [p for p in install.pods("demo-light") if p["metadata"]["name"] !=
                           old["metadata"]["name"]] or None, 60, "the new light pod")  # fmt: skip
    mark = len(load.records())
    poll(
        lambda: any(r.get("model") == "light" for r in load.records()[mark:]),
        60,
        "light serving again",
    )
    records = load.stop()
    assert _failed(records) == []
    models = [r["model"] for r in records]
    assert "standard" in models, "no request was failed over while light had no pod"
    assert models[-1] == "light"
    assert new["status"]["podIP"] != old["status"]["podIP"]


def _decisions(install: Install, pod: dict[str, Any]) -> float:
    """switchyard_decisions_total summed, from one ext_proc pod's metrics port."""
    url = f"http://{pod['status']['podIP']}:9464/metrics"
    script = (
        f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=5).read().decode())"
    )
    out = install.node.run([sys.executable, "-c", script]).stdout
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in out.splitlines()
        if line.startswith("switchyard_decisions_total{")
    )


def test_a_scaled_out_extproc_gets_streams(install: Install) -> None:
    node = install.node
    before = {p["metadata"]["name"] for p in install.pods("extproc")}
    node.kubectl("-n", NAMESPACE, "scale", f"deployment/{RELEASE}-extproc",
                 f"--replicas={len(before) + 1}")  # fmt: skip
    node.wait_ready("deployment", f"{RELEASE}-extproc", NAMESPACE, timeout=180)
    (added,) = [p for p in install.pods("extproc") if p["metadata"]["name"] not in before]
    load = install.load()
    poll(lambda: _decisions(install, added) >= 5, 60, "streams on the new ext_proc pod")
    records = load.stop()
    assert _failed(records) == []


def test_helm_upgrade_under_load_fails_no_request(install: Install) -> None:
    node = install.node
    revision = json.loads(node.helm("status", RELEASE, "-n", NAMESPACE, "-o", "json"))["version"]
    load = install.load()
    node.helm(
        "upgrade", RELEASE, str(REPO / "helm/switchyard"), "-n", NAMESPACE, "--reuse-values",
        "--set", "extproc.replicas=2", "--set", "gateway.podAnnotations.upgraded=yes",
        "--wait", "--timeout", "5m", timeout=400,
    )  # fmt: skip
    mark = len(load.records())
    poll(lambda: len(load.records()) >= mark + 20, 60, "requests after the upgrade")
    records = load.stop()
    assert _failed(records) == []
    status = json.loads(node.helm("status", RELEASE, "-n", NAMESPACE, "-o", "json"))
    assert status["version"] == revision + 1 and status["info"]["status"] == "deployed"


def test_helm_uninstall_leaves_only_the_crd(install: Install) -> None:
    node = install.node
    # The operator's HPAs and PDBs are not Helm's: they go because their Deployment owns them.
    made = node.kubectl("-n", NAMESPACE, "get", "hpa,pdb", "-o", "name").split()
    assert len(made) == 4, made
    node.kubectl("-n", NAMESPACE, "delete", "routepolicy", "assistant", "--wait", timeout=90)
    node.helm(*_words(UNINSTALL), timeout=300)
    kinds = "all,configmap,secret,serviceaccount,role,rolebinding,networkpolicy,pdb,hpa,ingress"
    allowed = re.compile(r"^(configmap/kube-root-ca\.crt|serviceaccount/default)$")

    def left() -> list[str]:
        names = node.kubectl("-n", NAMESPACE, "get", kinds, "-o", "name").split()
        return [name for name in names if not allowed.match(name)]

    # Pods go after their ReplicaSets, each after its own grace period (the gateway drains).
    poll(lambda: left() == [], 150, f"nothing left in {NAMESPACE}")
    cluster_wide = node.kubectl(
        "get", "clusterrole,clusterrolebinding", "-l", f"app.kubernetes.io/instance={RELEASE}",
        "-o", "name",
    )  # fmt: skip
    assert cluster_wide.split() == []
    assert node.kubectl("get", "crd", "routepolicies.switchyard.dev", "-o", "name").strip()
