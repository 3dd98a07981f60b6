"""Opportunistic batching: work submitted while a batch is open runs together when it closes.

The HTTP/2 server opens a batch around each socket read. Under load Envoy often delivers
several ext_proc messages in one read; their router calls then reach onnxruntime as one batch.
Nothing waits for a batch to fill: a read is handled in one go, so this adds no latency and has
no timer. Outside an open batch (tests, resumed tasks) work runs at once, as before.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Deferred(Generic[R]):
    """The awaitable result of one item of a batch, set when the batch closes.

    Awaiting it yields the Deferred itself to whoever drives the coroutine: only the HTTP/2
    server's own driver (``GrpcConnection``) may see it, never an asyncio task.
    """

    __slots__ = ("error", "value")

    def __init__(self) -> None:
        self.value: R | None = None
        self.error: BaseException | None = None

    def __await__(self) -> Generator[Any, None, R]:
        yield self
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]


class Batch:
    """One batching window at a time, for the event loop that owns it."""

    __slots__ = ("_jobs", "is_open")

    def __init__(self) -> None:
        self.is_open = False
        self._jobs: dict[Callable[[list[Any]], Sequence[Any]], list[tuple[Any, Deferred[Any]]]] = {}

    def open(self) -> None:
        self.is_open = True

    def submit(self, run: Callable[[list[T]], Sequence[R]], item: T) -> Deferred[R]:
        """Queue ``item`` for ``run`` (which maps a list of items to their results, in order)."""
        deferred: Deferred[R] = Deferred()
        self._jobs.setdefault(run, []).append((item, deferred))
        return deferred

    def close(self) -> None:
        """Run every queued job, one call of ``run`` per distinct ``run``, and settle them."""
        self.is_open = False
        if not self._jobs:  # control frames, or requests routed without the router
            return
        jobs, self._jobs = self._jobs, {}
        for run, entries in jobs.items():
            try:
                results = run([item for item, _ in entries])
            except Exception as error:  # every item of the call fails the same way
                for _, deferred in entries:
                    deferred.error = error
                continue
            for (_, deferred), result in zip(entries, results, strict=True):
                deferred.value = result


BATCH = Batch()
"""The batch of this process's event loop (each ext_proc worker process runs one loop)."""
