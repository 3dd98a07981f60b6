"""Liveness and readiness of the ext_proc's workers, for the probes on the metrics port.

Each worker owns one byte of a shared-memory array and sets it once it serves with a routing
config loaded. The parent's supervisor (``supervisor.py``) clears a worker's byte before it
starts the worker again and tells this object when a worker exits; the probes read both. Nothing
here runs per request.
"""

from __future__ import annotations

from multiprocessing.context import BaseContext
from typing import Any

CRASH_LOOP = 5
"""Exits in a row (none after the worker had served a while) that fail liveness."""


class ReadyFlag:
    """One worker's byte; picklable, so it travels to a spawned worker."""

    def __init__(self, flags: Any, index: int) -> None:
        self._flags = flags
        self._index = index

    def set(self) -> None:
        self._flags[self._index] = 1


class WorkerReadiness:
    """What the parent knows about its ``workers`` workers."""

    def __init__(self, workers: int, ctx: BaseContext) -> None:
        self._flags = ctx.RawArray("b", workers)
        # worker → exits in a row, while it is not running. Replaced, never changed in place:
        # the supervisor (the parent's main thread) writes it, the probes' thread reads it.
        self._down: dict[int, int] = {}

    def flag(self, index: int) -> ReadyFlag:
        return ReadyFlag(self._flags, index)

    def ready(self, index: int) -> bool:
        """Whether worker ``index`` serves with a routing config."""
        return bool(self._flags[index])

    def starting(self, index: int) -> None:
        """Worker ``index`` (re)starts: not ready until it sets its flag again."""
        self._flags[index] = 0  # no worker process owns the byte now
        self._down = {i: n for i, n in self._down.items() if i != index}

    def exited(self, index: int, in_a_row: int) -> None:
        """Worker ``index`` exited, its ``in_a_row``-th exit without serving a while between."""
        self._flags[index] = 0
        self._down = {**self._down, index: in_a_row}

    def not_alive(self) -> str | None:
        """None unless a worker keeps exiting (a worker restarted once is alive), else why."""
        looping = sorted(i for i, n in self._down.items() if n >= CRASH_LOOP)  # one snapshot
        if not looping:
            return None
        return f"worker(s) {_names(looping)} exited {CRASH_LOOP} or more times in a row"

    def not_ready(self) -> str | None:
        """None once every worker serves with a routing config, else why not."""
        dead = self.not_alive()
        if dead is not None:
            return dead
        down = sorted(self._down)  # one snapshot
        if down:
            return f"worker(s) {_names(down)} exited, restarting"
        waiting = [i for i, flag in enumerate(self._flags) if not flag]
        return f"worker(s) {_names(waiting)} have no routing config yet" if waiting else None


def _names(indexes: list[int]) -> str:
    return ", ".join(str(i) for i in indexes)
