"""Liveness and readiness of the ext_proc's workers, for the probes on the metrics port.

Each worker owns one byte of a shared-memory array and sets it once it serves with a routing
config loaded; the probes read the bytes and check, without reaping, that no worker process
has exited. Nothing here runs per request.
"""

from __future__ import annotations

from collections.abc import Sequence
from multiprocessing.connection import wait
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any


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
        self._flags = ctx.RawArray("b", workers)  # one writer per byte: no lock needed
        self._sentinels: list[int] = []

    def flag(self, index: int) -> ReadyFlag:
        return ReadyFlag(self._flags, index)

    def watch(self, processes: Sequence[BaseProcess]) -> None:
        """Follow these worker processes (index i is worker i)."""
        self._sentinels = [p.sentinel for p in processes]

    def _exited(self) -> list[int]:
        gone = set(wait(self._sentinels, 0)) if self._sentinels else set()
        return [i for i, s in enumerate(self._sentinels) if s in gone]

    def not_alive(self) -> str | None:
        """None while every worker process runs (no worker is ever restarted), else why not."""
        exited = self._exited()
        return f"worker(s) {_names(exited)} exited" if exited else None

    def not_ready(self) -> str | None:
        """None once every worker serves with a routing config, else why not."""
        dead = self.not_alive()
        if dead is not None:
            return dead
        waiting = [i for i, flag in enumerate(self._flags) if not flag]
        return f"worker(s) {_names(waiting)} have no routing config yet" if waiting else None


def _names(indexes: list[int]) -> str:
    return ", ".join(str(i) for i in indexes)
