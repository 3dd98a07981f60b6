"""One HTTP/2 stream carrying one gRPC call: what the connection and the driver track."""

from __future__ import annotations

from collections import deque
from typing import Any

from switchyard.extproc.h2 import limits


class Stream:
    """One call. ``busy``, ``task`` and ``state`` belong to the driver."""

    __slots__ = (
        "buffer",
        "busy",
        "closed",
        "ended",
        "expected",
        "id",
        "pending",
        "queue",
        "recv",
        "reset",
        "started",
        "state",
        "task",
        "window",
        "zombie",
    )

    def __init__(self, stream_id: int, state: Any, window: int) -> None:
        self.id = stream_id
        self.state = state
        self.buffer = bytearray()  # a request message not yet complete
        self.queue: deque[bytes] = deque()  # messages that arrived while the handler was busy
        self.busy = False  # a message's handler has not finished yet
        self.started = False  # response headers sent
        self.ended = False  # the client half-closed
        self.closed = False  # we ended the call (trailers or RST_STREAM)
        self.reset = False  # nothing more may be sent on it
        self.zombie = False  # reset while its handler ran: counts as open until it stops
        self.window = window  # what we may send
        self.recv = limits.STREAM_WINDOW  # what the client may send
        self.expected: int | None = None  # content-length bytes still to come
        self.pending = 0  # replies waiting in Connection.blocked
        self.task: Any = None
