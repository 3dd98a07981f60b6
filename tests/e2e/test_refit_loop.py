"""The adaptive-routing loop on a real single-node cluster: Switchyard installed with Helm with
an outcomes claim and a bundles claim, a RoutePolicy that refits its router, and
`kubectl annotate ... switchyard.dev/refit=now`. The real job controller runs the operator's
Job, whose pod runs `switchyard router fit` from the switchyard image on an outcome file in the
outcomes volume and writes a bundle to the bundles volume; the operator makes it the policy's
router, the ext_proc pods hot-swap to it, and the gateway routes by it. Then a rollback, and
the policy's deletion taking its CronJob with it (the real garbage collector).

The claims are bound to hostPath PersistentVolumes (one node: ReadWriteOnce is enough)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from node import KubeNode, poll
from routing_data import write_topic_outcomes

from switchyard.extproc.router import cli

REPO = Path(__file__).resolve().parents[2]
NAMESPACE, RELEASE = "swy-loop", "switchyard"
BUNDLES = "/var/lib/switchyard/bundles"
ROOT = f"{BUNDLES}/{NAMESPACE}.assistant"
FIRST = f"{ROOT}/20261101T000000Z"
MATH = "tell me about the eigenvalue integral theorem of the manifold"
CHAT = "tell me about the kitchen river and the garden restaurant"
UID = 65532  # the image's user


def write_outcomes(path: Path, math_model: str, n: int = 200) -> Path:
    """``math_model`` answers prompts of HARD words well, the other model those of EASY words
    (the right model depends on the topic, not the length)."""
    return write_topic_outcomes(path, n, math_model=math_model)


def _chown_tree(path: Path) -> None:
    for folder, dirs, files in os.walk(path):
        for name in [folder, *(os.path.join(folder, f) for f in dirs + files)]:
            os.chown(name, UID, UID)


@dataclass
class Loop:
    node: KubeNode
    host: Path

    def get(self, *what: str) -> dict[str, Any]:
        out = self.node.kubectl("-n", NAMESPACE, "get", *what, "-o", "json")
        return dict(json.loads(out))

    def router(self) -> dict[str, Any]:
        return dict(self.get("rp", "assistant").get("status", {}).get("router") or {})

    def condition(self, kind: str) -> dict[str, Any]:
        status = self.get("rp", "assistant").get("status", {})
        return next((c for c in status.get("conditions", []) if c["type"] == kind), {})

    def routed(self, prompt: str) -> str:
        ip = self.node.kubectl(
            "-n", NAMESPACE, "get", "svc", f"{RELEASE}-gateway", "-o=jsonpath={.spec.clusterIP}"
        )
        body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": prompt}]})
        done = self.node.run(
            ["curl", "-s", "-o", "/dev/null", "-D", "-", "--max-time", "10",
             f"http://{ip}:80/v1/chat/completions", "-H", "content-type: application/json",
             "-d", body],
            timeout=30,
        )  # fmt: skip
        for line in done.stdout.splitlines():
            name, _, value = line.partition(":")
            if name.strip().lower() == "x-switchyard-model":
                return value.strip()
        return done.stdout.splitlines()[0] if done.stdout else done.stderr


def _volume(name: str, path: Path) -> list[dict[str, Any]]:
    """A hostPath PersistentVolume bound to the claim of the same name."""
    storage = f"swy-loop-{name}"
    return [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": storage},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": storage,
                "hostPath": {"path": str(path), "type": "Directory"},
                "claimRef": {"namespace": NAMESPACE, "name": name},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": storage,
                "volumeName": storage,
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    ]


@pytest.fixture(scope="module")
def loop(kube_node: KubeNode, images: dict[str, str]) -> Iterator[Loop]:
    host = Path(tempfile.mkdtemp(prefix="swy-loop-"))
    host.chmod(0o755)
    outcomes, bundles = host / "outcomes", host / "bundles"
    outcomes.mkdir()
    # The bundle the policy starts from (fitted here): math to the specialist.
    write_outcomes(host / "seed.jsonl", "specialist")
    first = bundles / f"{NAMESPACE}.assistant" / "20261101T000000Z"
    args = ["fit", "--outcomes", str(host / "seed.jsonl"), "--out", str(first)]
    assert cli.main(args, stdout=open(os.devnull, "w")) == 0  # noqa: SIM115
    _chown_tree(bundles)
    _chown_tree(outcomes)
    kube_node.kubectl("create", "namespace", NAMESPACE)
    claims = _volume("outcomes", outcomes) + _volume("bundles", bundles)
    kube_node.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(claims))
    repository, tag = images["switchyard"].rsplit(":", 1)
    envoy_repository, envoy_tag = images["envoy"].rsplit(":", 1)
    small = {"requests": {"cpu": "50m", "memory": "64Mi"}}
    values = {
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "envoyImage": {"repository": envoy_repository, "tag": envoy_tag, "pullPolicy": "Never"},
        "gateway": {"resources": small, "replicas": 1},
        "extproc": {"resources": small, "replicas": 1, "bundles": {"existingClaim": "bundles"}},
        "operator": {"resources": small},
        "demo": {"enabled": True, "resources": small},
        "outcomes": {"volume": {"existingClaim": "outcomes"}},
        "refit": {"resources": {"requests": {"cpu": "100m", "memory": "256Mi"}}},
    }
    path = host / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    kube_node.helm(
        "install", RELEASE, str(REPO / "helm" / "switchyard"), "--namespace", NAMESPACE,
        "-f", str(path), "--wait", "--timeout", "5m", timeout=400,
    )  # fmt: skip
    yield Loop(kube_node, host)
    sys.stderr.write(kube_node.kubectl("get", "pods,jobs", "-n", NAMESPACE, check=False))
    for selector in ("app.kubernetes.io/component=operator", "switchyard.dev/refit-policy"):
        logs = ["-n", NAMESPACE, "logs", "-l", selector, "--tail=40"]
        sys.stderr.write(kube_node.kubectl(*logs, check=False))
    kube_node.helm("uninstall", RELEASE, "-n", NAMESPACE, "--wait", check=False)
    kube_node.kubectl("delete", "-f", "-", "--wait=false", input=yaml.safe_dump_all(claims),
                      check=False)  # fmt: skip
    kube_node.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
    shutil.rmtree(host, ignore_errors=True)


def _model(name: str, demo: str, price: float) -> dict[str, Any]:
    return {
        "name": name,
        "backend": {"service": {"name": f"{RELEASE}-demo-{demo}", "port": 8000}},
        "upstreamModel": f"{name}-model",
        "pricing": {"inputPer1M": price, "outputPer1M": 4 * price},
    }


POLICY = {
    "apiVersion": "switchyard.dev/v1alpha1",
    "kind": "RoutePolicy",
    "metadata": {"name": "assistant", "namespace": NAMESPACE},
    "spec": {
        "match": {"models": ["auto"]},
        "models": [_model("generalist", "light", 0.1), _model("specialist", "standard", 1.0)],
        "strategy": {
            "type": "predictive",
            "router": {
                "bundle": FIRST,
                "refit": {"schedule": "0 3 * * *", "minOutcomes": 100, "keep": 2},
            },
            "predictive": {"maxQualityLoss": 0.05},
            "default": "generalist",
        },
    },
}


def test_the_policy_routes_by_its_first_bundle_and_gets_a_cron_job(loop: Loop) -> None:
    loop.node.kubectl("apply", "-f", "-", input=yaml.safe_dump(POLICY))
    loop.node.kubectl(
        "-n", NAMESPACE, "wait", "routepolicy/assistant", "--for=condition=Ready", "--timeout=90s",
        timeout=120,
    )  # fmt: skip
    poll(lambda: loop.routed(MATH) == "specialist", 60, "math to the specialist")
    assert loop.routed(CHAT) == "generalist"
    cron = loop.get("cronjob", f"refit-{NAMESPACE}-assistant")
    assert cron["metadata"]["ownerReferences"][0]["kind"] == "RoutePolicy"


def test_refit_now_runs_fit_in_a_pod_and_the_gateway_routes_by_the_new_bundle(
    loop: Loop,
) -> None:
    # The workload changed: the generalist now answers the math prompts well.
    outcome_file = loop.host / "outcomes" / "outcomes.jsonl"
    write_outcomes(outcome_file, "generalist")
    os.chown(outcome_file, UID, UID)
    loop.node.kubectl(
        "-n", NAMESPACE, "annotate", "routepolicy", "assistant", "switchyard.dev/refit=now"
    )
    new = poll(lambda: loop.router().get("lastFit", {}).get("bundle"), 300, "a fitted bundle")
    assert new.startswith(ROOT + "/") and new != FIRST
    router = loop.router()
    assert router["activeBundle"] == new
    assert router["previousBundles"] == [FIRST]
    assert router["lastFit"]["outcomes"] == 400
    assert loop.condition("RouterFit")["reason"] == "Fitted"
    (job,) = loop.get("jobs", "-l", "switchyard.dev/refit-policy")["items"]
    assert job["status"].get("succeeded") == 1
    # Written by the pod, as uid 65532, on the bundles volume.
    on_host = loop.host / "bundles" / new.removeprefix(BUNDLES + "/")
    assert (on_host / "router.yaml").is_file() and on_host.stat().st_uid == UID
    poll(lambda: loop.routed(MATH) == "generalist", 60, "math to the generalist")
    assert loop.routed(CHAT) == "specialist"
    printed = loop.node.kubectl("-n", NAMESPACE, "get", "routepolicy", "assistant")
    assert new in printed


def test_rollback_routes_by_the_first_bundle_again(loop: Loop) -> None:
    loop.node.kubectl(
        "-n", NAMESPACE, "annotate", "routepolicy", "assistant", "switchyard.dev/rollback=previous"
    )
    poll(lambda: loop.router().get("activeBundle") == FIRST, 60, "rolled back")
    poll(lambda: loop.routed(MATH) == "specialist", 60, "math to the specialist again")


def test_deleting_the_policy_deletes_its_cron_job(loop: Loop) -> None:
    loop.node.kubectl("-n", NAMESPACE, "delete", "routepolicy", "assistant")
    poll(lambda: not loop.get("cronjobs")["items"], 60, "CronJob gone")
