"""A minimal gRPC server over cleartext HTTP/2, for Envoy's ext_proc stream: the asyncio driver.

grpc.aio costs about 0.36 ms of CPU per ext_proc message in a do-nothing server, more than
routing itself. Envoy is the only client and it calls one method, so ``switchyard.extproc.h2``
speaks just what that needs (framing, flow control, HPACK decoding, gRPC messages and
``grpc-status`` trailers, with the limits in ``h2.limits``), and this module runs it on an
asyncio Protocol. Nothing is compressed, and other methods get UNIMPLEMENTED.

Handlers see raw message bytes and return raw response bytes, so the hot path builds no
protobuf objects it does not need. A handler coroutine that never suspends is run to completion
inside ``data_received``; one that does suspend continues as a task. Each read is handled inside
an open ``batching.BATCH``: a handler waiting on a batched result is parked and resumed, still
inside ``data_received``, once the batch has run. The driver also owns the connection's timers
(preface and idle timeouts) and its backpressure (no reading while the socket's write buffer
is full).
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import Coroutine, Generator
from typing import Any, Protocol

from switchyard.extproc.batching import BATCH, Deferred
from switchyard.extproc.h2 import limits
from switchyard.extproc.h2.connection import Connection
from switchyard.extproc.h2.frames import (
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    INTERNAL_ERROR,
    PREFACE,
    SETTINGS,
    frame,
)
from switchyard.extproc.h2.hpack import HpackDecoder, huffman_decode
from switchyard.extproc.h2.requests import GRPC_INTERNAL
from switchyard.extproc.h2.stream import Stream

log = logging.getLogger(__name__)

__all__ = [
    "DATA",
    "END_HEADERS",
    "END_STREAM",
    "HEADERS",
    "PREFACE",
    "SETTINGS",
    "GrpcConnection",
    "HpackDecoder",
    "StreamHandler",
    "frame",
    "huffman_decode",
]

_DRAIN_CHECKS = 30  # graceful close: give in-flight streams this many DRAIN_GRACE periods


class StreamHandler(Protocol):
    """What a server method implements: per-stream state, and one reply per message."""

    def open(self) -> Any:
        """State for a new stream."""
        ...

    def message(self, stream: Any, payload: bytes) -> Coroutine[Any, Any, tuple[bytes, bool]]:
        """Answer one request message: (serialized response, True when the call is over)."""
        ...

    # Optional: ``on_headers(state, headers)``, an attribute, is called with each new stream's
    # decoded request header list when it is not None (the processor sets it when tracing);
    # ``closed(state)``, a method, once its stream is over, however it ended.


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], pending: Any) -> Generator[Any, Any, Any]:
    """Continue a coroutine that was started by hand and then suspended on ``pending``."""
    while True:
        try:
            sent = yield pending
        except BaseException as exc:  # a task cancellation: pass it into the coroutine
            try:
                pending = coro.throw(exc)
            except StopIteration as done:
                return done.value
        else:
            try:
                pending = coro.send(sent)
            except StopIteration as done:
                return done.value


class GrpcConnection(asyncio.Protocol):
    """One HTTP/2 connection from Envoy, serving ``path`` with ``handler``."""

    def __init__(self, path: str, handler: StreamHandler) -> None:
        self.path = path
        self.handler = handler
        self.h2 = Connection(path, handler.open, self._dispatch, self._abandon)
        self.h2.on_headers = getattr(handler, "on_headers", None)  # request headers, if wanted
        self.h2.on_close = getattr(handler, "closed", None)
        self.transport: asyncio.Transport | None = None
        # handlers waiting on this read's batch (batching.BATCH), resumed when it has run
        self.parked: list[tuple[Stream, Coroutine[Any, Any, tuple[bytes, bool]]]] = []
        self.running = 0  # handler tasks not finished
        self.active = False  # bytes arrived since the last idle check
        self.timer: asyncio.TimerHandle | None = None
        self.drain_checks = 0

    # -- transport callbacks ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.h2.initiate()
        self._flush()
        self._later(limits.PREFACE_TIMEOUT, self._preface_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.h2.lost()
        self.transport = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()  # a client that does not read gets no more answers

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.active = True
        BATCH.open()
        try:
            self.h2.receive(data)
        except Exception:  # a bug, never a peer's input: close this connection only
            log.exception("HTTP/2 connection failed")
            self.h2.fail(INTERNAL_ERROR)
        finally:
            self._run_batch()
            self._flush()

    # -- handlers --------------------------------------------------------------------------
    def _dispatch(self, stream: Stream, message: bytes) -> None:
        self._drive(stream, self.handler.message(stream.state, message))

    def _drive(self, stream: Stream, coro: Coroutine[Any, Any, tuple[bytes, bool]]) -> bool:
        """Run a handler until it answers (True), or park it: on the open batch, or as a task."""
        try:
            pending = coro.send(None)
        except StopIteration as done:
            self.h2.reply(stream, *done.value)
            return True
        except Exception:
            log.exception("ext_proc handler failed")
            self.h2.finish(stream, GRPC_INTERNAL, "handler failed")
            return True
        stream.busy = True
        if isinstance(pending, Deferred):
            self.parked.append((stream, coro))
        else:
            self.running += 1
            stream.task = task = asyncio.ensure_future(_resume(coro, pending))
            task.add_done_callback(lambda task: self._resumed(stream, task, coro))
        return False

    def _abandon(self, stream: Stream) -> None:
        """A busy stream was reset: stop its task (a parked one is closed after the batch)."""
        if stream.task is not None:
            stream.task.cancel()

    def _release(self, stream: Stream) -> bool:
        """The handler stopped; True when its stream still wants the answer."""
        stream.busy = False
        stream.task = None
        if stream.zombie:
            stream.zombie = False
            self.h2.zombies -= 1
        return not stream.closed

    def _run_batch(self) -> None:
        """Close this read's batch, then resume the handlers that waited on it."""
        BATCH.close()
        parked, self.parked = self.parked, []
        for stream, coro in parked:
            if not self._release(stream):
                coro.close()  # reset, or the connection failed meanwhile
            elif self._drive(stream, coro):
                self.h2.resume(stream)

    def _resumed(
        self,
        stream: Stream,
        task: asyncio.Future[tuple[bytes, bool]],
        coro: Coroutine[Any, Any, tuple[bytes, bool]],
    ) -> None:
        self.running -= 1
        if task.cancelled():
            coro.close()  # a task cancelled before its first step never reached the handler
        if not self._release(stream):
            return  # reset, or the connection closed meanwhile
        if task.cancelled() or task.exception() is not None:
            if not task.cancelled():
                log.error("ext_proc handler failed", exc_info=task.exception())
            self.h2.finish(stream, GRPC_INTERNAL, "handler failed")
        else:
            self.h2.reply(stream, *task.result())
            self.h2.resume(stream)
        self._flush()

    # -- output and timers -----------------------------------------------------------------
    def _flush(self) -> None:
        h2 = self.h2
        transport = self.transport
        if transport is None:
            h2.out.clear()
            return
        if h2.out:
            out, h2.out = h2.out, []
            transport.write(b"".join(out))
        if h2.closed:
            transport.close()
            self.transport = None

    def _later(self, delay: float, callback: Any) -> None:
        if self.timer is not None:
            self.timer.cancel()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # driven by hand, outside a loop (tests): no timers
            return
        self.timer = loop.call_later(delay, callback)

    def _preface_timeout(self) -> None:
        if not self.h2.settled:
            if self.transport is not None:
                self.transport.close()
                self.transport = None
            return
        self.active = False
        self._later(limits.IDLE_TIMEOUT, self._idle_check)

    def _idle_check(self) -> None:
        """Nothing received for IDLE_TIMEOUT and no handler running: close gracefully."""
        if self.transport is None:
            return
        if self.active or self.running:
            self.active = False
            self._later(limits.IDLE_TIMEOUT, self._idle_check)
            return
        self.h2.announce_shutdown()
        self._flush()
        self._later(limits.DRAIN_GRACE, self._drain)

    def _drain(self) -> None:
        """Second phase of a graceful close: the final GOAWAY, then close once streams end."""
        if self.transport is None:
            return
        if self.h2.accepting:
            self.h2.goaway()
            self._flush()
        self.drain_checks += 1
        if self.h2.streams and self.drain_checks < _DRAIN_CHECKS:
            self._later(limits.DRAIN_GRACE, self._drain)
            return
        self.h2.lost()
        self._flush()
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    def goaway(self) -> None:
        """Tell the client to open no new streams here (shutdown)."""
        if self.transport is not None:
            self.h2.goaway()
            self._flush()
