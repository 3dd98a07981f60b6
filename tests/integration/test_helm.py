"""The Helm chart installs onto a real kube-apiserver with real helm (no kubelet: no pod runs;
the end-to-end test on a real node does that). Render-only checks: test_helm_template.py."""

from __future__ import annotations

import json
import subprocess

from gateway_harness import REPO
from kube import KubeControlPlane, k8s_bin_dir

CHART = REPO / "helm" / "switchyard"


def run_helm(kube: KubeControlPlane, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(k8s_bin_dir() / "helm"), "--kubeconfig", str(kube.kubeconfig_path), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def helm(kube: KubeControlPlane, *args: str) -> str:
    result = run_helm(kube, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_chart_lints_and_its_crd_is_the_generated_one() -> None:
    for crd in ("routepolicy.yaml", "clientkeys.yaml"):
        assert (CHART / "crds" / crd).read_text() == (REPO / "deploy" / "crds" / crd).read_text()
    out = subprocess.run(
        [str(k8s_bin_dir() / "helm"), "lint", "--strict", str(CHART)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_helm_install_creates_the_data_and_control_plane(kube: KubeControlPlane) -> None:
    for watched in ("team-a", "team-b"):  # RoleBindings go there: they exist first
        kube.kubectl("create", "namespace", watched)
    notes = helm(
        kube, "install", "sy", str(CHART), "--namespace", "switchyard", "--create-namespace",
        "--set", "operator.watchNamespaces={team-a,team-b}",
    )  # fmt: skip
    deployments = json.loads(kube.kubectl("get", "deploy", "-n", "switchyard", "-o", "json"))
    names = {d["metadata"]["name"]: d for d in deployments["items"]}
    assert set(names) == {"sy-operator", "sy-gateway", "sy-extproc"}
    args = names["sy-operator"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args
    assert "--extproc-service=sy-extproc" in args
    assert "--extproc-port=9002" in args
    assert "--extproc-workers=1" in args
    assert "--health-listen=0.0.0.0:8081" in args
    assert "--metrics-listen=0.0.0.0:9464" in args
    assert not [a for a in args if a.startswith("--extproc=")]
    assert "--data-plane-namespace=switchyard" in args
    assert "--gateway-deployment=sy-gateway" in args
    assert "--extproc-deployment=sy-extproc" in args
    extproc_args = names["sy-extproc"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--config=grpc://sy-xds.switchyard.svc:18000" in extproc_args
    assert "--metrics-port=9464" in extproc_args
    services = json.loads(kube.kubectl("get", "svc", "-n", "switchyard", "-o", "json"))["items"]
    by_name = {s["metadata"]["name"]: s["spec"] for s in services}
    assert set(by_name) == {"sy-gateway", "sy-xds", "sy-extproc"}
    assert by_name["sy-extproc"]["clusterIP"] == "None"  # headless: the operator reads its pods
    policies = kube.kubectl("get", "networkpolicy", "-n", "switchyard", "-o", "name").split()
    assert set(policies) == {
        f"networkpolicy.networking.k8s.io/sy-{c}" for c in ("gateway", "extproc", "operator")
    }
    crd = kube.kubectl("get", "crd", "routepolicies.switchyard.dev", "-o", "name")
    assert (
        crd.strip() == "customresourcedefinition.apiextensions.k8s.io/routepolicies.switchyard.dev"
    )
    crd = kube.kubectl("get", "crd", "clientkeys.switchyard.dev", "-o", "name")
    assert crd.strip() == "customresourcedefinition.apiextensions.k8s.io/clientkeys.switchyard.dev"
    assert "sy" in helm(kube, "list", "-n", "switchyard")
    # NOTES: the first request, metrics, traces
    assert "kubectl -n switchyard port-forward svc/sy-gateway 8080:80" in notes
    assert '"model": "auto"' in notes
    assert "/stats/prometheus" in notes and ":9464/metrics" in notes
    assert "tracing.otlpEndpoint" in notes
    assert "ConfigMap sy-dashboard" in notes and 'grafana_dashboard="1"' in notes
    dashboards = kube.kubectl(
        "get", "configmap", "-n", "switchyard", "-l", "grafana_dashboard=1", "-o", "name"
    )
    assert dashboards.split() == ["configmap/sy-dashboard"]
    # the operator may do what it does: its ServiceAccount's permissions, as the API sees them
    sa = "system:serviceaccount:switchyard:sy-operator"
    for verb, resource, namespace in [
        ("watch", "routepolicies.switchyard.dev", "team-a"),
        ("patch", "routepolicies.switchyard.dev/status", "team-a"),
        ("list", "endpointslices.discovery.k8s.io", "switchyard"),
        ("watch", "endpointslices.discovery.k8s.io", "team-b"),
        ("get", "secrets", "team-a"),
        ("create", "events", "team-a"),
        ("create", "horizontalpodautoscalers.autoscaling", "switchyard"),
        ("update", "poddisruptionbudgets.policy", "switchyard"),
        ("get", "deployments.apps/sy-gateway", "switchyard"),  # owner of its HPA and PDB
        ("get", "deployments.apps/sy-extproc", "switchyard"),
        ("watch", "clientkeys.switchyard.dev", "team-b"),
        ("patch", "clientkeys.switchyard.dev/status", "team-a"),
        ("list", "secrets", "team-b"),
    ]:
        assert (
            kube.kubectl("auth", "can-i", verb, resource, "-n", namespace, "--as", sa).strip()
            == "yes"
        ), (verb, resource, namespace)
    for verb, resource, namespace in [
        ("create", "poddisruptionbudgets.policy", "team-a"),  # only in its own namespace
        ("create", "secrets", "team-a"),
        ("delete", "routepolicies.switchyard.dev", "team-a"),
        ("get", "deployments.apps/other", "switchyard"),
        ("update", "deployments.apps/sy-gateway", "switchyard"),
        # ClientKeys and Secrets only where it watches, and Secrets read-only
        ("get", "secrets", "kube-system"),
        ("list", "secrets", "switchyard"),
        ("watch", "clientkeys.switchyard.dev", "kube-system"),
        ("update", "secrets", "team-a"),
        ("delete", "clientkeys.switchyard.dev", "team-a"),
    ]:
        result = kube.kubectl_result("auth", "can-i", verb, resource, "-n", namespace, "--as", sa)
        assert result.stdout.strip() == "no", (verb, resource, namespace)


def test_bad_values_fail_helm_install_naming_the_value(kube: KubeControlPlane) -> None:
    for sets, path in [
        (["extproc.replicas=-1"], "/extproc/replicas"),
        (["gateway.port=abc"], "/gateway/port"),
        (["extproc.executionProvider=tpu"], "/extproc/executionProvider"),
        (["gateway.servce.type=NodePort"], "servce"),
    ]:
        args = ["install", "bad", str(CHART), "--namespace", "bad-values", "--create-namespace"]
        for pair in sets:
            args += ["--set", pair]
        result = run_helm(kube, *args)
        assert result.returncode != 0, sets
        assert "values don't meet the specifications of the schema" in result.stderr
        assert path in result.stderr, result.stderr
    assert "bad" not in helm(kube, "list", "-n", "bad-values", "-q").split()


def test_helm_upgrade_keeps_selectors_and_adds_an_ingress(kube: KubeControlPlane) -> None:
    """An upgrade that changes values goes through (selectors are immutable, so they must not
    change), and the optional Ingress is accepted by the real API."""
    base = ["--namespace", "upgrade", "--create-namespace"]
    helm(kube, "install", "up", str(CHART), *base)
    before = json.loads(kube.kubectl("get", "deploy", "-n", "upgrade", "-o", "json"))["items"]
    tls_before = kube.kubectl("get", "secret", "up-tls", "-n", "upgrade", "-o=jsonpath={.data}")
    helm(
        kube, "upgrade", "up", str(CHART), *base, "--reuse-values",
        "--set", "extproc.workers=2",
        "--set", "extproc.executionProvider=auto",
        "--set", "extproc.bundles.image.repository=localhost/bundles",
        "--set", "extproc.bundles.image.tag=v1",
        "--set", "gateway.concurrency=2",
        "--set", "ingress.enabled=true",
        "--set", "ingress.className=nginx",
        "--set", "ingress.hosts[0].host=llm.example.com",
        "--set", "networkPolicy.egress.enabled=true",
    )  # fmt: skip
    after = json.loads(kube.kubectl("get", "deploy", "-n", "upgrade", "-o", "json"))["items"]
    assert {d["metadata"]["name"]: d["spec"]["selector"] for d in before} == {
        d["metadata"]["name"]: d["spec"]["selector"] for d in after
    }
    # The generated mTLS certificates are found again (lookup), not generated anew.
    tls_after = kube.kubectl("get", "secret", "up-tls", "-n", "upgrade", "-o=jsonpath={.data}")
    assert "ca.crt" in json.loads(tls_before)
    assert tls_after == tls_before
    extproc = next(d for d in after if d["metadata"]["name"] == "up-extproc")
    spec = extproc["spec"]["template"]["spec"]
    assert "--workers=2" in spec["containers"][0]["args"]
    assert spec["initContainers"][0]["image"] == "localhost/bundles:v1"
    ingress = json.loads(
        kube.kubectl("get", "ingress", "up-gateway", "-n", "upgrade", "-o", "json")
    )
    assert ingress["spec"]["rules"][0]["host"] == "llm.example.com"
    assert "2" in helm(kube, "history", "up", "-n", "upgrade")
    helm(kube, "uninstall", "up", "-n", "upgrade")
    kinds = "deploy,svc,ingress,networkpolicy,configmap,secret,role,rolebinding,sa"
    left = kube.kubectl(
        "get", kinds, "-n", "upgrade", "-l", "app.kubernetes.io/instance=up", "-o", "name"
    )
    assert left.split() == []


def test_notes_warn_when_cuda_has_no_gpu(kube: KubeControlPlane) -> None:
    base = ["install", "gpu", str(CHART), "--namespace", "gpu", "--dry-run=server"]
    notes = helm(kube, *base, "--set", "extproc.executionProvider=cuda")
    assert "WARNING: extproc.executionProvider is cuda" in notes
    notes = helm(
        kube, *base, "--set", "extproc.executionProvider=cuda",
        "--set-string", "extproc.resources.limits.nvidia\\.com/gpu=1",
    )  # fmt: skip
    assert "WARNING" not in notes
    assert "nvidia.com/gpu" in notes  # the rendered manifest (dry run) requests the GPU


def test_the_optional_parts_are_accepted_by_the_api(kube: KubeControlPlane) -> None:
    """Everything optional at once, created for real (HTTPRoute aside: no Gateway API CRDs
    here; test_helm_template.py renders it)."""
    values = {
        "imagePullSecrets": [{"name": "regcred"}],
        "gateway": {
            "service": {"type": "LoadBalancer", "annotations": {"a.example/b": "c"}},
            "concurrency": 2,
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
        "extproc": {
            "workers": 2,
            "executionProvider": "cuda",
            "runtimeClassName": "nvidia",
            "resources": {"limits": {"nvidia.com/gpu": 1}},
            "bundles": {"existingClaim": "router-bundles"},
        },
        "networkPolicy": {
            "metricsNamespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mon"}},
            "gatewayIngressFrom": [{"podSelector": {"matchLabels": {"app": "edge"}}}],
            "egress": {"enabled": True},
        },
        "ingress": {
            "enabled": True,
            "hosts": [
                {"host": "llm.example.com", "paths": [{"path": "/v1", "pathType": "Prefix"}]}
            ],
            "tls": [{"secretName": "llm-tls", "hosts": ["llm.example.com"]}],
        },
        "demo": {"enabled": True},
        "jaeger": {
            "enabled": True,
            "queryFrom": [{"podSelector": {"matchLabels": {"app": "grafana"}}}],
        },
    }
    result = subprocess.run(
        [str(k8s_bin_dir() / "helm"), "--kubeconfig", str(kube.kubeconfig_path),
         "install", "all", str(CHART), "--namespace", "optional", "--create-namespace",
         "--values", "-"],
        input=json.dumps(values), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    kinds = kube.kubectl("get", "deploy,svc,ingress,networkpolicy", "-n", "optional", "-o", "name")
    assert "ingress.networking.k8s.io/all-gateway" in kinds.split()
    for kind in ("deployment.apps", "service", "networkpolicy.networking.k8s.io"):
        assert f"{kind}/all-jaeger" in kinds.split(), kind
    extproc = json.loads(
        kube.kubectl("get", "deploy", "all-extproc", "-n", "optional", "-o", "json")
    )
    volumes = {v["name"]: v for v in extproc["spec"]["template"]["spec"]["volumes"]}
    assert volumes["bundles"]["persistentVolumeClaim"]["claimName"] == "router-bundles"


def test_notes_say_where_the_mtls_certificate_comes_from(kube: KubeControlPlane) -> None:
    # (cert-manager's Certificate cannot be dry-run here: no cert-manager CRDs.)
    base = ["install", "notes", str(CHART), "--namespace", "notes", "--dry-run=server"]
    expected = {
        (): "certificate and CA generated by Helm in Secret notes-tls",
        ("tls.existingSecret=mine",): "certificate from Secret mine.",
        ("tls.enabled=false",): "mTLS between the gateway, the ext_proc and the operator: off",
    }
    for sets, line in expected.items():
        notes = helm(kube, *base, *(a for s in sets for a in ("--set", s)))
        assert line in notes, notes


def test_notes_say_how_to_reach_the_charts_jaeger(kube: KubeControlPlane) -> None:
    base = ["install", "traced", str(CHART), "--namespace", "traced", "--dry-run=server"]
    notes = helm(kube, *base, "--set", "jaeger.enabled=true")
    assert "export OTLP to traced-jaeger.traced.svc:4317" in notes, notes
    assert "kubectl -n traced port-forward svc/traced-jaeger 16686" in notes, notes
    assert "switchyard traces --jaeger http://127.0.0.1:16686" in notes, notes
    elsewhere = helm(
        kube, *base, "--set", "jaeger.enabled=true", "--set", "tracing.otlpEndpoint=otel:4317"
    )
    assert "export OTLP to otel:4317" in elsewhere
    assert "it receives nothing while tracing.otlpEndpoint names another collector" in elsewhere
