"""The Helm chart installs onto a real kube-apiserver with real helm."""

from __future__ import annotations

import json
import subprocess

from gateway_harness import REPO
from kube import KubeControlPlane, k8s_bin_dir

CHART = REPO / "helm" / "switchyard"


def helm(kube: KubeControlPlane, *args: str) -> str:
    result = subprocess.run(
        [str(k8s_bin_dir() / "helm"), "--kubeconfig", str(kube.kubeconfig_path), *args],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_chart_lints_and_its_crd_is_the_generated_one() -> None:
    assert (CHART / "crds" / "routepolicy.yaml").read_text() == (
        REPO / "deploy" / "crds" / "routepolicy.yaml"
    ).read_text()
    out = subprocess.run(
        [str(k8s_bin_dir() / "helm"), "lint", str(CHART)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_helm_install_creates_the_data_and_control_plane(kube: KubeControlPlane) -> None:
    helm(
        kube, "install", "sy", str(CHART), "--namespace", "switchyard", "--create-namespace",
        "--set", "operator.watchNamespaces={team-a,team-b}",
    )  # fmt: skip
    deployments = json.loads(kube.kubectl("get", "deploy", "-n", "switchyard", "-o", "json"))
    names = {d["metadata"]["name"]: d for d in deployments["items"]}
    assert set(names) == {"sy-operator", "sy-gateway", "sy-extproc"}
    args = names["sy-operator"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args
    assert "--extproc=sy-extproc.switchyard.svc:9002" in args
    assert "--data-plane-namespace=switchyard" in args
    assert "--gateway-deployment=sy-gateway" in args
    extproc_args = names["sy-extproc"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--config=grpc://sy-xds.switchyard.svc:18000" in extproc_args
    assert "--metrics-port=9464" in extproc_args
    services = kube.kubectl("get", "svc", "-n", "switchyard", "-o", "name").split()
    assert set(services) == {"service/sy-gateway", "service/sy-xds", "service/sy-extproc"}
    crd = kube.kubectl("get", "crd", "routepolicies.switchyard.dev", "-o", "name")
    assert (
        crd.strip() == "customresourcedefinition.apiextensions.k8s.io/routepolicies.switchyard.dev"
    )
    assert "sy" in helm(kube, "list", "-n", "switchyard")
