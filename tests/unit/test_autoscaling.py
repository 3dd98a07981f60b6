from __future__ import annotations

import copy
from typing import Any

from switchyard.operator.autoscaling import (
    RPS_METRIC,
    ScaleTarget,
    effective_autoscaling,
    horizontal_pod_autoscaler,
    pod_disruption_budget,
)
from switchyard.operator.policy import Autoscaling, parse_policy

DEFAULT = Autoscaling(min_replicas=2, max_replicas=5, target_cpu_utilization=80)
GATEWAY = ScaleTarget("switchyard-gateway", "gateway")


def test_default_when_no_policy_asks(policy_doc: dict[str, Any]) -> None:
    assert effective_autoscaling([parse_policy(policy_doc)], DEFAULT) == DEFAULT


def test_most_demanding_policy_wins(policy_doc: dict[str, Any]) -> None:
    a = copy.deepcopy(policy_doc)
    a["spec"]["autoscaling"] = {"minReplicas": 3, "maxReplicas": 8, "targetCPUUtilization": 60}
    b = copy.deepcopy(policy_doc)
    b["metadata"]["name"] = "b"
    b["spec"]["autoscaling"] = {"minReplicas": 2, "maxReplicas": 20, "targetRequestsPerSecond": 500}
    scaling = effective_autoscaling([parse_policy(a), parse_policy(b)], DEFAULT)
    assert scaling == Autoscaling(
        min_replicas=3, max_replicas=20, target_cpu_utilization=60, target_requests_per_second=500
    )
    hpa = horizontal_pod_autoscaler(GATEWAY, "switchyard", scaling)
    assert hpa["spec"]["minReplicas"] == 3 and hpa["spec"]["maxReplicas"] == 20
    assert hpa["spec"]["scaleTargetRef"]["name"] == "switchyard-gateway"
    cpu, rps = hpa["spec"]["metrics"]
    assert cpu["resource"]["target"]["averageUtilization"] == 60
    assert rps["pods"]["metric"]["name"] == RPS_METRIC
    assert rps["pods"]["target"]["averageValue"] == "500"
    pdb = pod_disruption_budget(GATEWAY, "switchyard", scaling)
    assert pdb["spec"]["minAvailable"] == 2


def test_single_replica_still_keeps_one(policy_doc: dict[str, Any]) -> None:
    pdb = pod_disruption_budget(GATEWAY, "ns", Autoscaling(min_replicas=1, max_replicas=1))
    assert pdb["spec"]["minAvailable"] == 1
