"""Router refits (operator/refit.py): the refit schema, the CronJob and Job the operator
creates, and how status.router moves on a fit, a failed fit and a rollback."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from switchyard.operator import refit
from switchyard.operator.policy import PolicyError, parse_policy

SETTINGS = refit.RefitSettings(
    namespace="switchyard",
    image="localhost/switchyard:t1",
    outcomes_claim="outcomes",
    bundles_claim="bundles",
    resources={"requests": {"cpu": "1"}},
)
OWNER = {"apiVersion": "switchyard.dev/v1alpha1", "kind": "RoutePolicy", "name": "p", "uid": "u1"}
ROOT = "/var/lib/switchyard/bundles/default.assistant"


def refitting(policy_doc: dict[str, Any], **refit_spec: Any) -> dict[str, Any]:
    doc = copy.deepcopy(policy_doc)
    doc["spec"]["strategy"].setdefault("router", {})["refit"] = {
        "schedule": "0 3 * * *",
        **refit_spec,
    }
    return doc


def test_refit_schema(policy_doc: dict[str, Any]) -> None:
    policy = parse_policy(refitting(policy_doc, models=["a", "b"], minOutcomes=50))
    spec = policy.spec.strategy.router.refit
    assert spec is not None
    assert (spec.min_outcomes, spec.keep, spec.suspend, spec.models) == (50, 3, False, ["a", "b"])
    assert parse_policy(refitting(policy_doc, schedule="@daily")).spec.strategy.router.refit
    for bad, field in (({"schedule": "daily"}, "schedule"), ({"keep": 1}, "keep")):
        with pytest.raises(PolicyError, match=f"strategy.router.refit.{field}"):
            parse_policy(refitting(policy_doc, **bad))


def test_cron_job_runs_fit_on_the_outcomes_into_the_policys_bundle_root(
    policy_doc: dict[str, Any],
) -> None:
    doc = refitting(policy_doc, models=["a", "b"], minOutcomes=50, keep=4)
    doc["metadata"] = {"name": "assistant", "namespace": "switchyard"}
    policy = parse_policy(doc)
    keep = [f"{ROOT}/2", f"{ROOT}/1"]
    cron = refit.cron_job(policy, SETTINGS, keep, OWNER)
    assert cron["metadata"]["name"] == "refit-switchyard-assistant"
    assert cron["metadata"]["namespace"] == "switchyard"
    assert cron["metadata"]["ownerReferences"] == [
        {**OWNER, "controller": True, "blockOwnerDeletion": False}
    ]
    assert cron["spec"]["schedule"] == "0 3 * * *"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0
    pod = job["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsUser"] == 65532
    (container,) = pod["containers"]
    assert container["image"] == "localhost/switchyard:t1"
    assert container["command"][:2] == ["/bin/sh", "-c"]
    assert "switchyard router fit" in container["command"][2]
    root = "/var/lib/switchyard/bundles/switchyard.assistant"
    assert container["args"] == [
        "/var/lib/switchyard/outcomes", root,
        "--summary", "/dev/termination-log", "--min-outcomes", "50",
        "--name", "switchyard.assistant", "--models", "a,b",
        "--keep", keep[0], "--keep", keep[1],
    ]  # fmt: skip
    assert container["terminationMessagePath"] == "/dev/termination-log"
    assert container["resources"] == {"requests": {"cpu": "1"}}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["outcomes"]["readOnly"] is True
    assert "readOnly" not in mounts["bundles"]
    assert mounts["bundles"]["mountPath"] == "/var/lib/switchyard/bundles"
    claims = {v["name"]: v.get("persistentVolumeClaim") for v in pod["volumes"]}
    assert claims["outcomes"] == {"claimName": "outcomes", "readOnly": True}
    assert claims["bundles"] == {"claimName": "bundles"}

    # A policy in another namespace than the Jobs: no owner reference (it would be invalid).
    other = parse_policy(refitting(policy_doc))
    assert "ownerReferences" not in refit.cron_job(other, SETTINGS, [], OWNER)["metadata"]
    on_demand = refit.job(other, SETTINGS, [], OWNER, 1764460800)
    ns, name = other.metadata.namespace, other.metadata.name
    assert on_demand["metadata"]["name"] == f"{refit.cron_job_name(ns, name)}-1764460800"
    assert on_demand["metadata"]["annotations"] == {refit.POLICY_ANNOTATION: f"{ns}/{name}"}


def test_names_stay_short_enough_for_job_names() -> None:
    name = refit.cron_job_name("a-very-long-namespace-name", "an-equally-long-policy-name")
    assert len(name) <= 40 and name.startswith("refit-a-very-long")
    assert name != refit.cron_job_name("a-very-long-namespace-name", "an-equally-long-policy-nam")


def test_refit_needs_its_settings() -> None:
    assert SETTINGS.unavailable() == ""
    missing = refit.RefitSettings(namespace="s", image="i").unavailable()
    assert "--refit-outcomes-claim" in missing and "--refit-bundles-claim" in missing


def test_the_fitted_bundle_overrides_the_spec_only_while_refitting(
    policy_doc: dict[str, Any],
) -> None:
    router = {"activeBundle": f"{ROOT}/2"}
    doc = refitting(policy_doc)
    assert refit.with_effective_bundle(doc, router)["spec"]["strategy"]["router"]["bundle"] == (
        f"{ROOT}/2"
    )
    assert doc["spec"]["strategy"]["router"].get("bundle") != f"{ROOT}/2"  # not mutated
    assert refit.with_effective_bundle(doc, {}) is doc  # no fit yet: the spec's bundle
    assert refit.with_effective_bundle(policy_doc, router) is policy_doc  # refit off


def report(result: str = "fitted", **summary: Any) -> refit.FitReport:
    return refit.FitReport("job-1", result == "fitted", {"result": result, **summary})


def test_a_fit_becomes_active_and_history_is_kept_to_keep() -> None:
    router: dict[str, Any] = {}
    for i in range(1, 5):
        bundle = f"{ROOT}/{i}"
        fitted = report(bundle=bundle, outcomes=400, crossValidatedAPGR={"fitted": 0.7})
        assert refit.fitted_bundle(fitted, ROOT) == bundle
        in_force = router.get("activeBundle", "builtin:default")
        router = refit.after_fit(router, fitted, bundle, 3, in_force)
        if i == 1:  # the spec's bundle is the first one to roll back to
            assert router["previousBundles"] == ["builtin:default"]
    assert router["activeBundle"] == f"{ROOT}/4"
    assert router["previousBundles"] == [f"{ROOT}/3", f"{ROOT}/2"]
    assert router["lastFit"]["outcomes"] == 400
    assert router["lastFit"]["crossValidatedAPGR"] == {"fitted": 0.7}
    assert router["lastAttempt"]["result"] == "Fitted"
    # What the next Job must not delete: the active one and keep - 2 previous ones.
    assert refit.kept_bundles(router, 3, f"{ROOT}/4") == [f"{ROOT}/4", f"{ROOT}/3"]
    assert refit.kept_bundles({}, 2, f"{ROOT}/0") == [f"{ROOT}/0"]
    cond = refit.condition({"schedule": "@daily"}, router, "")
    assert cond is not None and (cond.status, cond.reason) == ("True", "Fitted")


@pytest.mark.parametrize(
    "bundle",
    [f"{ROOT}x/1", f"{ROOT}/1/2", f"{ROOT}/..", "/etc", 3, None],
)
def test_a_reported_bundle_outside_the_policys_root_is_refused(bundle: Any) -> None:
    assert refit.fitted_bundle(report(bundle=bundle), ROOT) == ""


def test_failed_fits_say_why_and_keep_the_bundle_in_force() -> None:
    router = {"activeBundle": f"{ROOT}/1"}
    too_few = report("too-few", message="80 outcomes, fewer than the 300 asked for")
    assert too_few.result == "TooFewOutcomes"
    failed = {**router, "lastAttempt": refit.attempt(too_few)}
    cond = refit.condition({"schedule": "@daily"}, failed, "")
    assert cond is not None
    assert (cond.status, cond.reason) == ("False", "TooFewOutcomes")
    assert "fewer than the 300" in cond.message and f"serving {ROOT}/1" in cond.message
    crashed = refit.FitReport("job-2", False, refit.parse_summary("Traceback ...\nMemoryError"))
    assert (crashed.result, crashed.message) == ("FitFailed", "Traceback ...\nMemoryError")
    assert refit.FitReport("job-3", False, {}).message == "the Job failed with no report"
    unavailable = refit.condition({"schedule": "@daily"}, {}, "no claims")
    assert unavailable is not None and unavailable.reason == "RefitUnavailable"
    assert refit.condition(None, router, "") is None
    pending = refit.condition({"schedule": "@daily"}, {}, "")
    assert pending is not None and pending.status == "Unknown"
    assert "spec's bundle" in pending.message


def test_rollback_restores_a_previous_bundle_and_drops_the_rolled_back_one() -> None:
    router = {"activeBundle": f"{ROOT}/3", "previousBundles": [f"{ROOT}/2", "builtin:default"]}
    assert refit.rollback_target(router, "builtin:default", "previous") == f"{ROOT}/2"
    assert refit.rollback_target(router, "builtin:default", "builtin:default") == "builtin:default"
    back = refit.after_rollback(router, "builtin:default")
    assert back["activeBundle"] == "builtin:default"
    assert back["previousBundles"] == [f"{ROOT}/2"]
    assert back["lastRollback"]["from"] == f"{ROOT}/3"
    with pytest.raises(ValueError, match="not one of"):
        refit.rollback_target(router, "builtin:default", f"{ROOT}/9")
    with pytest.raises(ValueError, match="no fitted bundle"):
        refit.rollback_target({}, "builtin:default", "previous")
    with pytest.raises(ValueError, match="previousBundles is empty"):
        refit.rollback_target({"activeBundle": "x"}, "builtin:default", "previous")


def test_job_status() -> None:
    assert refit.job_finished({"status": {}}) is None
    done = {"status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    assert refit.job_finished(done) is True
    failed = {"status": {"conditions": [{"type": "Failed", "status": "True"}]}}
    assert refit.job_finished(failed) is False
