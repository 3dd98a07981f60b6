"""Keeps the ext_proc's worker processes running.

Worker ``i`` always listens on the same address, so a worker that dies (killed, out of memory,
a crash) is started again there, after a delay that doubles with each exit in a row (0.1 s up
to 5 s) and starts over once a worker has served a while. SIGINT/SIGTERM stop the workers and
no worker starts after them. The signal handler only records the signal; the loop, woken
through ``signal.set_wakeup_fd``, does the work, so no restart can race a stop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType

from switchyard.extproc.health import WorkerReadiness

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5  # how often a worker's readiness is sampled (for the backoff reset)


@dataclass(frozen=True)
class Backoff:
    """Delays between a worker's restarts: ``first``, then doubling up to ``most``; a worker
    that served (was ready) ``stable_s`` or longer before it exited starts over at ``first``."""

    first: float = 0.1
    most: float = 5.0
    stable_s: float = 10.0

    def after(self, last: float | None) -> float:
        """The delay that follows ``last`` (None: the first exit of a series)."""
        return self.first if last is None else min(last * 2, self.most)


@dataclass
class _Slot:
    index: int
    process: BaseProcess | None = None
    delay: float | None = None  # the last restart's delay; None: none since it last served
    in_a_row: int = 0  # exits without serving ``stable_s`` between them
    ready_since: float | None = None
    restart_at: float | None = None
    exitcode: int = 0  # of the worker the stop ended


@dataclass
class Supervisor:
    """Runs ``workers`` processes from ``spawn(i)`` (a process not started yet) until signalled.

    ``readiness`` follows every start and exit; ``exited(pid)`` runs for each worker reaped.
    """

    workers: int
    spawn: Callable[[int], BaseProcess]
    readiness: WorkerReadiness
    exited: Callable[[int], None] = lambda _pid: None
    backoff: Backoff = field(default_factory=Backoff)
    poll_s: float = POLL_SECONDS
    _signals: list[int] = field(init=False, default_factory=list)

    def run(self) -> int:
        """Supervise until SIGINT/SIGTERM and every worker has stopped; returns the highest
        exit status of the workers the stop ended (0 when they all stopped cleanly)."""
        slots = [_Slot(i) for i in range(self.workers)]
        wake_read, wake_write = socket.socketpair()
        wake_read.setblocking(False)
        wake_write.setblocking(False)
        previous = {s: signal.signal(s, self._record) for s in (signal.SIGINT, signal.SIGTERM)}
        old_wakeup = signal.set_wakeup_fd(wake_write.fileno())
        try:
            for slot in slots:
                self._start(slot)
            self._loop(slots, wake_read)
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            wake_read.close()
            wake_write.close()
        return max((slot.exitcode for slot in slots), default=0)

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        self._signals.append(signum)

    def _loop(self, slots: list[_Slot], wake: socket.socket) -> None:
        stopping = False
        while True:
            while self._signals:
                stopping = True
                self._forward(slots, self._signals.pop(0))
            running = [s for s in slots if s.process is not None]
            if stopping and not running:
                return
            now = time.monotonic()
            for slot in running:
                if slot.ready_since is None and self.readiness.ready(slot.index):
                    slot.ready_since = now
            deadlines = [s.restart_at for s in slots if s.restart_at is not None]
            timeout = min([self.poll_s, *(max(0.0, d - now) for d in deadlines)])
            sentinels = {s.process.sentinel: s for s in running if s.process is not None}
            ready = wait([wake, *sentinels], timeout)
            if wake in ready:
                _drain(wake)
            for sentinel in ready:
                if sentinel in sentinels:
                    self._reap(sentinels[sentinel], restart=not stopping and not self._signals)
            now = time.monotonic()
            for slot in slots:
                if slot.restart_at is not None and slot.restart_at <= now and not self._signals:
                    self._start(slot)

    def _forward(self, slots: list[_Slot], signum: int) -> None:
        for slot in slots:
            slot.restart_at = None  # a worker waiting for its restart stays stopped
            if slot.process is not None and slot.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):  # exited: its sentinel reaps it
                    os.kill(slot.process.pid, signum)

    def _start(self, slot: _Slot) -> None:
        slot.restart_at = None
        slot.ready_since = None
        self.readiness.starting(slot.index)
        slot.process = self.spawn(slot.index)
        slot.process.start()
        if slot.in_a_row:
            log.warning("ext_proc worker %d restarted as pid %d", slot.index, slot.process.pid)

    def _reap(self, slot: _Slot, restart: bool) -> None:
        process = slot.process
        assert process is not None
        process.join()
        slot.process = None
        pid, code = process.pid, process.exitcode or 0
        process.close()
        if pid is not None:
            self.exited(pid)
        if not restart:
            slot.exitcode = code
            return
        now = time.monotonic()
        served = now - slot.ready_since if slot.ready_since is not None else 0.0
        if served >= self.backoff.stable_s:
            slot.in_a_row, slot.delay = 0, None
        slot.in_a_row += 1
        slot.delay = self.backoff.after(slot.delay)
        slot.restart_at = now + slot.delay
        self.readiness.exited(slot.index, slot.in_a_row)
        log.warning(
            "ext_proc worker %d (pid %s) %s after serving %.1f s; restarting in %.1f s "
            "(exit %d in a row)",
            slot.index, pid, _how(code), served, slot.delay, slot.in_a_row,
        )  # fmt: skip


def _how(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


def _drain(wake: socket.socket) -> None:
    try:
        while wake.recv(64):
            pass
    except BlockingIOError:
        pass
