"""The fault schedule: steady traffic through the local gateway while, one after another, an
upstream is killed and brought back, answers 429, 500 and slowly, ext_proc workers are killed
(and restarted by their parent), the control plane restarts, and a policy edit renames one
model and removes another. Shared by `make bench-faults` (tests/bench/bench_faults.py) and the
small schedule in `make test` (tests/integration/test_fault_schedule.py).

Each phase injects its fault, holds it ``hold_s``, lifts it, then waits until ``settle`` normal
requests in a row (the model routing picks answered) before the next phase; its recovery time
runs from the lift to the end of its last abnormal request.

In the worker phase each worker is killed twice, one at a time, each kill once the worker killed
before it has been restarted (by the ext_proc's parent, on its port) and has served a while: the
other worker is always a healthy fallback. A request that fails there and was in flight at a
kill instant (its ext_proc stream may have been on the killed worker) is counted apart from the
others (``PhaseReport.in_flight``).

Not injected: a Redis outage (tenants do not exist yet).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fault_gateway import FaultGateway, fault_policy
from fault_load import Load, Outcome, PhaseReport, report

from switchyard.local.runner import wait_until

RENAMED = {"fast": "quick", "steady": "steady", "spare": ""}  # rename fast, remove spare


@dataclass(frozen=True)
class Scale:
    clients: int
    interval_s: float  # per client, between request starts
    hold_s: float  # how long each fault lasts
    settle: int  # normal requests in a row that end a phase
    recover_limit_s: float  # a phase that does not settle in this long fails the schedule
    timeout_s: float  # client timeout: a request still running then is hung


BENCH = Scale(clients=8, interval_s=0.05, hold_s=10, settle=200, recover_limit_s=90, timeout_s=30)
SMALL = Scale(clients=4, interval_s=0.05, hold_s=2, settle=40, recover_limit_s=40, timeout_s=15)


@dataclass
class Schedule:
    gateway: FaultGateway
    load: Load
    scale: Scale
    lifted: dict[str, float]  # phase → when its fault was lifted

    def phase(self, name: str, inject: Callable[[], object], lift: Callable[[], object]) -> None:
        self.load.phase = name
        inject()
        time.sleep(self.scale.hold_s)  # the fault lasts this long (not synchronisation)
        lift()
        lifted = time.monotonic()
        self.lifted[name] = lifted
        wait_until(self._settled, self.scale.recover_limit_s, f"traffic to recover from {name}")

    def _settled(self) -> bool:
        """``settle`` requests in a row, all sent after the lift, were normal."""
        lifted = self.lifted[self.load.phase]
        mine = [o for o in self.load.snapshot() if o.phase == self.load.phase]
        mine = [o for o in mine if o.started >= lifted]
        tail = mine[-self.scale.settle :]
        return len(tail) == self.scale.settle and all(o.normal for o in tail)


def run_schedule(
    directory: Path, scale: Scale, only: frozenset[str] = frozenset()
) -> tuple[list[PhaseReport], list[Outcome], dict[str, int]]:
    """Run every phase (or the baseline and the phases named in ``only``) once; returns each
    phase's report, every request's outcome and Envoy's ext_proc cluster counters."""
    expected = {"auto": frozenset({"fast"}), "steady": frozenset({"steady"})}
    with FaultGateway(directory) as gateway:
        load = Load(gateway.base_url, scale.clients, scale.interval_s, scale.timeout_s, expected)
        with load:
            schedule = Schedule(gateway, load, scale, {})
            for name, inject, lift in _faults(gateway, load, scale):
                if not only or name in only or name == "baseline":
                    schedule.phase(name, inject, lift)
        outcomes = load.snapshot()
        reports = [report(n, outcomes, t, gateway.kills) for n, t in schedule.lifted.items()]
        return reports, outcomes, gateway.extproc_stats()


Fault = tuple[str, Callable[[], object], Callable[[], object]]


def _faults(gateway: FaultGateway, load: Load, scale: Scale) -> list[Fault]:
    """(name, inject, lift) of each phase, in order; ``fast`` is what ``auto`` routes to."""

    def answer(status: int) -> Callable[[], None]:
        return lambda: gateway.set_faults("fast", status=status, rate=1.0)

    def heal() -> None:
        gateway.set_faults("fast")

    def nothing() -> None:
        pass

    def kill_workers() -> None:
        for index in (0, 1, 0, 1):
            gateway.kill_worker(index)  # returns once the parent restarted it
            time.sleep(scale.hold_s / 2)  # spacing of the kills (not synchronisation)

    return [
        ("baseline", nothing, nothing),
        (
            "upstream killed, back",
            lambda: gateway.kill_upstream("fast"),
            lambda: gateway.start_upstream("fast"),
        ),
        ("upstream answers 429", answer(429), heal),
        ("upstream answers 500", answer(500), heal),
        ("upstream slow (2 s)", lambda: gateway.set_faults("fast", latency_ms=2000), heal),
        ("ext_proc worker killed", kill_workers, nothing),
        ("control plane down", gateway.stop_control_plane, gateway.start_control_plane),
        ("policy edit", lambda: _edit(gateway, load), nothing),
    ]


def _edit(gateway: FaultGateway, load: Load) -> None:
    """Rename ``fast`` to ``quick`` and remove ``spare``: ``auto`` may land on either name
    while the edit is applied, then on ``quick``."""
    load.set_expected("auto", frozenset({"fast", "quick"}))
    gateway.edit_policy(fault_policy(gateway.ports, RENAMED))
    load.set_expected("auto", frozenset({"quick"}))
