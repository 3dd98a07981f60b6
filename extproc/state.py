"""What one ext_proc worker holds: the current routing table and the loaded router scorers.

A config swap is one attribute assignment, so in-flight requests keep the table they started
with and new ones see the new table; nothing is locked on the hot path.

Router bundles load one by one, and a bundle that does not load (a path missing on this pod, a
corrupt model) leaves out only the policies that score with it: the rest of the version is
served and the ACK lists what was left out. Rejecting the whole version instead would let one
policy stop every later change, and a restarted replica, which has no last good version, would
serve nothing. A failed bundle is tried again with every new version, so a policy comes back
once its bundle exists.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from switchyard.api.v1 import routing_pb2 as pb
from switchyard.extproc.config import CompiledConfig, build_config
from switchyard.extproc.engine import Decision
from switchyard.extproc.metrics import DECISIONS, decision_kind
from switchyard.extproc.request import ParsedRequest
from switchyard.extproc.scoring import HeuristicScorer, Scorer
from switchyard.extproc.tally import TALLY

log = logging.getLogger(__name__)

HEURISTIC_BUNDLE = "builtin:heuristic"


ScorerLoader = Callable[[str], Scorer]


def default_scorer_loader(bundle: str, execution_provider: str = "cpu") -> Scorer:
    """Load a router bundle on ``execution_provider`` (auto, cpu, cuda); the heuristic
    placeholder when asked for or when no runtime is installed."""
    if bundle == HEURISTIC_BUNDLE:
        return HeuristicScorer()
    try:
        from switchyard.extproc.router.runtime import load_scorer
    except ImportError:
        log.warning("router runtime unavailable; using the heuristic scorer for %s", bundle)
        return HeuristicScorer()
    return load_scorer(bundle, providers=[execution_provider])


def _unpredicted(config: CompiledConfig, scorers: dict[str, Scorer]) -> dict[str, str]:
    """Predictive policies whose loaded bundle lacks a prediction one of their models needs
    (the compiler checks bundles it can read; only the pods can read some paths)."""
    errors = {}
    served = {p.key: p for group in config.policies_by_alias.values() for p in group}
    for group in config.guarded.values():
        served.update((e.key, e.policy) for e in group if e.policy is not None)
    for policy in served.values():
        scorer = scorers.get(policy.router_bundle)
        known = getattr(scorer, "models", None)  # the heuristic scorer predicts nothing
        if policy.predictive is None or known is None:
            continue
        missing = sorted({c[1] for c in policy.predictive.candidates} - set(known))
        if missing:
            errors[policy.key] = (
                f"spec.strategy.router.bundle: router bundle {policy.router_bundle!r} has "
                f"no prediction for {', '.join(missing)} (it predicts: "
                f"{', '.join(known) or 'nothing'})"
            )
    return errors


class RuntimeState:
    """Current config and scorers of one worker. Bundles load on ``execution_provider``
    unless a ``scorer_loader`` is given."""

    def __init__(
        self,
        config: CompiledConfig | None = None,
        scorer_loader: ScorerLoader | None = None,
        execution_provider: str = "cpu",
    ) -> None:
        self.config = config or build_config(pb.RoutingConfig())
        self._loader = scorer_loader or functools.partial(
            default_scorer_loader, execution_provider=execution_provider
        )
        self._scorers: dict[str, Scorer] = {}
        self._fallback: Scorer = HeuristicScorer()
        self._decision_counters: dict[tuple[str, str, str], Any] = {}

    def prepare(self, proto: pb.RoutingConfig) -> tuple[CompiledConfig, dict[str, Scorer]]:
        """Build tables and load new bundles for ``proto``; slow, so call it off the loop.
        Policies that do not load are left out (``CompiledConfig.policy_errors``)."""
        config = build_config(proto)
        scorers = {b: s for b, s in self._scorers.items() if b in config.router_bundles}
        failed: dict[str, str] = {}
        for bundle in sorted(config.router_bundles - scorers.keys()):
            try:
                scorers[bundle] = self._loader(bundle)
            except Exception as exc:  # one bundle must not take down the other policies
                log.warning("router bundle %r did not load: %s", bundle, exc)
                failed[bundle] = str(exc) or type(exc).__name__
        left_out = {
            key: f"spec.strategy.router.bundle: router bundle {bundle!r} did not load: "
            f"{failed[bundle]}"
            for key, bundle in config.policy_bundles.items()
            if bundle in failed
        }
        left_out.update(_unpredicted(config, scorers))
        if left_out:
            config = build_config(proto, {**config.policy_errors, **left_out})
        for key, error in config.policy_errors.items():
            log.warning("routing config %s: policy %s not served: %s", proto.version, key, error)
        return config, scorers

    def swap(self, prepared: tuple[CompiledConfig, dict[str, Scorer]]) -> None:
        """Make a prepared config current (call on the event loop)."""
        self.config, self._scorers = prepared
        log.info("routing config %s active", self.config.version)

    def scorer_for(self, bundle: str) -> Scorer:
        return self._scorers.get(bundle, self._fallback)

    def record(self, decision: Decision, request: ParsedRequest) -> None:
        """Account for one decision (metrics)."""
        key = (decision.policy, decision.model.name, decision_kind(decision.reason))
        counter = self._decision_counters.get(key)
        if counter is None:
            counter = self._decision_counters[key] = DECISIONS.labels(*key)
        TALLY.add(counter)
