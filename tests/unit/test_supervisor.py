"""The ext_proc parent's supervisor with real worker processes (small stand-ins, spawned as
the real ones are): a dead worker is started again in its slot after a growing delay that
starts over once it has served a while, a worker that keeps exiting fails liveness, and a
stop stops every worker and starts none, even one whose restart was pending."""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess

import pytest

from switchyard.extproc.health import CRASH_LOOP, ReadyFlag, WorkerReadiness
from switchyard.extproc.supervisor import Backoff, Supervisor

CTX = multiprocessing.get_context("spawn")
DEADLINE_S = 60


class Tracked(CTX.Process):  # type: ignore[name-defined,misc]
    """Keeps its pid after the supervisor closed it."""

    known_pid = 0

    def start(self) -> None:
        super().start()
        self.known_pid = self.pid


def serve(flag: ReadyFlag) -> None:
    """A worker that serves until SIGTERM, then exits cleanly (as a real one does)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    flag.set()
    time.sleep(600)


def serve_then_exit(flag: ReadyFlag, seconds: float) -> None:
    flag.set()
    time.sleep(seconds)
    os._exit(1)


def fail() -> None:
    os._exit(3)


@dataclass
class Workers:
    """Spawns worker ``i`` from ``targets[i]`` and remembers every process started."""

    targets: list[Callable[[ReadyFlag], tuple[Callable[..., None], tuple[object, ...]]]]
    readiness: WorkerReadiness = field(init=False)
    started: list[list[Tracked]] = field(init=False)
    exited: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.readiness = WorkerReadiness(len(self.targets), CTX)
        self.started = [[] for _ in self.targets]

    def spawn(self, index: int) -> BaseProcess:
        target, args = self.targets[index](self.readiness.flag(index))
        process = Tracked(target=target, args=args)
        self.started[index].append(process)
        return process

    def pids(self, index: int) -> list[int]:
        return [p.known_pid for p in self.started[index] if p.known_pid]


def serving(flag: ReadyFlag) -> tuple[Callable[..., None], tuple[object, ...]]:
    return serve, (flag,)


def failing(_flag: ReadyFlag) -> tuple[Callable[..., None], tuple[object, ...]]:
    return fail, ()


def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@contextmanager
def supervising(
    workers: Workers, backoff: Backoff, steps: Callable[[], None]
) -> Iterator[dict[str, object]]:
    """Run the supervisor in this (the main) thread while ``steps`` runs on another; SIGTERM
    to this process ends it once ``steps`` returns or fails."""
    outcome: dict[str, object] = {}

    def drive() -> None:
        try:
            steps()
        except BaseException as exc:  # reported by the test, after the supervisor stopped
            outcome["error"] = exc
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    supervisor = Supervisor(
        len(workers.targets), workers.spawn, workers.readiness, workers.exited.append, backoff
    )
    supervisor.poll_s = 0.05
    driver = threading.Thread(target=drive)
    started = time.monotonic()
    driver.start()
    outcome["status"] = supervisor.run()
    outcome["run_s"] = time.monotonic() - started
    driver.join()
    yield outcome
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]


def _gone(process: Tracked) -> bool:
    return bool(process.known_pid) and not os.path.exists(f"/proc/{process.known_pid}")


def test_the_backoff_doubles_to_its_cap() -> None:
    backoff = Backoff(first=0.1, most=1.0)
    delays = [backoff.after(None)]
    for _ in range(5):
        delays.append(backoff.after(delays[-1]))
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


def test_a_killed_worker_is_started_again_in_its_slot_and_a_stop_stops_all() -> None:
    workers = Workers([serving, serving])

    def steps() -> None:
        until(lambda: workers.readiness.not_ready() is None, "both workers ready")
        first = workers.pids(0)[0]
        os.kill(first, signal.SIGKILL)
        until(lambda: len(workers.pids(0)) == 2, "worker 0 started again")
        until(lambda: workers.readiness.not_ready() is None, "worker 0 ready again")
        assert workers.exited == [first]
        assert len(workers.started[1]) == 1  # the other worker was left alone
        assert workers.readiness.not_alive() is None

    with supervising(workers, Backoff(first=0.05), steps) as outcome:
        assert outcome["status"] == 0
    survivors = [workers.started[0][1], workers.started[1][0]]
    assert all(_gone(p) for p in survivors)
    assert sorted(workers.exited) == sorted([workers.pids(0)[0], *(p.known_pid for p in survivors)])


def test_a_worker_that_keeps_exiting_fails_liveness_and_is_retried_with_backoff() -> None:
    workers = Workers([serving, failing])
    backoff = Backoff(first=0.05, most=0.2)

    def steps() -> None:
        until(lambda: workers.readiness.not_alive() is not None, "liveness to fail")
        assert "worker(s) 1 exited" in str(workers.readiness.not_alive())
        assert "worker(s) 1" in str(workers.readiness.not_ready())
        assert len(workers.started[1]) >= CRASH_LOOP
        assert len(workers.started[0]) == 1

    with supervising(workers, backoff, steps) as outcome:
        assert outcome["status"] == 0  # worker 0 stopped cleanly; worker 1 was not running


def test_the_delay_grows_while_a_worker_keeps_exiting(caplog: pytest.LogCaptureFixture) -> None:
    workers = Workers([failing])
    times: list[float] = []
    original = workers.spawn

    def spawn(index: int) -> BaseProcess:
        times.append(time.monotonic())
        return original(index)

    workers.spawn = spawn  # type: ignore[method-assign]

    def steps() -> None:
        until(lambda: len(workers.started[0]) == 5, "four restarts")

    with (
        caplog.at_level(logging.WARNING, logger="switchyard.extproc.supervisor"),
        supervising(workers, Backoff(first=0.2, most=0.8), steps),
    ):
        pass
    delays = [float(d) for d in re.findall(r"restarting in ([0-9.]+) s", caplog.text)]
    assert delays[:4] == [0.2, 0.4, 0.8, 0.8]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(gap >= delay for gap, delay in zip(gaps, delays, strict=False))  # waited


def test_a_worker_that_served_a_while_starts_over_at_the_first_delay() -> None:
    def briefly(flag: ReadyFlag) -> tuple[Callable[..., None], tuple[object, ...]]:
        return serve_then_exit, (flag, 0.4)

    workers = Workers([briefly])

    def steps() -> None:
        until(lambda: len(workers.started[0]) > CRASH_LOOP + 1, "more exits than a crash loop")
        assert workers.readiness.not_alive() is None  # each exit followed a served stretch

    with supervising(workers, Backoff(first=0.05, most=5.0, stable_s=0.2), steps):
        pass


def test_a_stop_cancels_a_pending_restart() -> None:
    workers = Workers([serving, failing])

    def steps() -> None:
        until(lambda: workers.readiness.not_ready() == "worker(s) 1 exited, restarting", "exit")

    with supervising(workers, Backoff(first=30.0), steps) as outcome:
        assert float(outcome["run_s"]) < 30  # type: ignore[arg-type]
    assert len(workers.started[1]) == 1
    assert _gone(workers.started[0][0])
