"""The kopf operator: watches RoutePolicies and programs Envoy (ADS) and the ext_procs.

Run with `switchyard operator`. One process serves ADS and the config stream on
``--xds-listen``; gateway Envoys and ext_proc replicas connect to it.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import logging
import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import kopf
import kubernetes
import yaml
from kopf._core.engines.peering import Identity

from switchyard.operator import refit
from switchyard.operator.autoscaling import (
    ScaleTarget,
    effective_autoscaling,
    horizontal_pod_autoscaler,
    pod_disruption_budget,
)
from switchyard.operator.clientkeys import hash_key
from switchyard.operator.control_plane import ControlPlane
from switchyard.operator.crd import CLIENT_KEYS_PLURAL, GROUP, PLURAL, VERSION
from switchyard.operator.envoy_config import GatewaySettings, system_ca_file
from switchyard.operator.envoy_tls import EnvoyMtls
from switchyard.operator.keyring import KeysVerdict, secret_refs
from switchyard.operator.metrics import MetricsServer
from switchyard.operator.multicluster import (
    CLUSTER_LABEL,
    KUBECONFIG_KEY,
    REGION_LABEL,
    SERVICE_LABEL,
    EndpointDirectory,
    EndpointSliceWatch,
    RemoteCluster,
    RemoteClusterWatch,
)
from switchyard.operator.policy import Autoscaling, RoutePolicy
from switchyard.operator.reconciler import Condition, ModelEndpoints, Outcome, Reconciler
from switchyard.operator.refit import RefitSettings
from switchyard.operator.spend import SpendFollower
from switchyard.tls import TlsFiles

log = logging.getLogger(__name__)


@dataclass
class OperatorSettings:
    xds_listen: str = "0.0.0.0:18000"
    gateway_port: int = 8080
    extproc_endpoints: list[tuple[str, int]] = field(default_factory=lambda: [("127.0.0.1", 9002)])
    namespaces: list[str] = field(default_factory=list)
    fail_open_model: str = ""
    # Where the gateway and ext_proc Deployments run (HPA and PDB go there); "" skips them.
    data_plane_namespace: str = ""
    gateway_deployment: str = "switchyard-gateway"
    extproc_deployment: str = "switchyard-extproc"
    default_autoscaling: Autoscaling = field(default_factory=Autoscaling)
    # This cluster, for multi-cluster placement: models prefer it unless they name another.
    cluster_name: str = "local"
    region: str = ""
    # System CA bundle on the gateway Envoy's filesystem ("" = the path found here).
    upstream_ca_file: str = ""
    # The ext_proc Service in ``data_plane_namespace``: its ready pods go to Envoy over EDS
    # ("" = the fixed ``extproc_endpoints``).
    extproc_service: str = ""
    extproc_port: int = 9002
    # Worker processes per ext_proc pod; worker i listens on extproc_port + i.
    extproc_workers: int = 1
    # host:port of kopf's liveness endpoint (GET /healthz); "" = none.
    health_listen: str = ""
    # host:port of the Prometheus endpoint (GET /metrics, operator/metrics.py); "" = none.
    metrics_listen: str = ""
    # OpenTelemetry traces from the gateway Envoy (operator/tracing.py); "" = none.
    otlp_endpoint: str = ""
    trace_sampling: float = 1.0
    trace_service_name: str = "switchyard"
    # mTLS (switchyard/tls.py): the operator's certificate directory ("" = plaintext), where
    # the gateway Envoy finds its SDS files, and the name the ext_proc's certificate carries.
    tls_dir: str = ""
    gateway_sds_dir: str = "/etc/envoy"
    extproc_server_name: str = ""
    # Router refits (operator/refit.py): where their Jobs run and what they mount, and how
    # often finished Jobs are looked for.
    refit: RefitSettings = field(default_factory=RefitSettings)
    refit_poll_s: float = 15.0
    # How often the ClientKeys spend status is read from Redis (operator/spend.py); 0 = never.
    spend_interval_s: float = 15.0

    def extproc_tls(self) -> EnvoyMtls | None:
        """How the gateway reaches the ext_proc over mTLS; None without ``tls_dir``."""
        if not self.tls_dir:
            return None
        name = self.extproc_server_name or "localhost"
        if not self.extproc_server_name and self.extproc_service:
            name = f"{self.extproc_service}.{self.data_plane_namespace}.svc"
        return EnvoyMtls(sds_dir=self.gateway_sds_dir, server_name=name)


SETTINGS = OperatorSettings()
_state: dict[str, Any] = {}


def _reconciler() -> Reconciler:
    return _state["reconciler"]  # type: ignore[no-any-return]


@kopf.on.startup()
async def _start(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.posting.level = logging.WARNING
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    plane = ControlPlane(
        api_keys=cached_api_key,
        settings=GatewaySettings(
            listen_address="0.0.0.0",
            listen_port=SETTINGS.gateway_port,
            extproc_endpoints=SETTINGS.extproc_endpoints,
            extproc_eds=bool(SETTINGS.extproc_service),
            system_ca_file=SETTINGS.upstream_ca_file or system_ca_file(),
            otlp_endpoint=SETTINGS.otlp_endpoint,
            trace_sampling=SETTINGS.trace_sampling,
            trace_service_name=SETTINGS.trace_service_name,
            extproc_tls=SETTINGS.extproc_tls(),
        ),
    )
    directory = EndpointDirectory(SETTINGS.cluster_name, SETTINGS.region)
    _state["directory"] = directory
    _state["remotes"] = {}
    _state["reported"] = {}
    _state["refresh"] = Coalesced(_refresh_endpoints)
    _state["reconciler"] = reconciler = Reconciler(
        plane, SETTINGS.fail_open_model, directory.endpoints, lambda: directory.topology
    )
    if SETTINGS.extproc_service:
        _state["extproc_watch"] = _watch_extproc_pods(plane)
    # An ext_proc ACK may change which policies it serves (it connected or restarted after
    # their reconcile); their status follows.
    verdicts = Coalesced(_report_data_plane)
    plane.stream.on_policy_errors = lambda *_: verdicts.trigger()
    # The policies that already exist are compiled and published once, before Envoy or an
    # ext_proc can connect: a restarted operator never serves them a partial or empty table.
    # So are the client keys: never a moment without them once a ClientKeys resource exists.
    key_documents = await asyncio.to_thread(_existing_client_keys)
    for document in key_documents:
        await asyncio.to_thread(load_key_hashes, document["metadata"]["namespace"], document)
    reconciler.restore_client_keys(
        key_documents,
        {d["metadata"]["namespace"]: _hashes(d["metadata"]["namespace"]) for d in key_documents},
    )
    documents = await asyncio.to_thread(_existing_policies)
    for document in documents:
        await asyncio.to_thread(load_api_keys, document["metadata"]["namespace"], document["spec"])
    await reconciler.restore(documents)
    if SETTINGS.metrics_listen:
        _state["metrics"] = MetricsServer(plane.metrics, SETTINGS.metrics_listen)
        await _state["metrics"].start()
    tls = TlsFiles.from_dir(SETTINGS.tls_dir) if SETTINGS.tls_dir else None
    port = await plane.start(SETTINGS.xds_listen, tls)
    log.info("xDS and config stream on port %d; %d policies restored", port, len(documents))
    if SETTINGS.spend_interval_s > 0:
        follower = SpendFollower(
            lambda: _reconciler().client_keys,
            _patch_spend,
            SETTINGS.spend_interval_s,
            reads=plane.metrics.spend_reads,
        )
        _state["spend"] = asyncio.get_running_loop().create_task(follower.run())
    if not SETTINGS.refit.unavailable():
        from switchyard.operator import refit_jobs

        _state["refit_jobs"] = asyncio.get_running_loop().create_task(
            refit_jobs.follow_jobs(SETTINGS.refit_poll_s)
        )


def _watch_extproc_pods(plane: ControlPlane) -> EndpointSliceWatch:
    """Follow the ext_proc Service's EndpointSlices and push its ready pods over EDS."""
    namespace, service = SETTINGS.data_plane_namespace, SETTINGS.extproc_service
    pods = EndpointDirectory("extproc")

    async def push() -> None:
        first = SETTINGS.extproc_port
        found = [
            (e.address, e.port)
            for port in range(first, first + SETTINGS.extproc_workers)
            for e in pods.endpoints(namespace, service, port)
        ]
        await plane.set_extproc_endpoints(found)
        log.info("ext_proc endpoints of %s/%s: %d", namespace, service, len(found))

    watch = EndpointSliceWatch(
        "extproc",
        "",
        lambda: kubernetes.client.ApiClient(_client_config()),
        pods,
        Coalesced(push).trigger,
        asyncio.get_running_loop(),
        namespace=namespace,
        label_selector=f"{SERVICE_LABEL}={service}",
    )
    watch.start()
    return watch


@kopf.on.cleanup()
async def _stop(**_: Any) -> None:
    for watch in _state["remotes"].values():
        watch.stop()
    if "extproc_watch" in _state:
        _state["extproc_watch"].stop()
    if "refit_jobs" in _state:
        _state["refit_jobs"].cancel()
    if "spend" in _state:
        _state["spend"].cancel()
    await _reconciler().plane.stop()
    if "metrics" in _state:
        await _state["metrics"].stop()


def policy_document(body: kopf.Body | dict[str, Any]) -> dict[str, Any]:
    """The parts of a RoutePolicy object the reconciler reads; a policy that refits its router
    reads the fitted bundle in force (``status.router.activeBundle``) in place of the spec's."""
    meta = body.get("metadata", {})
    document = {
        "apiVersion": body["apiVersion"],
        "kind": body["kind"],
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "generation": meta.get("generation", 0),
        },
        "spec": dict(body.get("spec") or {}),
    }
    return refit.with_effective_bundle(document, refit.router_status(dict(body)))


def _existing_policies() -> list[dict[str, Any]]:
    """Every RoutePolicy the operator serves, as it is now in the API server."""
    api = kubernetes.client.CustomObjectsApi(kubernetes.client.ApiClient(_client_config()))
    listings: list[Any]
    if SETTINGS.namespaces:
        listings = [
            api.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
            for namespace in SETTINGS.namespaces
        ]
    else:
        listings = [api.list_cluster_custom_object(GROUP, VERSION, PLURAL)]
    return [policy_document(item) for listing in listings for item in listing["items"]]


class Coalesced:
    """Runs an async function after ``trigger()``; triggers during a run cause one more run."""

    def __init__(self, run: Callable[[], Any]) -> None:
        self._run = run
        self._dirty = False
        self._task: asyncio.Task[None] | None = None

    def trigger(self) -> None:
        self._dirty = True
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        try:
            while self._dirty:
                self._dirty = False
                await self._run()
        finally:
            self._task = None


def _models_status(counts: dict[str, ModelEndpoints]) -> list[dict[str, Any]]:
    return [
        {"name": name, "endpoints": c.total, **({"clusters": c.clusters} if c.clusters else {})}
        for name, c in counts.items()
    ]


def _conditions(conditions: list[Condition], generation: int) -> list[dict[str, Any]]:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return [
        {
            "type": c.type,
            "status": c.status,
            "reason": c.reason,
            "message": c.message[:4000],
            "lastTransitionTime": now,
            "observedGeneration": generation,
        }
        for c in conditions
    ]


def _status(
    outcome: Outcome, generation: int, body: kopf.Body | dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "observedGeneration": generation,
        "modelCount": outcome.model_count,
        "configVersion": outcome.config_version,
        "models": _models_status(outcome.endpoints or {}),
        "conditions": _conditions(outcome.conditions + refit_conditions(body), generation),
    }


def refit_conditions(
    body: kopf.Body | dict[str, Any] | None, router: dict[str, Any] | None = None
) -> list[Condition]:
    """The RouterFit condition of a policy that refits its router (``router``: its
    status.router, when not the body's)."""
    if body is None:
        return []
    spec = body.get("spec") or {}
    wanted = ((spec.get("strategy") or {}).get("router") or {}).get("refit")
    if router is None:
        router = refit.router_status(dict(body))
    found = refit.condition(wanted, router, SETTINGS.refit.unavailable())
    return [found] if found is not None else []


async def _report_data_plane() -> None:
    """Write the conditions of policies whose data-plane verdict changed."""
    for key, conditions in _reconciler().data_plane_changes().items():
        namespace, name = key.split("/", 1)
        await asyncio.to_thread(_patch_conditions, namespace, name, conditions)


def _patch_conditions(namespace: str, name: str, conditions: list[Condition]) -> None:
    """Status conditions, and a Warning Event when not Ready (as kopf.warn posts from a
    handler; this runs outside one)."""
    client = kubernetes.client.ApiClient(_client_config())
    api = kubernetes.client.CustomObjectsApi(client)
    try:
        body: dict[str, Any] = api.get_namespaced_custom_object(  # type: ignore[assignment]
            GROUP, VERSION, namespace, PLURAL, name
        )
        conditions = conditions + refit_conditions(body)
        status = {"conditions": _conditions(conditions, body["metadata"].get("generation", 0))}
        api.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, {"status": status}
        )
        ready = conditions[0]
        if ready.status != "True":
            now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            ref = {k: body["metadata"][k] for k in ("name", "namespace", "uid")}
            event: Any = {  # the client takes a plain dict as the body
                "metadata": {"generateName": f"{name}.", "namespace": namespace},
                "involvedObject": {"apiVersion": body["apiVersion"], "kind": body["kind"], **ref},
                "reason": ready.reason,
                "message": ready.message[:1000],
                "type": "Warning",
                "source": {"component": "switchyard-operator"},
                "firstTimestamp": now,
                "lastTimestamp": now,
                "count": 1,
            }
            kubernetes.client.CoreV1Api(client).create_namespaced_event(namespace, event)
    except kubernetes.client.ApiException as error:
        log.warning("cannot report on %s/%s: %s", namespace, name, error.reason)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")  # type: ignore[arg-type]
async def reconcile(
    body: kopf.Body, meta: kopf.Meta, patch: kopf.Patch, logger: logging.Logger, **_: Any
) -> None:
    """Validate and publish one policy, then write its status."""
    current: kopf.Body | dict[str, Any] = body
    async with refit.LOCKS[f"{meta['namespace']}/{meta['name']}"]:
        if refit.refits(dict(body.get("spec") or {})):
            # A refit may have changed the bundle in force since this event's snapshot.
            router = await asyncio.to_thread(_router_now, meta, refit.router_status(dict(body)))
            current = {**body, "status": {"router": router}}
        document = policy_document(current)
        await asyncio.to_thread(load_api_keys, meta["namespace"], document["spec"])
        outcome = await _reconciler().upsert(document)
        patch.status.update(_status(outcome, meta.get("generation", 0), current))
        await asyncio.to_thread(apply_refit, current)
    if outcome.endpoints is not None:
        _state["reported"][(meta["namespace"], meta["name"])] = outcome.endpoints
    await asyncio.to_thread(apply_scaling, _reconciler().policies.values())
    ready = outcome.conditions[0]
    if ready.status != "True":
        kopf.warn(body, reason=ready.reason, message=ready.message[:1000])
        logger.warning("%s/%s: %s", meta["namespace"], meta["name"], ready.message)


@kopf.on.event("discovery.k8s.io", "v1", "endpointslices")
async def endpoint_slice(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    """Track this cluster's ready endpoints per Service."""
    directory: EndpointDirectory = _state["directory"]
    if directory.apply(directory.local_cluster, event["type"] or "", body):
        _state["refresh"].trigger()


@kopf.on.event("", "v1", "secrets", labels={CLUSTER_LABEL: kopf.PRESENT})
async def remote_cluster(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    """A kubeconfig Secret labelled ``switchyard.dev/cluster=<name>``: watch that cluster's
    EndpointSlices (its contents never reach logs, events or status)."""
    meta = body.get("metadata", {})
    labels = meta.get("labels") or {}
    key = (meta.get("namespace", ""), meta.get("name", ""))
    remotes: dict[tuple[str, str], RemoteClusterWatch] = _state["remotes"]
    directory: EndpointDirectory = _state["directory"]
    current = remotes.get(key)
    remote = None
    if event["type"] != "DELETED":
        raw = (body.get("data") or {}).get(KUBECONFIG_KEY)
        try:
            kubeconfig = yaml.safe_load(base64.b64decode(raw)) if raw else None
        except (ValueError, yaml.YAMLError):
            kubeconfig = None
        if not isinstance(kubeconfig, dict):
            log.warning("Secret %s/%s: no usable %r key", *key, KUBECONFIG_KEY)
        else:
            remote = RemoteCluster(labels[CLUSTER_LABEL], labels.get(REGION_LABEL, ""), kubeconfig)
    if current is not None and remote == current.remote:
        return
    if current is not None:
        current.stop()
        del remotes[key]
        directory.drop_cluster(current.remote.name)
        _state["refresh"].trigger()
    if remote is not None:
        watch = RemoteClusterWatch(
            remote, directory, _state["refresh"].trigger, asyncio.get_running_loop()
        )
        remotes[key] = watch
        watch.start()
        log.info(
            "remote cluster %s (region %r) from Secret %s/%s", remote.name, remote.region, *key
        )


async def _refresh_endpoints() -> None:
    """Republish after endpoint changes, then update the endpoint counts in changed statuses."""
    reconciler = _reconciler()
    if not await reconciler.refresh_endpoints():
        return
    reported: dict[tuple[str, str], dict[str, ModelEndpoints]] = _state["reported"]
    for key, counts in reconciler.endpoint_counts().items():
        if reported.get(key) != counts:
            reported[key] = counts
            await asyncio.to_thread(_patch_models_status, *key, _models_status(counts))


def _patch_models_status(namespace: str, name: str, models: list[dict[str, Any]]) -> None:
    api = kubernetes.client.CustomObjectsApi(kubernetes.client.ApiClient(_client_config()))
    try:
        api.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, {"status": {"models": models}}
        )
    except kubernetes.client.ApiException as error:
        log.warning("cannot update status of %s/%s: %s", namespace, name, error.reason)


# Deletions are read from the watch, with no finalizer, so a policy never gets stuck when the
# operator is gone (uninstalled); one deleted while it is down is simply not among those it
# restores at start-up.
@kopf.on.event(GROUP, VERSION, PLURAL)
async def forget(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    if event["type"] != "DELETED":
        return
    meta = body.get("metadata", {})
    await _reconciler().delete(meta.get("namespace", ""), meta.get("name", ""))
    await asyncio.to_thread(apply_scaling, _reconciler().policies.values())
    await asyncio.to_thread(delete_refit, meta.get("namespace", ""), meta.get("name", ""))


def _router_now(meta: kopf.Meta, fallback: dict[str, Any]) -> dict[str, Any]:
    """status.router as the API server has it now (``fallback`` if it cannot be read)."""
    api = kubernetes.client.CustomObjectsApi(kubernetes.client.ApiClient(_client_config()))
    try:
        body = api.get_namespaced_custom_object(
            GROUP, VERSION, meta["namespace"], PLURAL, meta["name"]
        )
    except kubernetes.client.ApiException as error:
        log.warning("cannot read %s/%s: %s", meta["namespace"], meta["name"], error.reason)
        return fallback
    return refit.router_status(body)  # type: ignore[arg-type]


def apply_refit(body: kopf.Body | dict[str, Any]) -> None:
    """Create, update or delete the policy's refit CronJob to match its spec and status."""
    from switchyard.operator import refit_jobs

    try:
        refit_jobs.apply_cron_job(body)
    except kubernetes.client.ApiException as error:  # the policy itself is served regardless
        meta = body.get("metadata", {})
        log.warning("cannot apply the refit CronJob of %s/%s: %s", meta.get("namespace"),
                    meta.get("name"), error.reason)  # fmt: skip


def delete_refit(namespace: str, name: str) -> None:
    """The policy is gone: its CronJob goes too (owner references cannot cross namespaces)."""
    from switchyard.operator import refit_jobs

    refit_jobs.delete_cron_job(namespace, name)


_api_keys: dict[tuple[str, str, str], str] = {}


def cached_api_key(namespace: str, secret: str, key: str) -> str | None:
    """The API key read for (namespace, Secret, key); it only ever goes into Envoy's routes."""
    return _api_keys.get((namespace, secret, key))


def _secret_refs(namespace: str, name: str) -> set[tuple[str, str, str]]:
    """(namespace, Secret, key) of every API key the policies read from this Secret."""
    return {
        (namespace, name, model.backend.api_key_secret.key)
        for policy in _reconciler().policies.values()
        if policy.metadata.namespace == namespace
        for model in policy.spec.models
        if model.backend.api_key_secret is not None and model.backend.api_key_secret.name == name
    }


def _referenced_secret(body: kopf.Body, **_: Any) -> bool:
    meta = body.get("metadata", {})
    return bool(_secret_refs(meta.get("namespace", ""), meta.get("name", "")))


@kopf.on.event("", "v1", "secrets", when=_referenced_secret)
async def api_key_secret(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    """A Secret holding a provider API key changed (rotation) or went: re-push the routes."""
    meta = body.get("metadata", {})
    namespace, name = meta.get("namespace", ""), meta.get("name", "")
    data = {} if event["type"] == "DELETED" else (body.get("data") or {})
    changed = False
    for ref in _secret_refs(namespace, name):
        value = data.get(ref[2])
        new = base64.b64decode(value).decode() if value is not None else None
        if _api_keys.get(ref) != new:
            changed = True
            if new is None:
                _api_keys.pop(ref, None)
            else:
                _api_keys[ref] = new
    if changed:
        log.info("Secret %s/%s changed; re-pushing routes", namespace, name)
        await _reconciler().republish()


def load_api_keys(namespace: str, spec: dict[str, Any]) -> None:
    """Read the Secrets a policy's models reference (never logged, never in status)."""
    api = kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(_client_config()))
    for model in spec.get("models") or []:
        ref = (model.get("backend") or {}).get("apiKeySecret")
        if not ref:
            continue
        try:
            secret = api.read_namespaced_secret(ref["name"], namespace)
        except kubernetes.client.ApiException as error:
            log.warning("cannot read Secret %s/%s: %s", namespace, ref["name"], error.reason)
            continue
        value = (secret.data or {}).get(ref["key"])
        if value is not None:
            _api_keys[(namespace, ref["name"], ref["key"])] = base64.b64decode(value).decode()


# --- ClientKeys: tenants and client API keys (keyring.py judges them; here only I/O) ---------

_key_hashes: dict[tuple[str, str, str], str] = {}
"""(namespace, Secret, key) → SHA-256 of the client key it holds; the key itself is dropped
as soon as it is hashed (never cached, logged, or written to a status or Event)."""


def _hashes(namespace: str) -> dict[tuple[str, str], str]:
    return {(s, k): h for (ns, s, k), h in _key_hashes.items() if ns == namespace}


def _hash_value(raw: str | bytes | None) -> str | None:
    """SHA-256 of a Secret's base64 value with surrounding whitespace stripped (the gateway
    strips the presented key too); None when absent, empty or not UTF-8 text."""
    if raw is None:
        return None
    try:
        text = base64.b64decode(raw).decode().strip()
    except ValueError:  # bad base64, or not UTF-8 (UnicodeDecodeError)
        return None
    return hash_key(text) if text else None


def load_key_hashes(namespace: str, document: dict[str, Any]) -> None:
    """Read and hash the Secrets a ClientKeys document references."""
    api = kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(_client_config()))
    for secret_name, key in secret_refs(document):
        ref = (namespace, secret_name, key)
        try:
            secret = api.read_namespaced_secret(secret_name, namespace)
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                _key_hashes.pop(ref, None)
            else:
                log.warning("cannot read Secret %s/%s: %s", namespace, secret_name, error.reason)
            continue
        digest = _hash_value((secret.data or {}).get(key))
        if digest is None:
            _key_hashes.pop(ref, None)
        else:
            _key_hashes[ref] = digest


def _existing_client_keys() -> list[dict[str, Any]]:
    """Every ClientKeys resource the operator serves; none when its CRD is not installed."""
    api = kubernetes.client.CustomObjectsApi(kubernetes.client.ApiClient(_client_config()))
    try:
        if SETTINGS.namespaces:
            listings: list[Any] = [
                api.list_namespaced_custom_object(GROUP, VERSION, ns, CLIENT_KEYS_PLURAL)
                for ns in SETTINGS.namespaces
            ]
        else:
            listings = [api.list_cluster_custom_object(GROUP, VERSION, CLIENT_KEYS_PLURAL)]
    except kubernetes.client.ApiException as error:
        if error.status != 404:
            raise
        log.warning("the ClientKeys CRD is not installed: client keys are off")
        return []
    return [policy_document(item) for listing in listings for item in listing["items"]]


def _keys_status(verdict: KeysVerdict, version: str, generation: int) -> dict[str, Any]:
    ready = Condition(
        "Ready", "True" if verdict.ready else "False", verdict.reason, verdict.message
    )
    return {
        "observedGeneration": generation,
        "configVersion": version,
        "tenantCount": verdict.tenant_count,
        "keyCount": verdict.key_count,
        "activeKeys": verdict.active_keys,
        "conditions": _conditions([ready], generation),
    }


@kopf.on.resume(GROUP, VERSION, CLIENT_KEYS_PLURAL)
@kopf.on.create(GROUP, VERSION, CLIENT_KEYS_PLURAL)
@kopf.on.update(GROUP, VERSION, CLIENT_KEYS_PLURAL, field="spec")  # type: ignore[arg-type]
async def reconcile_client_keys(
    body: kopf.Body, meta: kopf.Meta, patch: kopf.Patch, logger: logging.Logger, **_: Any
) -> None:
    """Judge one ClientKeys resource, publish the keys, then write its status."""
    document = policy_document(body)
    namespace = meta["namespace"]
    await asyncio.to_thread(load_key_hashes, namespace, document)
    verdict, version = await _reconciler().upsert_client_keys(document, _hashes(namespace))
    patch.status.update(_keys_status(verdict, version, meta.get("generation", 0)))
    if not verdict.ready:
        kopf.warn(body, reason=verdict.reason, message=verdict.message[:1000])
        logger.warning("%s/%s: %s", namespace, meta["name"], verdict.message)


@kopf.on.event(GROUP, VERSION, CLIENT_KEYS_PLURAL)
async def forget_client_keys(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    """A deleted ClientKeys resource's keys stop working (read from the watch, no finalizer)."""
    if event["type"] != "DELETED":
        return
    meta = body.get("metadata", {})
    namespace = meta.get("namespace", "")
    await _reconciler().delete_client_keys(namespace, meta.get("name", ""))
    for ref in [r for r in _key_hashes if r[0] == namespace]:
        if not _reconciler().secret_users(namespace, ref[1]):
            del _key_hashes[ref]
    # Those left out for a conflict may have conflicted with this one: judge them again.
    for resource, verdict in list(_reconciler().client_keys.items()):
        document = _reconciler().key_documents.get(resource)
        if verdict.reason == "Conflict" and document is not None:
            await _rejudge(resource, document)


async def _rejudge(resource: str, document: dict[str, Any]) -> None:
    """Judge a ClientKeys resource again outside its handler, and write its status."""
    namespace, name = resource.split("/", 1)
    verdict, version = await _reconciler().upsert_client_keys(document, _hashes(namespace))
    status = _keys_status(verdict, version, document["metadata"].get("generation", 0))
    await asyncio.to_thread(_patch_keys_status, namespace, name, status)


def _client_key_secret(body: kopf.Body, **_: Any) -> bool:
    meta = body.get("metadata", {})
    return bool(_reconciler().secret_users(meta.get("namespace", ""), meta.get("name", "")))


@kopf.on.event("", "v1", "secrets", when=_client_key_secret)
async def client_key_secret(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    """A Secret holding client keys changed (rotation) or went: judge its users again."""
    meta = body.get("metadata", {})
    namespace, name = meta.get("namespace", ""), meta.get("name", "")
    data = {} if event["type"] == "DELETED" else (body.get("data") or {})
    users = _reconciler().secret_users(namespace, name)
    documents = _reconciler().key_documents
    changed = False
    for resource in users:
        for secret_name, key in secret_refs(documents[resource]):
            if secret_name != name:
                continue
            ref, digest = (namespace, name, key), _hash_value(data.get(key))
            if _key_hashes.get(ref) != digest:
                changed = True
                if digest is None:
                    _key_hashes.pop(ref, None)
                else:
                    _key_hashes[ref] = digest
    if not changed:
        return
    log.info("Secret %s/%s changed; client keys of %s judged again", namespace, name, users)
    for resource in users:
        document = documents.get(resource)
        if document is not None:  # not deleted meanwhile
            await _rejudge(resource, document)


def _patch_keys_status(namespace: str, name: str, status: dict[str, Any]) -> bool:
    """Merge ``status`` into the resource's (a null field is removed); False on failure."""
    api = kubernetes.client.CustomObjectsApi(kubernetes.client.ApiClient(_client_config()))
    try:
        api.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, CLIENT_KEYS_PLURAL, name, {"status": status}
        )
    except kubernetes.client.ApiException as error:
        log.warning("cannot update status of ClientKeys %s/%s: %s", namespace, name, error.reason)
        return False
    return True


async def _patch_spend(namespace: str, name: str, status: dict[str, Any]) -> bool:
    return await asyncio.to_thread(_patch_keys_status, namespace, name, status)


def apply_scaling(policies: Iterable[RoutePolicy]) -> None:
    """Create or update the data plane's HPAs and PDBs to match the policies."""
    namespace = SETTINGS.data_plane_namespace
    if not namespace:
        return
    scaling = effective_autoscaling(policies, SETTINGS.default_autoscaling)
    api = kubernetes.client.ApiClient(_client_config())
    hpas = kubernetes.client.AutoscalingV2Api(api)
    pdbs = kubernetes.client.PolicyV1Api(api)
    apps = kubernetes.client.AppsV1Api(api)
    for target in (
        ScaleTarget(SETTINGS.gateway_deployment, "gateway"),
        ScaleTarget(SETTINGS.extproc_deployment, "extproc"),
    ):
        owner = _deployment_owner(apps, target.name, namespace)
        for manifest, read, create, replace in (
            (
                horizontal_pod_autoscaler(target, namespace, scaling),
                hpas.read_namespaced_horizontal_pod_autoscaler,
                hpas.create_namespaced_horizontal_pod_autoscaler,
                hpas.replace_namespaced_horizontal_pod_autoscaler,
            ),
            (
                pod_disruption_budget(target, namespace, scaling),
                pdbs.read_namespaced_pod_disruption_budget,
                pdbs.create_namespaced_pod_disruption_budget,
                pdbs.replace_namespaced_pod_disruption_budget,
            ),
        ):
            if owner:
                manifest["metadata"]["ownerReferences"] = owner
            _upsert(manifest, read, create, replace)


def _deployment_owner(apps: Any, name: str, namespace: str) -> list[dict[str, Any]]:
    """An owner reference to the Deployment an HPA/PDB is for, so they go with it (e.g. on
    ``helm uninstall``); none when the Deployment does not exist (yet)."""
    try:
        deployment = apps.read_namespaced_deployment(name, namespace)
    except kubernetes.client.ApiException as error:
        if error.status not in (403, 404):
            raise
        return []
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": name,
            "uid": deployment.metadata.uid,
        }
    ]


def _upsert(
    manifest: dict[str, Any],
    read: Callable[..., Any],
    create: Callable[..., Any],
    replace: Callable[..., Any],
) -> None:
    name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
    try:
        current = read(name, namespace)
    except kubernetes.client.ApiException as error:
        if error.status != 404:
            raise
        create(namespace, manifest)
        return
    manifest["metadata"]["resourceVersion"] = current.metadata.resource_version
    replace(name, namespace, manifest)


def _client_config() -> kubernetes.client.Configuration:
    config = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=config)  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=config)  # type: ignore[no-untyped-call]
    return config


def run_operator(settings: OperatorSettings) -> int:
    """Run until SIGINT/SIGTERM."""
    global SETTINGS
    SETTINGS = settings
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if settings.extproc_service and not settings.data_plane_namespace:
        raise SystemExit("--extproc-service needs --data-plane-namespace (where it runs)")
    if settings.tls_dir:
        try:
            TlsFiles.from_dir(settings.tls_dir).check()
        except FileNotFoundError as exc:
            raise SystemExit(f"--tls-dir: {exc}") from None
    liveness = f"http://{settings.health_listen}/healthz" if settings.health_listen else None
    from switchyard.operator import refit_jobs  # noqa: F401  (registers its handlers)

    asyncio.run(
        kopf.operator(
            clusterwide=not settings.namespaces,
            namespaces=settings.namespaces,
            standalone=True,
            liveness_endpoint=liveness,
            # Not kopf's default (user@host): a pod may run as a uid with no user name.
            identity=Identity(os.environ.get("POD_NAME") or socket.gethostname()),
        )
    )
    return 0
