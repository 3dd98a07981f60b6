"""HorizontalPodAutoscalers and PodDisruptionBudgets for the gateway and the ext_proc.

Derived from the operator's defaults and the policies' ``spec.autoscaling``: the data plane is
shared, so it scales to the most demanding policy (largest minimum and maximum, lowest CPU
target, lowest requests-per-second target per pod).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from switchyard.operator.policy import Autoscaling, RoutePolicy

RPS_METRIC = "switchyard_requests_per_second"
MANAGED_BY = {"app.kubernetes.io/managed-by": "switchyard-operator"}


@dataclass(frozen=True)
class ScaleTarget:
    """A Deployment the operator scales."""

    name: str
    component: str


def effective_autoscaling(policies: Iterable[RoutePolicy], default: Autoscaling) -> Autoscaling:
    """The combined autoscaling settings of all policies (``default`` when none sets any)."""
    wanted = [p.spec.autoscaling for p in policies if p.spec.autoscaling is not None]
    if not wanted:
        return default
    rps = [a.target_requests_per_second for a in wanted if a.target_requests_per_second]
    return Autoscaling.model_validate(
        {
            "minReplicas": max(a.min_replicas for a in wanted),
            "maxReplicas": max(
                max(a.max_replicas for a in wanted), *(a.min_replicas for a in wanted)
            ),
            "targetCPUUtilization": min(a.target_cpu_utilization for a in wanted),
            "targetRequestsPerSecond": min(rps) if rps else default.target_requests_per_second,
        }
    )


def horizontal_pod_autoscaler(
    target: ScaleTarget, namespace: str, scaling: Autoscaling
) -> dict[str, Any]:
    """autoscaling/v2 HPA on CPU plus, when set, requests per second per pod."""
    metrics: list[dict[str, Any]] = [
        {
            "type": "Resource",
            "resource": {
                "name": "cpu",
                "target": {
                    "type": "Utilization",
                    "averageUtilization": scaling.target_cpu_utilization,
                },
            },
        }
    ]
    if scaling.target_requests_per_second:
        metrics.append(
            {
                "type": "Pods",
                "pods": {
                    "metric": {"name": RPS_METRIC},
                    "target": {
                        "type": "AverageValue",
                        "averageValue": str(scaling.target_requests_per_second),
                    },
                },
            }
        )
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {
            "name": target.name,
            "namespace": namespace,
            "labels": {**MANAGED_BY, "app.kubernetes.io/component": target.component},
        },
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target.name},
            "minReplicas": scaling.min_replicas,
            "maxReplicas": scaling.max_replicas,
            "metrics": metrics,
        },
    }


def pod_disruption_budget(
    target: ScaleTarget, namespace: str, scaling: Autoscaling
) -> dict[str, Any]:
    """Keep all but one replica during voluntary disruptions (at least one when min is 1)."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {
            "name": target.name,
            "namespace": namespace,
            "labels": {**MANAGED_BY, "app.kubernetes.io/component": target.component},
        },
        "spec": {
            "minAvailable": max(1, scaling.min_replicas - 1),
            "selector": {"matchLabels": {"app.kubernetes.io/name": target.name}},
        },
    }
