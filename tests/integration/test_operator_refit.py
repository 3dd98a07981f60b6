"""The adaptive-routing loop against a real kube-apiserver: a RoutePolicy that refits its
router gets a CronJob; `switchyard.dev/refit=now` starts a Job; when the Job succeeds, its
bundle becomes the policy's (status.router) and the real ext_proc hot-swaps to it, so a real
Envoy routes by it; `switchyard.dev/rollback` restores the previous bundle.

This harness has no controller-manager and no kubelet, so the test plays both for the refit
Job, through the same API the real ones use: it runs the Job's own container command (the
script and arguments the operator put in the Job, with the paths the operator was told the
volumes are mounted at) on this machine, creates the Job's pod with the label the job
controller puts on it, writes the fit's report as that pod's container termination message
(what the kubelet does with /dev/termination-log), and sets the Job's Complete or Failed
conditions. tests/e2e/test_refit_loop.py runs the same loop with the real ones.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from kube import KubeControlPlane
from operator_harness import Cluster
from routing_data import write_topic_outcomes

from switchyard.extproc.router import cli
from switchyard.local.runner import port_open, wait_until

MATH = "tell me about the eigenvalue integral theorem of the manifold"
CHAT = "tell me about the kitchen river and the garden restaurant"
REFIT = "switchyard.dev/refit"
ROLLBACK = "switchyard.dev/rollback"


def write_outcomes(path: Path, math_model: str, n: int = 200) -> Path:
    """``math_model`` answers prompts of HARD words well, the other model those of EASY words
    (the right model depends on the topic, not the length)."""
    return write_topic_outcomes(path, n, math_model=math_model)


class Loop:
    """The Cluster plus the directories the refit volumes stand for."""

    def __init__(self, cluster: Cluster, outcomes: Path, bundles: Path, shim: Path) -> None:
        self.cluster, self.outcomes, self.bundles, self.shim = cluster, outcomes, bundles, shim
        self.kube: KubeControlPlane = cluster.kube
        self.ns = cluster.namespace
        self.root = bundles / f"{self.ns}.assistant"

    def get(self, *what: str) -> dict[str, Any]:
        return dict(json.loads(self.kube.kubectl("get", *what, "-n", self.ns, "-o", "json")))

    def router(self) -> dict[str, Any]:
        return dict(self.cluster.status().get("router") or {})

    def routed(self, prompt: str) -> str:
        body = {"model": "auto", "messages": [{"role": "user", "content": prompt}]}
        url = f"http://127.0.0.1:{self.cluster.port}/v1/chat/completions"
        response = httpx.post(url, json=body, timeout=10)
        return response.headers.get("x-switchyard-model", str(response.status_code))

    def events(self, reason: str) -> str:
        """The messages of the Events with this reason, one per line."""
        items = json.loads(self.kube.kubectl("get", "events", "-n", self.ns, "-o", "json"))
        return "\n".join(e["message"] for e in items["items"] if e["reason"] == reason)

    def jobs(self) -> list[dict[str, Any]]:
        items = self.get("jobs", "-l", "switchyard.dev/refit-policy")["items"]
        return sorted(items, key=lambda j: j["metadata"]["creationTimestamp"])

    def annotate(self, annotation: str, value: str) -> None:
        self.kube.kubectl(
            "annotate", "rp", "assistant", "-n", self.ns, f"{annotation}={value}", "--overwrite"
        )

    def refit_now(self, count: int) -> dict[str, Any]:
        """Annotate, then wait for the ``count``-th Job; the annotation is consumed."""
        self.annotate(REFIT, "now")
        wait_until(lambda: len(self.jobs()) == count, 30, "refit Job")
        annotations = self.get("rp", "assistant")["metadata"].get("annotations") or {}
        assert REFIT not in annotations
        return self.jobs()[-1]

    def run_job(self, job: dict[str, Any], tmp: Path) -> tuple[int, str]:
        """Act as the kubelet: run the Job's container as the pod would (same command, same
        arguments, the volumes at the paths the operator mounts them), its --summary going to
        a file that stands for /dev/termination-log. Returns (exit code, that file's text)."""
        (container,) = job["spec"]["template"]["spec"]["containers"]
        summary = tmp / f"{job['metadata']['name']}.termination-log"
        args = [str(summary) if a == "/dev/termination-log" else a for a in container["args"]]
        env = {**os.environ, "PATH": f"{self.shim}:{os.environ['PATH']}"}
        done = subprocess.run(
            [*container["command"], *args], env=env, capture_output=True, text=True, timeout=300
        )
        text = summary.read_text() if summary.exists() else done.stderr[-4096:]
        return done.returncode, text

    def finish_job(self, job: dict[str, Any], exit_code: int, message: str) -> None:
        """Act as the job controller and kubelet: the Job's pod, its container terminated with
        ``message``, and the Job's final conditions."""
        name = job["metadata"]["name"]
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{name}-x1",
                "namespace": self.ns,
                "labels": {"batch.kubernetes.io/job-name": name, "job-name": name},
            },
            "spec": job["spec"]["template"]["spec"],
        }
        self.kube.kubectl("create", "-f", "-", stdin=json.dumps(pod))
        now = "2026-11-30T10:00:00Z"
        terminated = {
            "exitCode": exit_code,
            "message": message,
            "startedAt": now,
            "finishedAt": now,
            "reason": "Completed" if exit_code == 0 else "Error",
        }
        status = {"phase": "Succeeded" if exit_code == 0 else "Failed", "containerStatuses": [{
            "name": "fit", "image": job["spec"]["template"]["spec"]["containers"][0]["image"],
            "imageID": "", "ready": False, "restartCount": 0,
            "state": {"terminated": terminated}}]}  # fmt: skip
        self._patch_status("pod", f"{name}-x1", status)
        if exit_code == 0:
            conditions = ["SuccessCriteriaMet", "Complete"]
            counts = {"succeeded": 1, "completionTime": now}
        else:
            conditions = ["FailureTarget", "Failed"]
            counts = {"failed": 1}
        final = [
            {"type": c, "status": "True", "reason": "Test", "message": "",
             "lastProbeTime": now, "lastTransitionTime": now}
            for c in conditions
        ]  # fmt: skip
        self._patch_status("job", name, {"startTime": now, **counts, "conditions": final})

    def _patch_status(self, kind: str, name: str, status: dict[str, Any]) -> None:
        self.kube.kubectl(
            "patch", kind, name, "-n", self.ns, "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": status}),
        )  # fmt: skip


def _model(name: str, port: int, price: float) -> dict[str, Any]:
    return {
        "name": name,
        "backend": {"url": f"http://127.0.0.1:{port}"},
        "upstreamModel": f"{name}-model",
        "pricing": {"inputPer1M": price, "outputPer1M": 4 * price},
    }


@pytest.fixture(scope="module")
def loop(
    routepolicy_crd: KubeControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Loop]:
    tmp = tmp_path_factory.mktemp("refit")
    outcomes, bundles, shim = tmp / "outcomes", tmp / "bundles", tmp / "bin"
    for folder in (outcomes, bundles, shim):
        folder.mkdir()
    # The image's `switchyard` entry point, as this checkout's.
    (shim / "switchyard").write_text(f'#!/bin/sh\nexec {sys.executable} -m switchyard.cli "$@"\n')
    (shim / "switchyard").chmod(0o755)
    cluster = Cluster(
        routepolicy_crd,
        prefix="refit",
        operator_args=[
            "--refit-image=localhost/switchyard:test",
            "--refit-outcomes-claim=outcomes",
            "--refit-bundles-claim=bundles",
            f"--refit-outcomes-dir={outcomes}",
            f"--refit-bundles-dir={bundles}",
            "--refit-poll-seconds=0.5",
        ],
    )
    running = Loop(cluster, outcomes, bundles, shim)
    # The bundle the policy starts from, fitted beforehand: specialist for math.
    first = running.root / "20261101T000000Z"
    seed = write_outcomes(tmp / "seed.jsonl", "specialist")
    args = ["fit", "--outcomes", str(seed), "--out", str(first)]
    assert cli.main(args, stdout=open(os.devnull, "w")) == 0  # noqa: SIM115
    ports = cluster.demo_ports
    cluster.policy = {
        "apiVersion": "switchyard.dev/v1alpha1",
        "kind": "RoutePolicy",
        "metadata": {"name": "assistant", "namespace": cluster.namespace},
        "spec": {
            "match": {"models": ["auto"]},
            "models": [
                _model("generalist", ports["demo-light"], 0.1),
                _model("specialist", ports["demo-standard"], 1.0),
            ],
            "strategy": {
                "type": "predictive",
                "router": {
                    "bundle": str(first),
                    "refit": {
                        "schedule": "0 3 * * *",
                        "minOutcomes": 100,
                        "models": ["generalist", "specialist"],
                        "keep": 2,
                    },
                },
                "predictive": {"maxQualityLoss": 0.05},
                "default": "generalist",
            },
        },
    }
    yield running
    cluster.close()


def test_a_refitting_policy_gets_its_cron_job(loop: Loop) -> None:
    loop.cluster.apply(loop.cluster.policy)
    wait_until(lambda: loop.cluster.condition("assistant").get("status") == "True", 60, "Ready")
    wait_until(lambda: port_open("127.0.0.1", loop.cluster.port), 30, "gateway listener")
    wait_until(lambda: loop.routed(MATH) == "specialist", 30, "routing by the spec's bundle")
    assert loop.routed(CHAT) == "generalist"
    pending = loop.cluster.condition("assistant", "RouterFit")
    assert (pending["status"], pending["reason"]) == ("Unknown", "Pending")

    cron = loop.get("cronjob", f"refit-{loop.ns}-assistant")
    uid = loop.get("rp", "assistant")["metadata"]["uid"]
    (owner,) = cron["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("RoutePolicy", "assistant", uid)
    assert cron["spec"]["schedule"] == "0 3 * * *"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "localhost/switchyard:test"
    assert container["args"][:2] == [str(loop.outcomes), str(loop.root)]
    assert (
        "--keep" in container["args"] and str(loop.root / "20261101T000000Z") in container["args"]
    )
    mounts = {
        m["name"]: (m["mountPath"], m.get("readOnly", False)) for m in container["volumeMounts"]
    }
    assert mounts["outcomes"] == (str(loop.outcomes), True)
    assert mounts["bundles"] == (str(loop.bundles), False)
    claims = {v["name"]: v.get("persistentVolumeClaim") for v in pod["volumes"]}
    assert claims["outcomes"] == {"claimName": "outcomes", "readOnly": True}
    assert claims["bundles"] == {"claimName": "bundles"}

    suspended = copy.deepcopy(loop.cluster.policy)
    suspended["spec"]["strategy"]["router"]["refit"]["suspend"] = True
    loop.cluster.apply(suspended)
    wait_until(
        lambda: loop.get("cronjob", f"refit-{loop.ns}-assistant")["spec"]["suspend"] is True,
        30,
        "CronJob suspended",
    )
    loop.cluster.apply(loop.cluster.policy)


def test_a_succeeded_refit_job_switches_the_bundle_and_the_routing(
    loop: Loop, tmp_path: Path
) -> None:
    write_outcomes(loop.outcomes / "outcomes.jsonl", "generalist")  # the workload changed
    job = loop.refit_now(1)
    assert job["metadata"]["annotations"]["switchyard.dev/policy"] == f"{loop.ns}/assistant"
    wait_until(
        lambda: loop.router().get("lastAttempt", {}).get("result") == "Running", 10, "Running"
    )
    # A second request while it runs starts nothing.
    loop.annotate(REFIT, "again")
    wait_until(
        lambda: REFIT not in (loop.get("rp", "assistant")["metadata"].get("annotations") or {}),
        30,
        "annotation consumed",
    )
    wait_until(lambda: "still running" in loop.events("RefitNotStarted"), 30, "refused")
    assert len(loop.jobs()) == 1
    code, message = loop.run_job(job, tmp_path)
    assert code == 0, message
    report = json.loads(message)
    assert report["result"] == "fitted"
    new = report["bundle"]
    assert Path(new).parent == loop.root and (Path(new) / "router.yaml").is_file()
    loop.finish_job(job, code, message)

    wait_until(lambda: loop.router().get("activeBundle") == new, 30, "new bundle active")
    router = loop.router()
    assert router["previousBundles"] == [str(loop.root / "20261101T000000Z")]
    assert router["lastFit"]["job"] == job["metadata"]["name"]
    assert router["lastFit"]["outcomes"] == 400
    assert router["lastFit"]["crossValidatedAPGR"]["fitted"] > router["lastFit"][
        "crossValidatedAPGR"]["length"]  # fmt: skip
    fitted = loop.cluster.condition("assistant", "RouterFit")
    assert (fitted["status"], fitted["reason"]) == ("True", "Fitted")
    wait_until(  # never read again, by this operator or a restarted one
        lambda: loop.get("job", job["metadata"]["name"])["metadata"]["labels"].get(
            "switchyard.dev/refit-handled"
        ) == "true",
        10,
        "Job labelled handled",
    )  # fmt: skip
    assert loop.cluster.condition("assistant")["status"] == "True"
    # The ext_proc hot-swapped to the new bundle: math now goes to the generalist.
    wait_until(lambda: loop.routed(MATH) == "generalist", 30, "routing by the fitted bundle")
    assert loop.routed(CHAT) == "specialist"
    printed = loop.kube.kubectl("get", "rp", "-n", loop.ns)
    assert "BUNDLE" in printed and new in printed
    # The CronJob's next Jobs keep the bundles the status now lists.
    args = loop.get("cronjob", f"refit-{loop.ns}-assistant")["spec"]["jobTemplate"]["spec"][
        "template"]["spec"]["containers"][0]["args"]  # fmt: skip
    assert args[args.index("--keep") + 1] == new


def test_too_few_outcomes_keep_the_bundle_and_say_so(loop: Loop, tmp_path: Path) -> None:
    active = loop.router()["activeBundle"]
    (loop.outcomes / "outcomes.jsonl").write_bytes(
        b"".join((loop.outcomes / "outcomes.jsonl").read_bytes().splitlines(True)[:60])
    )
    job = loop.refit_now(2)
    code, message = loop.run_job(job, tmp_path)
    assert code == 1
    loop.finish_job(job, code, message)
    wait_until(
        lambda: loop.cluster.condition("assistant", "RouterFit").get("reason") == "TooFewOutcomes",
        30,
        "TooFewOutcomes",
    )
    condition = loop.cluster.condition("assistant", "RouterFit")
    assert condition["status"] == "False"
    assert "60 outcomes, fewer than the 100" in condition["message"]
    assert f"serving {active}" in condition["message"]
    assert loop.router()["activeBundle"] == active
    assert loop.routed(MATH) == "generalist"


def test_rollback_restores_the_previous_bundle(loop: Loop) -> None:
    first = str(loop.root / "20261101T000000Z")
    loop.annotate(ROLLBACK, "previous")
    wait_until(lambda: loop.router().get("activeBundle") == first, 30, "rolled back")
    router = loop.router()
    assert router["previousBundles"] == []
    assert router["lastRollback"]["to"] == first
    wait_until(lambda: loop.routed(MATH) == "specialist", 30, "routing by the old bundle")
    annotations = loop.get("rp", "assistant")["metadata"].get("annotations") or {}
    assert ROLLBACK not in annotations
    # Nothing left to roll back to: refused, the bundle in force stays.
    loop.annotate(ROLLBACK, "previous")
    wait_until(
        lambda: ROLLBACK not in (loop.get("rp", "assistant")["metadata"].get("annotations") or {}),
        30,
        "annotation consumed",
    )
    wait_until(lambda: loop.events("RolledBack") and loop.events("RollbackRefused"), 30, "events")
    assert "previousBundles is empty" in loop.events("RollbackRefused")
    assert loop.router()["activeBundle"] == first


def test_a_spec_edit_keeps_the_bundle_in_force(loop: Loop) -> None:
    # status.router is the record: the spec's bundle stays overridden.
    edited = copy.deepcopy(loop.cluster.policy)
    edited["spec"]["strategy"]["predictive"]["maxQualityLoss"] = 0.06
    loop.cluster.apply(edited)
    wait_until(lambda: loop.cluster.status().get("observedGeneration", 0) >= 3, 30, "reconciled")
    assert loop.routed(MATH) == "specialist"
    assert loop.router()["activeBundle"] == str(loop.root / "20261101T000000Z")


def test_deleting_the_policy_deletes_its_cron_job(loop: Loop) -> None:
    loop.kube.kubectl("delete", "rp", "assistant", "-n", loop.ns)

    def gone() -> bool:
        out = loop.kube.kubectl("get", "cronjobs", "-n", loop.ns, "-o", "json")
        return not json.loads(out)["items"]

    wait_until(gone, 30, "CronJob deleted")
