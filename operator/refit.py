"""The adaptive-routing loop in Kubernetes: refit a policy's router on the deployment's own
outcomes, in a Job, and make each bundle it writes the policy's router.

A policy with ``spec.strategy.router.refit`` gets a CronJob (and a Job on demand, annotation
``switchyard.dev/refit``) in the data-plane namespace. Its pod runs the ext_proc image's
``switchyard router fit`` on the outcomes volume and writes a new bundle directory under
``<bundles>/<namespace>.<policy>/<UTC time>`` on the bundles volume (writable there, read-only in
the ext_proc pods), then reports what it did as its termination message (``--summary``).

The operator reads that report when the Job ends: a written bundle becomes
``status.router.activeBundle`` (the policy's effective bundle, overriding the spec's), the
bundle it replaces heads ``previousBundles`` (at most ``keep - 1``), and the policy is
republished, so the ext_proc replicas hot-swap to it in the usual apply order. Outcomes too few
to beat the length router leave the bundle in force and say so in the ``RouterFit`` condition.
Annotation ``switchyard.dev/rollback`` (``previous`` or one of ``previousBundles``) restores an
older bundle. Each Job deletes, after writing its bundle, the policy's bundle directories the
status no longer lists.

Everything here is Kubernetes-agnostic (manifests and status as plain dicts) so it is
unit-testable; ``switchyard.operator.k8s`` does the API calls.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from switchyard.operator.policy import Refit, RoutePolicy, check_bundle
from switchyard.operator.reconciler import Condition

REFIT_ANNOTATION = "switchyard.dev/refit"
ROLLBACK_ANNOTATION = "switchyard.dev/rollback"
POLICY_LABEL = "switchyard.dev/refit-policy"
"""On CronJobs and Jobs: ``<namespace>.<policy>`` (a label value; the policy's key)."""
HANDLED_LABEL = "switchyard.dev/refit-handled"
"""Put on a finished Job once the operator has turned it into its policy's status."""
POLICY_ANNOTATION = "switchyard.dev/policy"
"""On CronJobs, Jobs (and their templates): ``<namespace>/<policy>``."""
LOCKS: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
"""Per policy key: held while the bundle in force may change (a reconcile, a finished Job,
a rollback), so they never interleave."""
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
"""Set by the job controller on a Job's pods."""
CONDITION = "RouterFit"
SUMMARY_PATH = "/dev/termination-log"
MAX_MESSAGE = 4096
"""Kubernetes keeps at most this much of a termination message."""

# $1: outcomes directory, $2: the policy's bundle root; the rest goes to `router fit`. The
# bundle's directory is the time the Job ran (a CronJob's template cannot name it).
FIT_SCRIPT = """set -eu
outcomes="$1"; root="$2"; shift 2
mkdir -p "$root"
exec switchyard router fit --outcomes "$outcomes" \
  --out "$root/$(date -u +%Y%m%dT%H%M%SZ)" "$@"
"""
"""What the Job reads: the outcomes volume as a recording directory (the gateway's
``requests-*``/``feedback-*`` files, joined) plus any other ``*.jsonl`` outcome files put there
(``switchyard.training.outcomes.load``)."""


@dataclass(frozen=True)
class RefitSettings:
    """Where refit Jobs run and what they mount (the operator's ``--refit-*`` flags)."""

    namespace: str = ""
    """The data-plane namespace: the outcomes and bundles claims are there."""
    image: str = ""
    pull_policy: str = "IfNotPresent"
    outcomes_claim: str = ""
    bundles_claim: str = ""
    outcomes_dir: str = "/var/lib/switchyard/outcomes"
    bundles_dir: str = "/var/lib/switchyard/bundles"
    """Where the bundles volume is mounted in the Job's pod and the ext_proc pods alike (the
    bundle paths in status are paths there)."""
    resources: dict[str, Any] = field(default_factory=dict)
    deadline_s: int = 3600
    """A fit running longer is stopped (Job activeDeadlineSeconds)."""

    def unavailable(self) -> str:
        """Why refits cannot run here ("" when they can)."""
        missing = [
            what
            for what, value in (
                ("--refit-image", self.image),
                (
                    "--refit-outcomes-claim (Helm: outcomes.volume, a PersistentVolumeClaim)",
                    self.outcomes_claim,
                ),
                ("--refit-bundles-claim (Helm: extproc.bundles.existingClaim)", self.bundles_claim),
                ("--data-plane-namespace", self.namespace),
            )
            if not value
        ]
        return (
            f"refit is not configured on the operator: no {', '.join(missing)}" if missing else ""
        )


def policy_label(namespace: str, name: str) -> str:
    return f"{namespace}.{name}"


def cron_job_name(namespace: str, name: str) -> str:
    """At most 40 characters (a CronJob's Jobs add 11; Job names are label values, <= 63)."""
    base = f"refit-{namespace}-{name}"
    if len(base) <= 40:
        return base
    digest = hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()[:10]
    return f"{base[:29].rstrip('-')}-{digest}"


def bundle_root(settings: RefitSettings, namespace: str, name: str) -> str:
    """The directory holding this policy's fitted bundles."""
    return f"{settings.bundles_dir}/{namespace}.{name}"


# --- status.router -------------------------------------------------------------------------
def router_status(body: dict[str, Any]) -> dict[str, Any]:
    return dict((body.get("status") or {}).get("router") or {})


def refits(spec: dict[str, Any]) -> bool:
    """Whether a policy spec (a plain document) asks for refits."""
    return bool(((spec.get("strategy") or {}).get("router") or {}).get("refit"))


def effective_bundle(spec: dict[str, Any], router: dict[str, Any]) -> str | None:
    """The fitted bundle in force, when the policy refits and one was activated."""
    if not refits(spec):
        return None
    active = router.get("activeBundle")
    return active if isinstance(active, str) and active else None


def with_effective_bundle(document: dict[str, Any], router: dict[str, Any]) -> dict[str, Any]:
    """``document`` (a policy) with its router bundle replaced by the activated fitted one."""
    active = effective_bundle(document.get("spec") or {}, router)
    if active is None:
        return document
    spec = dict(document["spec"])
    strategy = dict(spec["strategy"])
    strategy["router"] = {**strategy["router"], "bundle": active}
    spec["strategy"] = strategy
    return {**document, "spec": spec}


def kept_bundles(router: dict[str, Any], keep: int, in_force: str) -> list[str]:
    """The bundle directories a new fit must not delete: the one in force (``in_force``: the
    active one, or the spec's before the first fit) and the ``keep - 2`` newest previous ones
    (the new bundle makes ``keep``)."""
    return [in_force, *(router.get("previousBundles") or [])][: max(keep - 1, 1)]


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class FitReport:
    """What a finished refit Job did (its summary, or why there is none)."""

    job: str
    succeeded: bool
    summary: dict[str, Any]

    @property
    def result(self) -> str:
        if self.succeeded and self.summary.get("result") == "fitted":
            return "Fitted"
        if self.summary.get("result") == "too-few":
            return "TooFewOutcomes"
        return "FitFailed"

    @property
    def message(self) -> str:
        text = str(self.summary.get("message") or "")
        if self.result == "Fitted":
            return text or f"bundle {self.summary.get('bundle')} written"
        return text or ("the Job failed with no report" if not self.succeeded else "no report")


def parse_summary(message: str) -> dict[str, Any]:
    """A refit pod's termination message: the JSON ``router fit --summary`` wrote, or (a crash
    before it could: the log's tail, FallbackToLogsOnError) that text as the message."""
    try:
        summary = json.loads(message)
    except ValueError:
        return {"result": "error", "message": message.strip()[-1000:]}
    return summary if isinstance(summary, dict) else {"result": "error", "message": message}


def fitted_bundle(report: FitReport, root: str) -> str:
    """The bundle a fitted report names, checked to be a directory of this policy's root
    (the report is the pod's word); "" when it is not."""
    bundle = report.summary.get("bundle")
    if not isinstance(bundle, str) or not bundle.startswith(root + "/"):
        return ""
    if "/" in bundle[len(root) + 1 :]:
        return ""
    try:
        return check_bundle(bundle)
    except ValueError:
        return ""


def after_fit(
    router: dict[str, Any], report: FitReport, bundle: str, keep: int, in_force: str
) -> dict[str, Any]:
    """status.router once a Job's bundle is served: it is active, and the one it replaces
    (``in_force``: the active one, or the spec's after the first fit) heads the rest."""
    previous = [in_force, *(b for b in router.get("previousBundles") or [] if b != in_force)]
    figures = {
        k: report.summary[k]
        for k in ("outcomes", "prompts", "models", "heldOutAPGR", "crossValidatedAPGR")
        if k in report.summary
    }
    return {
        **router,
        "activeBundle": bundle,
        "previousBundles": [b for b in previous if b != bundle][: keep - 1],
        "lastFit": {"job": report.job, "time": now(), "bundle": bundle, **figures},
        "lastAttempt": attempt(report),
    }


def attempt(report: FitReport, result: str = "", message: str = "") -> dict[str, Any]:
    return {
        "job": report.job,
        "time": now(),
        "result": result or report.result,
        "message": (message or report.message)[:MAX_MESSAGE],
    }


def rollback_target(router: dict[str, Any], spec_bundle: str, wanted: str) -> str:
    """The bundle a rollback annotation asks for: ``previous`` (or empty) is the newest of
    ``previousBundles``; otherwise it must be one of them. Raises ValueError."""
    previous = list(router.get("previousBundles") or [])
    if not router.get("activeBundle"):
        raise ValueError("nothing to roll back: no fitted bundle was activated yet")
    if wanted in ("", "previous", "true"):
        if not previous:
            raise ValueError("nothing to roll back to: status.router.previousBundles is empty")
        return str(previous[0])
    if wanted not in previous:
        raise ValueError(
            f"cannot roll back to {wanted!r}: not one of status.router.previousBundles "
            f"({', '.join(previous) or 'none'})"
        )
    return wanted


def after_rollback(router: dict[str, Any], target: str) -> dict[str, Any]:
    """status.router once ``target`` is served again; the bundle rolled back from is dropped
    (the next fit deletes it)."""
    return {
        **router,
        "activeBundle": target,
        "previousBundles": [b for b in router.get("previousBundles") or [] if b != target],
        "lastRollback": {"time": now(), "from": router.get("activeBundle"), "to": target},
    }


def condition(
    refit: Refit | dict[str, Any] | None, router: dict[str, Any], unavailable: str
) -> Condition | None:
    """The ``RouterFit`` condition of a policy that refits (None for one that does not)."""
    if not refit:
        return None
    if unavailable:
        return Condition(CONDITION, "False", "RefitUnavailable", unavailable)
    last = router.get("lastAttempt") or {}
    active = router.get("activeBundle")
    serving = f"serving {active}" if active else "serving the spec's bundle (no fit yet)"
    if not last:
        return Condition(CONDITION, "Unknown", "Pending", f"no refit has run yet; {serving}")
    result = str(last.get("result", ""))
    message = f"{last.get('job')}: {last.get('message', '')}; {serving}"
    if result == "Fitted":
        return Condition(CONDITION, "True", "Fitted", message)
    if result == "Running":
        return Condition(CONDITION, "Unknown", "Running", message)
    return Condition(CONDITION, "False", result or "FitFailed", message)


# --- manifests -----------------------------------------------------------------------------
def fit_args(
    policy: RoutePolicy, refit: Refit, settings: RefitSettings, keep: list[str]
) -> list[str]:
    """The refit container's arguments (FIT_SCRIPT's positional parameters)."""
    ns, name = policy.metadata.namespace, policy.metadata.name
    args = [
        settings.outcomes_dir,
        bundle_root(settings, ns, name),
        "--summary",
        SUMMARY_PATH,
        "--min-outcomes",
        str(refit.min_outcomes),
        "--name",
        f"{ns}.{name}",
    ]
    if refit.models:
        args += ["--models", ",".join(refit.models)]
    for bundle in keep:
        args += ["--keep", bundle]
    return args


def _security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def job_spec(
    policy: RoutePolicy, refit: Refit, settings: RefitSettings, keep: list[str]
) -> dict[str, Any]:
    """The Job spec: one try (a failed fit is reported, not retried), the chart's pod
    hardening, no API credentials, outcomes read-only, bundles writable."""
    container: dict[str, Any] = {
        "name": "fit",
        "image": settings.image,
        "imagePullPolicy": settings.pull_policy,
        "command": ["/bin/sh", "-c", FIT_SCRIPT, "switchyard-refit"],
        "args": fit_args(policy, refit, settings, keep),
        "env": [{"name": "HOME", "value": "/tmp"}],
        "terminationMessagePath": SUMMARY_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": _security_context(),
        "volumeMounts": [
            {"name": "outcomes", "mountPath": settings.outcomes_dir, "readOnly": True},
            {"name": "bundles", "mountPath": settings.bundles_dir},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    if settings.resources:
        container["resources"] = settings.resources
    return {
        "backoffLimit": 0,
        "activeDeadlineSeconds": settings.deadline_s,
        "ttlSecondsAfterFinished": 7 * 86400,
        "template": {
            "metadata": {
                "labels": {
                    POLICY_LABEL: policy_label(policy.metadata.namespace, policy.metadata.name)
                }
            },
            "spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": False,
                "enableServiceLinks": False,
                "securityContext": {
                    "runAsNonRoot": True,
                    "runAsUser": 65532,
                    "runAsGroup": 65532,
                    "fsGroup": 65532,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "containers": [container],
                "volumes": [
                    {
                        "name": "outcomes",
                        "persistentVolumeClaim": {
                            "claimName": settings.outcomes_claim,
                            "readOnly": True,
                        },
                    },
                    {
                        "name": "bundles",
                        "persistentVolumeClaim": {"claimName": settings.bundles_claim},
                    },
                    {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
                ],
            },
        },
    }


def _metadata(
    name: str, policy: RoutePolicy, settings: RefitSettings, owner: dict[str, Any]
) -> dict[str, Any]:
    ns = policy.metadata.namespace
    meta: dict[str, Any] = {
        "name": name,
        "namespace": settings.namespace,
        "labels": {
            "app.kubernetes.io/managed-by": "switchyard-operator",
            POLICY_LABEL: policy_label(ns, policy.metadata.name),
        },
        "annotations": {POLICY_ANNOTATION: f"{ns}/{policy.metadata.name}"},
    }
    # A namespaced owner must be in the dependent's namespace: across namespaces the operator
    # deletes the CronJob itself when the policy goes.
    if owner and ns == settings.namespace:
        meta["ownerReferences"] = [{**owner, "controller": True, "blockOwnerDeletion": False}]
    return meta


def cron_job(
    policy: RoutePolicy, settings: RefitSettings, keep: list[str], owner: dict[str, Any]
) -> dict[str, Any]:
    """The CronJob of a refitting policy (``owner``: apiVersion, kind, name and uid)."""
    refit = policy.spec.strategy.router.refit
    assert refit is not None
    ns, name = policy.metadata.namespace, policy.metadata.name
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": _metadata(cron_job_name(ns, name), policy, settings, owner),
        "spec": {
            "schedule": refit.schedule,
            "suspend": refit.suspend,
            "concurrencyPolicy": "Forbid",
            "startingDeadlineSeconds": 3600,
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {
                "metadata": {
                    "labels": {POLICY_LABEL: policy_label(ns, name)},
                    "annotations": {POLICY_ANNOTATION: f"{ns}/{name}"},
                },
                "spec": job_spec(policy, refit, settings, keep),
            },
        },
    }


def job(
    policy: RoutePolicy, settings: RefitSettings, keep: list[str], owner: dict[str, Any], at: int
) -> dict[str, Any]:
    """An on-demand refit Job (``at``: Unix time, making its name unique)."""
    refit = policy.spec.strategy.router.refit
    assert refit is not None
    ns, name = policy.metadata.namespace, policy.metadata.name
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(f"{cron_job_name(ns, name)}-{at}", policy, settings, owner),
        "spec": job_spec(policy, refit, settings, keep),
    }


def job_finished(body: dict[str, Any]) -> bool | None:
    """True: the Job completed; False: it failed; None: it has not finished."""
    for cond in (body.get("status") or {}).get("conditions") or []:
        if cond.get("status") == "True" and cond.get("type") in ("Complete", "Failed"):
            return bool(cond["type"] == "Complete")
    return None
