"""What the operator knows: the last good version of every RoutePolicy, and how to publish them.

Kubernetes-agnostic, so the same logic is unit-testable: ``upsert`` validates a document
(what CEL cannot check), keeps the last good version of each policy, recompiles all of them
and delivers the result through the ControlPlane. A broken policy never takes down the ones
that work: it is reported, and its last good version (if any) keeps serving.

What only a data-plane replica can find out (a router bundle path missing on its pods) comes
back in the ext_proc ACKs as per-policy errors, and that policy is marked ``DataPlaneRejected``;
the others are unaffected. An edit rejected this way is rolled back to the previous generation,
published again, so every replica, a restarted one too, serves that generation. A new policy has
none: it stays in the config, isolated by every replica (its names answer 503
``policy_unavailable``), and is served once its bundle appears there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from switchyard.api.v1 import routing_pb2 as pb
from switchyard.operator.compiler import (
    CompileError,
    FailOpenModelMissing,
    ServiceEndpoints,
    alias_conflict,
    compile_config,
)
from switchyard.operator.control_plane import ApplyResult, ControlPlane
from switchyard.operator.keyring import (
    KeysVerdict,
    SecretHashes,
    judge,
    secret_refs,
    served_jwt,
    served_keys,
    served_store,
    served_tenant_limits,
)
from switchyard.operator.multicluster import Topology
from switchyard.operator.policy import PolicyError, RoutePolicy, parse_policy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Condition:
    type: str
    status: str
    reason: str
    message: str


@dataclass(frozen=True)
class Outcome:
    """What a reconcile of one policy produced, for its status."""

    conditions: list[Condition]
    model_count: int
    config_version: str
    endpoints: dict[str, ModelEndpoints] | None = None
    """Per model: where it can be served."""


@dataclass(frozen=True)
class ModelEndpoints:
    """Usable endpoints of one model (a URL backend counts as 1), in total and per cluster."""

    total: int
    clusters: dict[str, int]


def endpoint_counts(policy: pb.Policy) -> dict[str, ModelEndpoints]:
    """Per model of a compiled policy: its usable endpoints, in total and per cluster."""
    counts = {}
    for model in policy.models:
        if not model.backend.service.name:
            counts[model.name] = ModelEndpoints(1, {})
            continue
        clusters: dict[str, int] = {}
        for endpoint in model.backend.endpoints:
            clusters[endpoint.cluster] = clusters.get(endpoint.cluster, 0) + 1
        counts[model.name] = ModelEndpoints(len(model.backend.endpoints), clusters)
    return counts


class Reconciler:
    """Holds valid policies and publishes the compiled whole."""

    def __init__(
        self,
        plane: ControlPlane,
        fail_open_model: str = "",
        endpoints: ServiceEndpoints | None = None,
        topology: Callable[[], Topology] = Topology,
    ) -> None:
        self.plane = plane
        self.fail_open_model = fail_open_model
        self.policies: dict[str, RoutePolicy] = {}
        self.endpoints = endpoints
        self.topology = topology
        self.config = pb.RoutingConfig()
        self._verdicts: dict[str, dict[str, str]] = {}
        """Policy key → the data-plane rejections its status last reported (replica → why)."""
        self._reconciling: set[str] = set()
        self.client_keys: dict[str, KeysVerdict] = {}
        """ClientKeys resource (namespace/name) → its verdict; any at all turns keys on."""
        self.key_documents: dict[str, dict[str, Any]] = {}
        self.key_secrets: dict[str, set[str]] = {}
        """ClientKeys resource → the Secrets its keys name (the Secret watch's filter)."""

    async def upsert(self, document: dict[str, Any]) -> Outcome:
        """Validate, store and publish one policy document."""
        meta = document.get("metadata", {})
        key = f"{meta.get('namespace', 'default')}/{meta.get('name')}"
        self._reconciling.add(key)
        try:
            outcome = await self._upsert(key, document)
        except Exception as error:
            self.plane.metrics.reconcile_errors.labels(type(error).__name__).inc()
            raise
        finally:
            self._reconciling.discard(key)
        ready = outcome.conditions[0]
        self.plane.metrics.reconciled(key, ready.status == "True", ready.reason)
        return outcome

    async def _upsert(self, key: str, document: dict[str, Any]) -> Outcome:
        try:
            policy = parse_policy(document, key)
        except PolicyError as error:
            kept = key in self.policies
            return Outcome(
                [
                    Condition("Ready", "False", "InvalidSpec", str(error)),
                    Condition(
                        "Degraded",
                        "True" if kept else "False",
                        "ServingLastGood" if kept else "NotServing",
                        "the previous valid generation keeps serving"
                        if kept
                        else "this policy is not served",
                    ),
                ],
                0,
                self.config.version,
            )
        conflict = alias_conflict(policy, self.policies.values())
        if conflict:
            return Outcome(
                [Condition("Ready", "False", "AliasConflict", conflict)], 0, self.config.version
            )
        previous = self.policies.get(key)
        self.policies[key] = policy
        try:
            config = self._compile()
        except CompileError as error:
            if previous is None:
                del self.policies[key]
            else:
                self.policies[key] = previous
            return Outcome(
                [Condition("Ready", "False", "CompileError", str(error))], 0, self.config.version
            )
        last_good = self.config
        result = await self._publish(config)
        if result.rejected:
            self.config = last_good
            if previous is None:
                del self.policies[key]
            else:
                self.policies[key] = previous
            return Outcome(self._conditions(result, policy), 0, last_good.version)
        compiled = next(
            p
            for p in config.policies
            if (p.namespace, p.name) == (policy.metadata.namespace, policy.metadata.name)
        )
        left_out = self.plane.stream.rejected_policies(config.version).get(key, {})
        if left_out and previous is not None:
            return await self._roll_back(key, previous, left_out)
        self._verdicts[key] = left_out
        return Outcome(
            self._conditions(result, policy, left_out),
            len(policy.spec.models),
            config.version,
            endpoint_counts(compiled),
        )

    async def _roll_back(
        self, key: str, previous: RoutePolicy, left_out: dict[str, str]
    ) -> Outcome:
        """The data plane left out the new generation of ``key``: serve the previous one."""
        self.policies[key] = previous
        try:
            config = self._compile()
        except CompileError:  # cannot happen (it compiled with these others); be safe anyway
            del self.policies[key]
            config = self._compile()
        await self._publish(config)
        self._verdicts[key] = self.plane.stream.rejected_policies(config.version).get(key, {})
        last_good = not self._verdicts[key]
        return Outcome(data_plane_rejected(left_out, last_good), 0, config.version)

    async def restore(self, documents: list[dict[str, Any]]) -> None:
        """Start from the policies that already exist: keep every one that parses and
        compiles, then publish them at once (before any data plane is connected). Those that
        do not are left to their own reconcile, which reports them."""
        for document in documents:
            meta = document.get("metadata", {})
            key = f"{meta.get('namespace', 'default')}/{meta.get('name')}"
            try:
                self.policies[key] = parse_policy(document, key)
            except PolicyError:
                continue
        try:
            config = self._compile()
        except CompileError:
            config = self._compile_one_by_one()
        self.config = config
        await self.plane.prime(config)

    def _compile_one_by_one(self) -> pb.RoutingConfig:
        candidates, self.policies = self.policies, {}
        config = self._compile()
        for key, policy in candidates.items():
            self.policies[key] = policy
            try:
                config = self._compile()
            except CompileError:
                del self.policies[key]
        return config

    async def refresh_endpoints(self) -> bool:
        """Service endpoints changed (EndpointSlices); republish if the config changed."""
        config = self._compile()
        if config.version == self.config.version:
            return False
        await self._publish(config)
        return True

    async def republish(self) -> None:
        """Push the current config again (e.g. an API key it references was rotated)."""
        if self.policies:
            await self.plane.apply(self.config)

    def endpoint_counts(self) -> dict[tuple[str, str], dict[str, ModelEndpoints]]:
        """(namespace, name) → per-model endpoint counts, for every published policy."""
        return {(p.namespace, p.name): endpoint_counts(p) for p in self.config.policies}

    def _compile(self) -> pb.RoutingConfig:
        topology = self.topology()
        try:
            return compile_config(
                self.policies.values(),
                self.fail_open_model,
                self.endpoints,
                topology,
                client_keys=self._served_keys(),
                tenant_limits=served_tenant_limits(self.client_keys.values()),
                limit_store=served_store(self.client_keys.values()),
                jwt=served_jwt(self.client_keys.values()),
            )
        except FailOpenModelMissing as error:
            # Before the policy holding it exists, or after it is deleted, fail closed rather
            # than refuse every policy (or the operator's start).
            log.warning("%s; the gateway fails closed until a policy has it", error)
            return compile_config(
                self.policies.values(),
                "",
                self.endpoints,
                topology,
                self._served_keys(),
                served_tenant_limits(self.client_keys.values()),
                served_store(self.client_keys.values()),
                served_jwt(self.client_keys.values()),
            )

    def _served_keys(self) -> list[pb.ClientKey] | None:
        """None (authentication off) only when no ClientKeys resource exists: one that is
        invalid still turns it on, with none of its keys (fail closed)."""
        return served_keys(self.client_keys.values()) if self.client_keys else None

    def restore_client_keys(
        self, documents: list[dict[str, Any]], hashes: dict[str, SecretHashes]
    ) -> None:
        """Judge the ClientKeys that already exist (``hashes`` by namespace), before
        ``restore`` publishes anything: a restarted operator never serves without them."""
        for document in sorted(documents, key=_resource_key):
            key = _resource_key(document)
            namespace = key.split("/", 1)[0]
            self._remember(key, document)
            self.client_keys[key] = judge(
                document, hashes.get(namespace, {}), self.client_keys.values()
            )

    async def upsert_client_keys(
        self, document: dict[str, Any], hashes: SecretHashes
    ) -> tuple[KeysVerdict, str]:
        """Judge one ClientKeys resource against the others and publish; returns its verdict
        and the config version now served."""
        key = _resource_key(document)
        others = [v for k, v in self.client_keys.items() if k != key]
        verdict = judge(document, hashes, others)
        previous = self.client_keys.get(key)
        self._remember(key, document)
        self.client_keys[key] = verdict
        config = self._compile()
        if config.version == self.config.version:
            return verdict, config.version
        last_good = self.config
        result = await self._publish(config)
        if result.rejected:
            self.config = last_good
            if previous is None:
                self.client_keys[key] = KeysVerdict(key, "Rejected", result.rejected)
            else:
                self.client_keys[key] = previous
            return KeysVerdict(key, "Rejected", result.rejected), last_good.version
        return verdict, config.version

    def _remember(self, key: str, document: dict[str, Any]) -> None:
        self.key_documents[key] = document
        self.key_secrets[key] = {secret for secret, _ in secret_refs(document)}

    def secret_users(self, namespace: str, secret: str) -> list[str]:
        """ClientKeys resources (namespace/name) with a key in this Secret."""
        prefix = f"{namespace}/"
        return [
            key
            for key, secrets in self.key_secrets.items()
            if secret in secrets and key.startswith(prefix)
        ]

    async def delete_client_keys(self, namespace: str, name: str) -> None:
        """Forget a ClientKeys resource and publish without its keys."""
        key = f"{namespace}/{name}"
        self.key_documents.pop(key, None)
        self.key_secrets.pop(key, None)
        if self.client_keys.pop(key, None) is not None:
            await self._publish(self._compile())

    def data_plane_changes(self) -> dict[str, list[Condition]]:
        """Policies whose data-plane verdict changed since their status was last written (an
        ext_proc that connected or restarted after their reconcile): key → new conditions."""
        rejected = self.plane.stream.rejected_policies(self.config.version)
        changes = {}
        everywhere = self.plane.stream.acked_everywhere(self.config.version)
        for key, policy in self.policies.items():
            now = rejected.get(key, {})
            if key in self._reconciling or now == self._verdicts.get(key, {}):
                continue  # a running reconcile writes this policy's status itself
            self._verdicts[key] = now
            self.plane.metrics.policy_state(key, not now)
            if now:
                changes[key] = data_plane_rejected(now)
            else:
                acked = ApplyResult(self.config.version, True, everywhere, 0.0)
                changes[key] = self._conditions(acked, policy)
        return changes

    async def delete(self, namespace: str, name: str) -> None:
        """Forget a policy and publish the rest."""
        self.plane.metrics.policy_deleted(f"{namespace}/{name}")
        self._verdicts.pop(f"{namespace}/{name}", None)
        if self.policies.pop(f"{namespace}/{name}", None) is not None:
            await self._publish(self._compile())

    async def _publish(self, config: pb.RoutingConfig) -> ApplyResult:
        self.config = config
        return await self.plane.apply(config)

    @staticmethod
    def _conditions(
        result: ApplyResult, policy: RoutePolicy, left_out: dict[str, str] | None = None
    ) -> list[Condition]:
        if left_out:
            return data_plane_rejected(left_out)
        if result.rejected:
            return [
                Condition("Ready", "False", "EnvoyRejected", result.rejected),
                Condition(
                    "Degraded",
                    "True",
                    "ServingLastGood",
                    "the previous configuration keeps serving",
                ),
            ]
        programmed = result.envoy_acked and result.extproc_acked
        waiting = [
            part
            for part, ok in (("envoy", result.envoy_acked), ("ext_proc", result.extproc_acked))
            if not ok
        ]
        return [
            Condition(
                "Ready",
                "True",
                "Programmed",
                f"{len(policy.spec.models)} models, config {result.version}",
            ),
            Condition(
                "Degraded",
                "False" if programmed else "True",
                "Programmed" if programmed else "NotAcknowledged",
                "delivered to every data-plane replica"
                if programmed
                else f"not acknowledged by {', '.join(waiting)} yet",
            ),
        ]


def _resource_key(document: dict[str, Any]) -> str:
    meta = document.get("metadata", {})
    return f"{meta.get('namespace', 'default')}/{meta.get('name')}"


def data_plane_rejected(
    left_out: dict[str, str], serving_last_good: bool = False
) -> list[Condition]:
    """Conditions of a policy that ext_proc replicas left out (replica → why)."""
    why = "; ".join(f"ext_proc {node}: {message}" for node, message in sorted(left_out.items()))
    if serving_last_good:
        degraded = Condition(
            "Degraded", "True", "ServingLastGood", "the previous generation keeps serving"
        )
    else:
        degraded = Condition(
            "Degraded",
            "True",
            "NotServing",
            "requests for this policy get 503 policy_unavailable; the other policies are served",
        )
    return [Condition("Ready", "False", "DataPlaneRejected", f"not served: {why}"), degraded]
