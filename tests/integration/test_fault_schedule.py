"""The fault schedule at small scale (the one `make bench-faults` runs): steady traffic through
the local gateway loses nothing that had a healthy fallback while an upstream dies, answers
429, 500 or slowly, ext_proc workers are killed (and restarted by their parent), the control
plane is down and a policy edit renames and removes models; every failure is an OpenAI error.

The only failures allowed are in the worker phase, and only of requests in flight at the
instant a worker was killed (their ext_proc stream may have been on it and answered in part);
they must be the ext_proc's fail-closed 503. Everything sent while a worker was dead or
restarting must succeed on the other one."""

from __future__ import annotations

from pathlib import Path

from fault_load import Outcome, PhaseReport, table
from fault_schedule import SMALL, run_schedule

UPSTREAM_FAULTS = (
    "upstream killed, back",
    "upstream answers 429",
    "upstream answers 500",
    "upstream slow (2 s)",
)
WORKER_KILLED = "ext_proc worker killed"


def test_the_fault_schedule_loses_nothing_that_had_a_fallback(tmp_path: Path) -> None:
    reports, outcomes, stats = run_schedule(tmp_path, SMALL)
    print("\n" + table(reports))
    print(stats)
    by_phase = {r.phase: r for r in reports}
    assert list(by_phase) == [
        "baseline",
        *UPSTREAM_FAULTS,
        WORKER_KILLED,
        "control plane down",
        "policy edit",
    ]
    for report in reports:
        assert report.sent >= SMALL.settle, report
        assert report.hung == 0, report
        assert report.malformed == 0, report
        assert report.recover_s is not None, report
        if report.phase != WORKER_KILLED:
            assert report.failures == 0, (report, _failures(outcomes, report))
    for phase in UPSTREAM_FAULTS:
        assert by_phase[phase].failed_over > 0, by_phase[phase]  # the fault did hit traffic
    assert by_phase["baseline"].failed_over == 0
    worker = by_phase[WORKER_KILLED]
    assert worker.failures == worker.in_flight, (worker, _failures(outcomes, worker))
    assert set(worker.failed) <= {503}, _failures(outcomes, worker)
    assert all("router_unavailable" in o.detail for o in _failures(outcomes, worker))
    edited = [o for o in outcomes if o.phase == "policy edit" and o.model == "quick"]
    assert edited, "the rename never reached the traffic"


def _failures(outcomes: list[Outcome], report: PhaseReport) -> list[Outcome]:
    return [o for o in outcomes if o.phase == report.phase and o.failed]
