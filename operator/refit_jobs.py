"""The operator's side of router refits (``switchyard.operator.refit``): the CronJob of each
policy that refits, Jobs on demand (annotation ``switchyard.dev/refit``), rollbacks
(annotation ``switchyard.dev/rollback``), and finished Jobs turned into the policy's bundle.

Every change of the bundle in force goes through ``Reconciler.upsert``, so it is delivered in
the control plane's usual order (Envoy, then the ext_proc replicas, which hot-swap the bundle),
and ``status.router`` changes only once the data plane serves it. One lock per policy keeps a
rollback and a finished Job from interleaving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import kopf
import kubernetes

from switchyard.operator import k8s, refit
from switchyard.operator.crd import GROUP, PLURAL, VERSION
from switchyard.operator.policy import PolicyError, RoutePolicy, parse_policy

log = logging.getLogger(__name__)
_handled: set[str] = set()
"""Finished Jobs already turned into a status (or found to have been, in it)."""


def _api() -> kubernetes.client.ApiClient:
    return kubernetes.client.ApiClient(k8s._client_config())


def _policy(body: kopf.Body | dict[str, Any]) -> RoutePolicy | None:
    """The policy as the operator serves it (with the bundle in force); None if invalid."""
    document = k8s.policy_document(body)
    try:
        return parse_policy(
            document, f"{document['metadata']['namespace']}/{document['metadata']['name']}"
        )
    except PolicyError:
        return None


def _owner(body: kopf.Body | dict[str, Any]) -> dict[str, Any]:
    meta = body.get("metadata", {})
    return {
        "apiVersion": body["apiVersion"],
        "kind": body["kind"],
        "name": meta["name"],
        "uid": meta.get("uid", ""),
    }


def _keep(policy: RoutePolicy, router: dict[str, Any]) -> list[str]:
    """``policy`` as served (its router bundle is the one in force)."""
    refit_spec = policy.spec.strategy.router.refit
    assert refit_spec is not None
    return refit.kept_bundles(router, refit_spec.keep, policy.spec.strategy.router.bundle)


# --- the CronJob ---------------------------------------------------------------------------
def apply_cron_job(body: kopf.Body | dict[str, Any]) -> None:
    """Create or replace the policy's CronJob, or delete it when it no longer refits."""
    meta = body.get("metadata", {})
    namespace, name = meta.get("namespace", ""), meta.get("name", "")
    settings = k8s.SETTINGS.refit
    if settings.unavailable():
        return
    policy = _policy(body)
    if policy is None:
        return  # invalid: its last good version (and CronJob) stays
    if policy.spec.strategy.router.refit is None:
        delete_cron_job(namespace, name)
        return
    manifest = refit.cron_job(
        policy, settings, _keep(policy, refit.router_status(dict(body))), _owner(body)
    )
    batch = kubernetes.client.BatchV1Api(_api())
    k8s._upsert(
        manifest,
        batch.read_namespaced_cron_job,
        batch.create_namespaced_cron_job,
        batch.replace_namespaced_cron_job,
    )


def delete_cron_job(namespace: str, name: str) -> None:
    settings = k8s.SETTINGS.refit
    if settings.unavailable():
        return
    batch = kubernetes.client.BatchV1Api(_api())
    try:
        batch.delete_namespaced_cron_job(
            refit.cron_job_name(namespace, name),
            settings.namespace,
            propagation_policy="Background",
        )
    except kubernetes.client.ApiException as error:
        if error.status != 404:
            raise


# --- annotations ---------------------------------------------------------------------------
def _claim(namespace: str, name: str, annotation: str, value: str) -> bool:
    """Remove the annotation if it still has ``value``: only one handler acts on a request
    (a JSON patch's test fails for the others)."""
    api = kubernetes.client.CustomObjectsApi(_api())
    path = "/metadata/annotations/" + annotation.replace("~", "~0").replace("/", "~1")
    try:
        api.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            [{"op": "test", "path": path, "value": value}, {"op": "remove", "path": path}],
            _content_type="application/json-patch+json",
        )
    except kubernetes.client.ApiException as error:
        if error.status in (404, 409, 422):
            return False
        raise
    return True


def _patch_router(
    namespace: str, name: str, router: dict[str, Any], extra: dict[str, Any] | None = None
) -> None:
    api = kubernetes.client.CustomObjectsApi(_api())
    api.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, name, {"status": {"router": router, **(extra or {})}}
    )


def _read(namespace: str, name: str) -> dict[str, Any] | None:
    api = kubernetes.client.CustomObjectsApi(_api())
    try:
        body: Any = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except kubernetes.client.ApiException as error:
        if error.status == 404:
            return None
        raise
    return dict(body)


def _conditions_with_refit(body: dict[str, Any], router: dict[str, Any]) -> list[dict[str, Any]]:
    """The policy's conditions with its RouterFit condition brought up to date."""
    generation = body["metadata"].get("generation", 0)
    kept = [
        c
        for c in (body.get("status") or {}).get("conditions") or []
        if c.get("type") != refit.CONDITION
    ]
    return kept + k8s._conditions(k8s.refit_conditions(body, router), generation)


def _start_job(body: dict[str, Any]) -> str:
    """Create a refit Job now; returns its name (raises ValueError when it cannot run)."""
    settings = k8s.SETTINGS.refit
    unavailable = settings.unavailable()
    if unavailable:
        raise ValueError(unavailable)
    policy = _policy(body)
    if policy is None or policy.spec.strategy.router.refit is None:
        raise ValueError("the policy has no valid spec.strategy.router.refit")
    router = refit.router_status(body)
    running = (router.get("lastAttempt") or {}).get("job", "")
    if (router.get("lastAttempt") or {}).get("result") == "Running" and _unfinished(running):
        raise ValueError(f"refit Job {running} is still running")
    manifest = refit.job(policy, settings, _keep(policy, router), _owner(body), int(time.time()))
    job: Any = manifest  # the client takes a plain dict as the body
    kubernetes.client.BatchV1Api(_api()).create_namespaced_job(settings.namespace, job)
    job_name = str(manifest["metadata"]["name"])
    router["lastAttempt"] = {
        "job": job_name,
        "time": refit.now(),
        "result": "Running",
        "message": "started on demand (annotation switchyard.dev/refit)",
    }
    meta = body["metadata"]
    _patch_router(
        meta["namespace"],
        meta["name"],
        router,
        {"conditions": _conditions_with_refit(body, router)},
    )
    return job_name


def _unfinished(job_name: str) -> bool:
    batch = kubernetes.client.BatchV1Api(_api())
    try:
        job: Any = batch.read_namespaced_job(job_name, k8s.SETTINGS.refit.namespace)
    except kubernetes.client.ApiException as error:
        if error.status == 404:
            return False
        raise
    return refit.job_finished(_api().sanitize_for_serialization(job)) is None  # type: ignore[no-untyped-call]


def _wants(annotation: str) -> Any:
    def check(annotations: kopf.Annotations, **_: Any) -> bool:
        return annotation in annotations

    return check


@kopf.on.event(GROUP, VERSION, PLURAL, when=_wants(refit.REFIT_ANNOTATION))
async def refit_now(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    """``kubectl annotate routepolicy NAME switchyard.dev/refit=now``: run a refit Job now."""
    if event["type"] == "DELETED":
        return
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    value = meta["annotations"][refit.REFIT_ANNOTATION]
    async with refit.LOCKS[f"{namespace}/{name}"]:
        if not await asyncio.to_thread(_claim, namespace, name, refit.REFIT_ANNOTATION, value):
            return
        current = await asyncio.to_thread(_read, namespace, name)
        if current is None:
            return
        try:
            job_name = await asyncio.to_thread(_start_job, current)
        except ValueError as error:
            kopf.warn(body, reason="RefitNotStarted", message=str(error))
            return
        kopf.event(body, type="Normal", reason="RefitStarted", message=f"Job {job_name}")
        log.info("%s/%s: refit Job %s started", namespace, name, job_name)


@kopf.on.event(GROUP, VERSION, PLURAL, when=_wants(refit.ROLLBACK_ANNOTATION))
async def roll_back(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    """``kubectl annotate routepolicy NAME switchyard.dev/rollback=previous`` (or a bundle of
    status.router.previousBundles): serve that bundle again."""
    if event["type"] == "DELETED":
        return
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    value = meta["annotations"][refit.ROLLBACK_ANNOTATION]
    async with refit.LOCKS[f"{namespace}/{name}"]:
        if not await asyncio.to_thread(_claim, namespace, name, refit.ROLLBACK_ANNOTATION, value):
            return
        current = await asyncio.to_thread(_read, namespace, name)
        if current is None:
            return
        router = refit.router_status(current)
        spec_bundle = ((current["spec"].get("strategy") or {}).get("router") or {}).get(
            "bundle", "builtin:default"
        )
        try:
            if not ((current["spec"].get("strategy") or {}).get("router") or {}).get("refit"):
                raise ValueError("the policy does not refit (spec.strategy.router.refit)")
            target = refit.rollback_target(router, spec_bundle, value)
        except ValueError as error:
            kopf.warn(body, reason="RollbackRefused", message=str(error))
            return
        served = await _serve(current, refit.after_rollback(router, target))
        if served:
            kopf.event(body, type="Normal", reason="RolledBack", message=f"router bundle {target}")
        else:
            kopf.warn(body, reason="RollbackNotServed", message=f"bundle {target} not served")


async def _serve(body: dict[str, Any], router: dict[str, Any]) -> bool:
    """Publish the policy with ``router``'s bundle; write ``router`` (and the resulting
    conditions) to its status once the data plane serves it. Returns whether it does."""
    meta = body["metadata"]
    document = refit.with_effective_bundle(k8s.policy_document(body), router)
    outcome = await k8s._reconciler().upsert(document)
    served = outcome.conditions[0].status == "True"
    if not served:
        # The data plane refused it (the reconciler serves the previous bundle again).
        router = {
            **refit.router_status(body),
            "lastAttempt": {
                **(router.get("lastAttempt") or {}),
                "result": "NotServed",
                "message": f"bundle {router.get('activeBundle')} was not served: "
                f"{outcome.conditions[0].message}"[: refit.MAX_MESSAGE],
            },
        }
    status = k8s._status(outcome, meta.get("generation", 0), body)
    status["conditions"] = k8s._conditions(
        outcome.conditions + k8s.refit_conditions(body, router), meta.get("generation", 0)
    )
    await asyncio.to_thread(_patch_router, meta["namespace"], meta["name"], router, status)
    if served:
        await asyncio.to_thread(apply_cron_job, {**body, "status": {"router": router}})
    return served


# --- finished Jobs -------------------------------------------------------------------------
def _termination_message(job_name: str) -> str:
    """The fit container's termination message (its --summary), "" if none is left."""
    core = kubernetes.client.CoreV1Api(_api())
    pods = core.list_namespaced_pod(
        k8s.SETTINGS.refit.namespace, label_selector=f"{refit.JOB_NAME_LABEL}={job_name}"
    )
    for pod in pods.items:
        for status in (pod.status.container_statuses or []) if pod.status else []:
            terminated = status.state.terminated if status.state else None
            if terminated is not None and terminated.message:
                return str(terminated.message)
    return ""


def _mark_handled(job_name: str) -> None:
    """Label the Job as turned into its policy's status, so it is never read again (also by
    a restarted operator: an older Job must not override a newer one's bundle)."""
    _handled.add(job_name)
    batch = kubernetes.client.BatchV1Api(_api())
    patch: Any = {"metadata": {"labels": {refit.HANDLED_LABEL: "true"}}}
    try:
        batch.patch_namespaced_job(job_name, k8s.SETTINGS.refit.namespace, patch)
    except kubernetes.client.ApiException as error:
        if error.status != 404:
            raise


async def finish(job: dict[str, Any]) -> None:
    """A refit Job ended: make its bundle the policy's, or say why not."""
    meta = job["metadata"]
    job_name = meta["name"]
    succeeded = refit.job_finished(job)
    key = (meta.get("annotations") or {}).get(refit.POLICY_ANNOTATION, "")
    if succeeded is None:
        return
    if "/" not in key:
        await asyncio.to_thread(_mark_handled, job_name)
        return
    namespace, name = key.split("/", 1)
    async with refit.LOCKS[key]:
        body = await asyncio.to_thread(_read, namespace, name)
        policy = _policy(body) if body is not None else None
        if body is None or policy is None or policy.spec.strategy.router.refit is None:
            await asyncio.to_thread(_mark_handled, job_name)  # nothing to do any more
            return
        router = refit.router_status(body)
        message = await asyncio.to_thread(_termination_message, job_name)
        report = refit.FitReport(
            job_name, succeeded, refit.parse_summary(message) if message else {}
        )
        root = refit.bundle_root(k8s.SETTINGS.refit, namespace, name)
        bundle = refit.fitted_bundle(report, root) if report.result == "Fitted" else ""
        if bundle:
            served = policy.spec.strategy.router
            keep = policy.spec.strategy.router.refit.keep
            await _serve(body, refit.after_fit(router, report, bundle, keep, served.bundle))
        else:
            why = "" if report.result != "Fitted" else f"the Job reported no bundle under {root}"
            result = report.result if not why else "FitFailed"
            router["lastAttempt"] = refit.attempt(report, result, why)
            await asyncio.to_thread(
                _patch_router,
                namespace,
                name,
                router,
                {"conditions": _conditions_with_refit(body, router)},
            )
        await asyncio.to_thread(_mark_handled, job_name)
        log.info("%s: refit Job %s ended: %s", key, job_name, report.result)


def _finished_jobs() -> list[dict[str, Any]]:
    """Refit Jobs that ended and were not handled yet, oldest first (the newest wins)."""
    api = kubernetes.client.CustomObjectsApi(_api())
    selector = f"{refit.POLICY_LABEL},!{refit.HANDLED_LABEL}"
    jobs: Any = api.list_namespaced_custom_object(
        "batch", "v1", k8s.SETTINGS.refit.namespace, "jobs", label_selector=selector
    )
    finished = [
        job
        for job in jobs["items"]
        if job["metadata"]["name"] not in _handled and refit.job_finished(job) is not None
    ]
    return sorted(finished, key=lambda j: j["metadata"].get("creationTimestamp", ""))


async def follow_jobs(interval_s: float) -> None:
    """Every ``interval_s``: turn refit Jobs that ended into their policies' status."""
    while True:
        try:
            for job in await asyncio.to_thread(_finished_jobs):
                await finish(job)
        except Exception:  # the API server may be away for a while: try again later
            log.exception("following refit Jobs")
        await asyncio.sleep(interval_s)
