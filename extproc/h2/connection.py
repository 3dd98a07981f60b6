"""The server side of one HTTP/2 connection carrying gRPC calls: a state machine, no I/O.

Bytes go in through ``receive``; frames to send collect in ``out``; ``closed`` says the
connection failed (``out`` then ends with GOAWAY) and the driver must close the transport.
Complete gRPC request messages come out through the ``dispatch`` callback; the driver answers
with ``reply`` or ``finish``, at once or later (then ``resume``). Every bound is in ``limits``.

Streams we answered before the client ended its side stay known (bounded, ``_finished``) so
their late frames are checked, not mistaken for protocol errors or new streams.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from switchyard.extproc.h2 import limits
from switchyard.extproc.h2.frames import (
    ACK,
    COMPRESSION_ERROR,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    GOAWAY,
    HEADER,
    HEADERS,
    MAX_WINDOW,
    NO_ERROR,
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    REFUSED_STREAM,
    RST_STREAM,
    SETTINGS,
    SETTINGS_INITIAL_WINDOW_SIZE,
    SETTINGS_MAX_CONCURRENT_STREAMS,
    SETTINGS_MAX_FRAME_SIZE,
    SETTINGS_MAX_HEADER_LIST_SIZE,
    STREAM_CLOSED,
    U32,
    WINDOW_UPDATE,
    ConnectionError_,
    StreamError,
    check_fixed,
    frame,
    goaway,
    header_fragment,
    parse_settings,
    rst_stream,
    settings,
    unpad,
    window_update,
)
from switchyard.extproc.h2.hpack import HeaderListTooLarge, HpackDecoder, HpackError
from switchyard.extproc.h2.requests import (
    GRPC_RESOURCE_EXHAUSTED,
    GRPC_UNIMPLEMENTED,
    OK_TRAILERS,
    RESPONSE_HEADERS,
    Malformed,
    check_trailers,
    error_headers,
    request_target,
)
from switchyard.extproc.h2.stream import Stream

_PADDED_OR_PRIORITY = PADDED | PRIORITY_FLAG

_RESET, _PEER_CLOSED = 0, 1  # what ``_finished`` remembers of a stream that is not a Stream
_REMEMBERED = 4 * limits.MAX_CONCURRENT_STREAMS  # finished streams whose late frames we check
_WINDOW_NEEDED = limits.MAX_MESSAGE + 5  # stream window that lets a whole message arrive
# Hot-path copies of limits (module globals are cheaper than attributes).
_MAX_FRAME_SIZE = limits.MAX_FRAME_SIZE
_MAX_HEADER_BLOCK = limits.MAX_HEADER_BLOCK
_MAX_CONCURRENT_STREAMS = limits.MAX_CONCURRENT_STREAMS
_MAX_BUFFERED = limits.MAX_BUFFERED
_MAX_MESSAGE = limits.MAX_MESSAGE
_HALF_WINDOW = MAX_WINDOW // 2


class Connection:
    """One client connection's HTTP/2 and gRPC state, serving ``path``."""

    def __init__(
        self,
        path: str,
        open_stream: Callable[[], Any],
        dispatch: Callable[[Stream, bytes], None],
        abandon: Callable[[Stream], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.open_stream = open_stream
        self.dispatch = dispatch  # a complete request message for a stream that is not busy
        self.abandon = abandon  # a busy stream was reset: stop its handler
        # (stream state, request headers) of each new stream, when set (tracing reads them)
        self.on_headers: Callable[[Any, list[tuple[str, str]]], None] | None = None
        # a stream's state once the stream is over, however it ended, when set
        self.on_close: Callable[[Any], None] | None = None
        self.clock = clock
        self.hpack = HpackDecoder(max_list=limits.MAX_HEADER_LIST_SIZE)
        self.streams: dict[int, Stream] = {}
        self._finished: dict[int, Stream | int] = {}
        self._finished_order: deque[int] = deque()
        self.last_stream = 0
        self.accepting = True  # False once our final GOAWAY went out
        self.closed = False
        self.preface = False
        self.settled = False  # the client's first SETTINGS arrived
        self.buffer = bytearray()
        self.out: list[bytes] = []
        self.send_window = 65535
        self.initial_window = 65535
        self.peer_max_frame = 16384
        self.recv_window = MAX_WINDOW  # connection window we granted in ``initiate``
        self.buffered = 0  # request bytes held: partial and queued messages
        self.blocked_bytes = 0  # reply bytes waiting for the client's flow-control windows
        self.blocked: deque[tuple[Stream, bytes, bytes | None]] = deque()
        self.continuation: tuple[int, int, bytearray, int] | None = None
        self.zombies = 0
        self.opened = 0
        self.premature_resets = 0
        self.tokens = float(limits.CONTROL_BURST)
        self.stamp = clock()
        self._checked: dict[int, tuple[list[tuple[str, str]], str | None, int | None]] = {}

    # -- input -----------------------------------------------------------------------------
    def initiate(self) -> None:
        """Our SETTINGS and connection window, the first bytes we send."""
        self.out.append(
            settings(
                (SETTINGS_MAX_CONCURRENT_STREAMS, limits.MAX_CONCURRENT_STREAMS),
                (SETTINGS_INITIAL_WINDOW_SIZE, limits.STREAM_WINDOW),
                (SETTINGS_MAX_FRAME_SIZE, limits.MAX_FRAME_SIZE),
                (SETTINGS_MAX_HEADER_LIST_SIZE, limits.MAX_HEADER_LIST_SIZE),
            )
            + window_update(0, MAX_WINDOW - 65535)
        )

    def receive(self, data: bytes) -> None:
        """Consume bytes from the client; protocol errors end in GOAWAY and ``closed``."""
        if self.closed:
            return
        buffer = self.buffer
        buffer += data
        if not self.preface:
            size = len(PREFACE)
            if buffer[:size] != PREFACE[: len(buffer)]:
                self.fail(PROTOCOL_ERROR)
                return
            if len(buffer) < size:
                return
            del buffer[:size]
            self.preface = True
        offset, end = 0, len(buffer)
        try:
            while end - offset >= 9:
                high, low, kind, flags, stream_id = HEADER.unpack_from(buffer, offset)
                size = (high << 8) | low
                if size > _MAX_FRAME_SIZE:
                    raise ConnectionError_(FRAME_SIZE_ERROR, "frame over MAX_FRAME_SIZE")
                if end - offset - 9 < size:
                    break
                payload = bytes(buffer[offset + 9 : offset + 9 + size])
                offset += 9 + size
                stream_id &= 0x7FFFFFFF
                try:
                    self._frame(kind, flags, stream_id, payload)
                except StreamError as error:
                    self._stream_error(error.stream_id, error.code)
                if self.closed:
                    return
        except ConnectionError_ as error:
            self.fail(error.code)
            return
        except HpackError:
            self.fail(COMPRESSION_ERROR)
            return
        del buffer[:offset]

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self.continuation is not None or not self.settled:
            if self.continuation is not None and kind != CONTINUATION:
                raise ConnectionError_(PROTOCOL_ERROR, "a header block was interrupted")
            if not self.settled and (kind != SETTINGS or flags & ACK):
                raise ConnectionError_(PROTOCOL_ERROR, "the preface is not followed by SETTINGS")
        if kind == DATA:
            self._data(flags, stream_id, payload)
        elif kind == HEADERS:
            if not stream_id:
                raise ConnectionError_(PROTOCOL_ERROR, "HEADERS on stream 0")
            if flags & _PADDED_OR_PRIORITY:
                fragment, self_dependent = header_fragment(flags, stream_id, payload)
            else:  # Envoy's blocks: no padding, no priority fields
                fragment, self_dependent = payload, False
            if len(fragment) > _MAX_HEADER_BLOCK:
                self._check_block(len(fragment))
            if flags & END_HEADERS:
                self._headers(stream_id, flags, fragment, self_dependent)
            else:
                self.continuation = (stream_id, flags, bytearray(fragment), self_dependent)
        elif kind == CONTINUATION:
            self._continuation(flags, stream_id, payload)
        elif kind == SETTINGS:
            self._settings(flags, stream_id, payload)
        elif kind == WINDOW_UPDATE:
            if len(payload) != 4:
                check_fixed(kind, stream_id, len(payload))
            self._window_update(stream_id, U32.unpack(payload)[0] & 0x7FFFFFFF)
        elif kind == PING:
            check_fixed(kind, stream_id, len(payload))
            if not flags & ACK:
                self._spend()
                self.out.append(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            if len(payload) != 4 or not stream_id:
                check_fixed(kind, stream_id, len(payload))
            self._rst_stream(stream_id)
        elif kind == PRIORITY:
            self._spend()
            check_fixed(kind, stream_id, len(payload))
            if U32.unpack_from(payload)[0] & 0x7FFFFFFF == stream_id:
                raise StreamError(stream_id, PROTOCOL_ERROR)
        elif kind == GOAWAY:
            if stream_id:
                raise ConnectionError_(PROTOCOL_ERROR, "GOAWAY on a stream")
            if len(payload) < 8:
                raise ConnectionError_(FRAME_SIZE_ERROR, "GOAWAY shorter than 8")
            # Envoy opens new streams elsewhere; ours finish, then it closes.
        elif kind == PUSH_PROMISE:
            raise ConnectionError_(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        else:
            self._spend()  # unknown frame types are ignored (§5.5), but not for free

    # -- header blocks ---------------------------------------------------------------------
    def _check_block(self, size: int) -> None:
        if size > limits.MAX_HEADER_BLOCK:
            raise ConnectionError_(ENHANCE_YOUR_CALM, "header block over MAX_HEADER_BLOCK")

    def _continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        pending = self.continuation
        if pending is None or pending[0] != stream_id:
            raise ConnectionError_(PROTOCOL_ERROR, "CONTINUATION without a header block")
        first_id, first_flags, block, count = pending
        if count >= limits.MAX_CONTINUATIONS:
            raise ConnectionError_(ENHANCE_YOUR_CALM, "CONTINUATION flood")
        block += payload
        self._check_block(len(block))
        if flags & END_HEADERS:
            self.continuation = None
            self._headers(first_id, first_flags, bytes(block), False)
        else:
            self.continuation = (first_id, first_flags, block, count + 1)

    def _headers(self, stream_id: int, flags: int, block: bytes, self_dependent: bool) -> None:
        try:
            headers: list[tuple[str, str]] | None = self.hpack.decode(block)  # keeps HPACK in step
        except HeaderListTooLarge:
            headers = None
        stream = self.streams.get(stream_id)
        if stream is not None or stream_id <= self.last_stream:
            self._trailers(stream, stream_id, flags, headers)
            return
        if stream_id % 2 == 0:
            raise ConnectionError_(PROTOCOL_ERROR, "a client stream with an even id")
        self.last_stream = stream_id
        if self_dependent:
            raise StreamError(stream_id, PROTOCOL_ERROR)
        if not self.accepting:
            self._remember(stream_id, _RESET)  # after our GOAWAY: ignored (§6.8)
            return
        if len(self.streams) + self.zombies >= _MAX_CONCURRENT_STREAMS:
            raise StreamError(stream_id, REFUSED_STREAM)
        self.opened += 1
        stream = Stream(stream_id, None, self.initial_window)
        if headers is None:
            self._answer_only(stream, flags, GRPC_RESOURCE_EXHAUSTED, "header list too large")
            return
        checked = self._checked.get(id(headers))
        if checked is not None and checked[0] is headers:
            path, expected = checked[1], checked[2]
        else:
            path, expected = self._target(stream_id, headers)
        stream.expected = expected
        if path != self.path:
            self._answer_only(stream, flags, GRPC_UNIMPLEMENTED, f"unknown method {path}")
            return
        stream.state = self.open_stream()
        if self.on_headers is not None:
            self.on_headers(stream.state, headers)
        self.streams[stream_id] = stream
        if flags & END_STREAM:
            self._end_of_data(stream)

    def _target(
        self, stream_id: int, headers: list[tuple[str, str]]
    ) -> tuple[str | None, int | None]:
        """request_target, cached with the decoder's cached header lists."""
        try:
            path, expected = request_target(headers)
        except Malformed:
            raise StreamError(stream_id, PROTOCOL_ERROR) from None
        if len(self._checked) >= 64:
            self._checked.clear()
        self._checked[id(headers)] = (headers, path, expected)
        return path, expected

    def _answer_only(self, stream: Stream, flags: int, status: int, message: str) -> None:
        """A trailers-only gRPC error for a stream we do not serve."""
        if flags & END_STREAM:
            stream.ended = True
        self.finish(stream, status, message)

    def _trailers(
        self,
        stream: Stream | None,
        stream_id: int,
        flags: int,
        headers: list[tuple[str, str]] | None,
    ) -> None:
        """A second header block on a stream: the client's trailers, which end its side."""
        if stream is None:
            known = self._finished.get(stream_id)
            if known is None:
                raise ConnectionError_(PROTOCOL_ERROR, "HEADERS on a closed or reused stream id")
            if known == _PEER_CLOSED:
                raise ConnectionError_(STREAM_CLOSED, "HEADERS after END_STREAM")
            if not isinstance(known, Stream):
                return  # we reset it: ignore (§5.1)
            stream = known
        if stream.ended:
            raise StreamError(stream_id, STREAM_CLOSED)
        if not flags & END_STREAM:
            raise StreamError(stream_id, PROTOCOL_ERROR)
        try:
            check_trailers(headers or [])
        except Malformed:
            raise StreamError(stream_id, PROTOCOL_ERROR) from None
        self._end_of_data(stream)

    # -- data ------------------------------------------------------------------------------
    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        size = len(payload)
        recv_window = self.recv_window - size
        if recv_window < _HALF_WINDOW:
            if recv_window < 0:
                raise ConnectionError_(FLOW_CONTROL_ERROR, "DATA beyond the connection window")
            self.out.append(window_update(0, MAX_WINDOW - recv_window))
            recv_window = MAX_WINDOW
        self.recv_window = recv_window
        if flags & PADDED:
            payload = unpad(flags, payload)
        stream = self.streams.get(stream_id)
        if stream is None or stream.ended or stream.expected is not None or not payload:
            self._rare_data(flags, stream_id, stream, payload, size)
            return
        stream.recv -= size
        if stream.recv < 0:
            raise StreamError(stream_id, FLOW_CONTROL_ERROR)
        self._append(stream, payload)
        if flags & END_STREAM and not stream.reset:
            self._end_of_data(stream)

    def _rare_data(
        self, flags: int, stream_id: int, stream: Stream | None, payload: bytes, size: int
    ) -> None:
        """DATA that is empty, counted against a content-length, or not on an open stream."""
        if stream is None:
            known = self._finished.get(stream_id)
            if known.__class__ is Stream and not size and flags & END_STREAM:
                self._end_of_data(known)  # the usual end of a call
                return
            stream = self._late_data(stream_id, known)
            if stream is None:
                return
        elif stream.ended:
            raise StreamError(stream_id, STREAM_CLOSED)
        if not size and not flags & END_STREAM:
            self._spend()  # an empty frame that asks nothing
        stream.recv -= size
        if stream.recv < 0:
            raise StreamError(stream_id, FLOW_CONTROL_ERROR)
        if stream.expected is not None:
            stream.expected -= len(payload)
            if stream.expected < 0:
                raise StreamError(stream_id, PROTOCOL_ERROR)
        if payload and not stream.closed:
            self._append(stream, payload)
        if flags & END_STREAM and not stream.reset:
            self._end_of_data(stream)

    def _late_data(self, stream_id: int, known: Stream | int | None) -> Stream | None:
        """DATA on a stream that is not open: the Stream to check it against, or None."""
        if not stream_id:
            raise ConnectionError_(PROTOCOL_ERROR, "DATA on stream 0")
        if stream_id > self.last_stream:
            raise ConnectionError_(PROTOCOL_ERROR, "DATA on an idle stream")
        if known == _PEER_CLOSED or (isinstance(known, Stream) and known.ended):
            raise ConnectionError_(STREAM_CLOSED, "DATA after END_STREAM")
        return known if isinstance(known, Stream) else None

    def _append(self, stream: Stream, payload: bytes) -> None:
        """Add DATA to the stream's message; dispatch what completes."""
        size = len(payload)
        buffer = stream.buffer
        if not buffer and size >= 5 and not stream.busy:  # usual: one whole message per frame
            length = U32.unpack_from(payload, 1)[0]
            if size == 5 + length and not payload[0] and length <= _MAX_MESSAGE:
                if stream.recv < _WINDOW_NEEDED:
                    self._credit(stream)
                self.dispatch(stream, payload[5:])
                return
        if self.buffered + self.blocked_bytes + size > _MAX_BUFFERED:
            raise StreamError(stream.id, ENHANCE_YOUR_CALM)
        buffer += payload
        self.buffered += size
        while len(buffer) >= 5:
            size = U32.unpack_from(buffer, 1)[0]
            if buffer[0] or size > _MAX_MESSAGE:
                self.finish(
                    stream,
                    GRPC_UNIMPLEMENTED if buffer[0] else GRPC_RESOURCE_EXHAUSTED,
                    "compressed messages are not supported" if buffer[0] else "message too large",
                )
                return
            if len(buffer) < 5 + size:
                break
            message = bytes(buffer[5 : 5 + size])
            del buffer[: 5 + size]
            if stream.recv + len(buffer) < _WINDOW_NEEDED:
                self._credit(stream)
            if stream.busy:
                stream.queue.append(message)
            else:
                self.buffered -= 5 + size
                self.dispatch(stream, message)
            if stream.closed:
                return

    def _credit(self, stream: Stream) -> None:
        """Give the stream its window back, so that a whole next message can arrive."""
        credit = limits.STREAM_WINDOW - stream.recv - len(stream.buffer)
        stream.recv += credit
        self.out.append(window_update(stream.id, credit))

    def _end_of_data(self, stream: Stream) -> None:
        """The client ended its side (END_STREAM on DATA or trailers)."""
        if stream.expected:
            raise StreamError(stream.id, PROTOCOL_ERROR)  # fewer bytes than content-length
        stream.ended = True
        if stream.closed:  # we had answered already: now the stream is closed both ways
            if not stream.pending:  # (else its replies still need WINDOW_UPDATEs)
                self._finished[stream.id] = _PEER_CLOSED
            return
        if not stream.busy and not stream.queue:
            self.finish(stream)

    # -- control frames --------------------------------------------------------------------
    def _settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        pairs = parse_settings(flags, stream_id, payload)
        if flags & ACK:
            return
        self._spend()
        self.settled = True
        for key, value in pairs:
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                delta = value - self.initial_window
                for stream in self._sending_streams():
                    stream.window += delta
                    if stream.window > MAX_WINDOW:
                        raise ConnectionError_(FLOW_CONTROL_ERROR, "a stream window over 2^31-1")
                self.initial_window = value
            elif key == SETTINGS_MAX_FRAME_SIZE:
                self.peer_max_frame = value
        self.out.append(frame(SETTINGS, ACK, 0))
        self._unblock()

    def _sending_streams(self) -> list[Stream]:
        finished = [s for s in self._finished.values() if isinstance(s, Stream)]
        return [*self.streams.values(), *finished]

    def _window_update(self, stream_id: int, increment: int) -> None:
        if stream_id == 0:
            if not increment:
                raise ConnectionError_(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise ConnectionError_(FLOW_CONTROL_ERROR, "connection window over 2^31-1")
        else:
            stream = self.streams.get(stream_id)
            if stream is None:
                if stream_id > self.last_stream:
                    raise ConnectionError_(PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
                known = self._finished.get(stream_id)
                if not isinstance(known, Stream):
                    return  # closed: ignored (§6.9)
                stream = known
            if not increment:
                raise StreamError(stream_id, PROTOCOL_ERROR)
            stream.window += increment
            if stream.window > MAX_WINDOW:
                raise StreamError(stream_id, FLOW_CONTROL_ERROR)
        if self.blocked:
            self._unblock()

    def _rst_stream(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id > self.last_stream:
                raise ConnectionError_(PROTOCOL_ERROR, "RST_STREAM on an idle stream")
            known = self._finished.get(stream_id)
            if known.__class__ is Stream:  # the usual end of a call Envoy closes by RST_STREAM
                known.reset = True
                if known.pending:
                    self._drop_blocked(known)
                self._finished[stream_id] = _PEER_CLOSED
            return
        self.premature_resets += 1
        stream.reset = True
        self._close(stream, _PEER_CLOSED)
        if (
            self.opened >= limits.RESET_MIN_STREAMS
            and self.premature_resets > self.opened * limits.RESET_RATIO
        ):
            raise ConnectionError_(ENHANCE_YOUR_CALM, "rapid reset")

    def _stream_error(self, stream_id: int, code: int) -> None:
        """RST_STREAM, and forget the stream (§5.4.2)."""
        self._spend_or_fail()
        if self.closed:
            return
        self.out.append(rst_stream(stream_id, code))
        stream = self.streams.get(stream_id)
        if stream is None:
            known = self._finished.get(stream_id)
            stream = known if isinstance(known, Stream) else None
        if stream is not None:
            self._close(stream, _RESET)
        else:
            self._remember(stream_id, _RESET)

    def _spend(self) -> None:
        """One token of the control-frame budget (ping/settings/reset floods)."""
        now = self.clock()
        tokens = min(limits.CONTROL_BURST, self.tokens + (now - self.stamp) * limits.CONTROL_RATE)
        self.stamp = now
        if tokens < 1:
            raise ConnectionError_(ENHANCE_YOUR_CALM, "control frame flood")
        self.tokens = tokens - 1

    def _spend_or_fail(self) -> None:
        try:
            self._spend()
        except ConnectionError_ as error:
            self.fail(error.code)

    # -- replies ---------------------------------------------------------------------------
    def reply(self, stream: Stream, response: bytes, done: bool) -> None:
        """Send one response message; ``done`` ends the call with OK trailers."""
        if stream.closed:
            return
        if not stream.started:
            stream.started = True
            self.out.append(frame(HEADERS, END_HEADERS, stream.id, RESPONSE_HEADERS))
        data = b"\x00" + U32.pack(len(response)) + response
        if stream.pending or len(data) > self.send_window or len(data) > stream.window:
            self._send(stream, data, OK_TRAILERS if done else None)
        else:
            self._write(stream, data, OK_TRAILERS if done else None)
        if done:
            self._close(stream, _PEER_CLOSED if stream.ended and not stream.pending else stream)

    def finish(self, stream: Stream, status: int = 0, message: str = "") -> None:
        """End the call: OK trailers, or an error status."""
        if stream.closed:
            return
        if status == 0:
            if not stream.started:
                self.out.append(frame(HEADERS, END_HEADERS, stream.id, RESPONSE_HEADERS))
            trailers = OK_TRAILERS
        else:
            trailers = error_headers(status, message)
            if stream.started:
                trailers = trailers[len(RESPONSE_HEADERS) :]
        self._send(stream, b"", trailers)
        self._close(stream, _PEER_CLOSED if stream.ended and not stream.pending else stream)

    def resume(self, stream: Stream) -> None:
        """After a late answer: the messages that queued meanwhile, then a pending half-close."""
        while stream.queue and not stream.busy and not stream.closed:
            message = stream.queue.popleft()
            self.buffered -= 5 + len(message)
            self.dispatch(stream, message)
        if stream.ended and not stream.busy and not stream.closed:
            self.finish(stream)

    def _close(self, stream: Stream, memory: Stream | int) -> None:
        """Forget an open stream; ``memory`` is what its later frames are checked against."""
        if stream.closed:
            return
        stream.closed = True
        self.streams.pop(stream.id, None)
        if self.on_close is not None:
            self.on_close(stream.state)
        if stream.buffer:
            self.buffered -= len(stream.buffer)
            stream.buffer = bytearray()
        if stream.queue:
            self.buffered -= sum(5 + len(m) for m in stream.queue)
            stream.queue.clear()
        if memory == _RESET:
            stream.reset = True
        if stream.reset:
            self._drop_blocked(stream)
            if stream.busy:
                stream.zombie = True
                self.zombies += 1
                self.abandon(stream)
        finished = self._finished
        if stream.id not in finished:  # (always, unless the id was refused or ignored)
            order = self._finished_order
            order.append(stream.id)
            if len(order) > _REMEMBERED:
                finished.pop(order.popleft(), None)
        finished[stream.id] = memory

    def _remember(self, stream_id: int, memory: Stream | int) -> None:
        finished = self._finished
        if stream_id not in finished:
            self._finished_order.append(stream_id)
            if len(self._finished_order) > _REMEMBERED:
                finished.pop(self._finished_order.popleft(), None)
        finished[stream_id] = memory

    def _send(self, stream: Stream, data: bytes, trailers: bytes | None) -> None:
        """DATA within the flow-control windows (the rest waits), then optional trailers."""
        if stream.reset:
            return
        if stream.pending or len(data) > min(self.send_window, stream.window):
            stream.pending += 1
            self.blocked.append((stream, data, trailers))
            self.blocked_bytes += len(data)
            if len(self.blocked) == 1:
                self._unblock()  # what fits goes now
            return
        self._write(stream, data, trailers)

    def _write(self, stream: Stream, data: bytes, trailers: bytes | None) -> None:
        self.send_window -= len(data)
        stream.window -= len(data)
        limit = self.peer_max_frame
        # Trailers only (no data) writes no DATA frame: one before a reply's first HEADERS is a
        # protocol error to the peer.
        if 0 < len(data) <= limit:
            self.out.append(frame(DATA, 0, stream.id, data))
        elif data:
            for start in range(0, len(data), limit):
                self.out.append(frame(DATA, 0, stream.id, data[start : start + limit]))
        if trailers is not None:
            self.out.append(frame(HEADERS, END_HEADERS | END_STREAM, stream.id, trailers))

    def _drop_blocked(self, stream: Stream) -> None:
        """A reset stream's replies are never sent."""
        if stream.pending:
            stream.pending = 0
            kept = deque(entry for entry in self.blocked if entry[0] is not stream)
            self.blocked_bytes = sum(len(data) for _, data, _ in kept)
            self.blocked = kept

    def _unblock(self) -> None:
        """Send blocked replies in order, as far as the windows allow."""
        blocked = self.blocked
        while blocked:
            stream, data, trailers = blocked[0]
            sendable = min(self.send_window, stream.window, len(data))
            if sendable < len(data):
                if sendable > 0:
                    self._write(stream, data[:sendable], None)
                    blocked[0] = (stream, data[sendable:], trailers)
                    self.blocked_bytes -= sendable
                return
            blocked.popleft()
            stream.pending -= 1
            self.blocked_bytes -= len(data)
            self._write(stream, data, trailers)

    # -- connection ------------------------------------------------------------------------
    def fail(self, code: int) -> None:
        """A connection error: GOAWAY with ``code``; the driver closes the transport."""
        if self.closed:
            return
        self.out.append(goaway(self.last_stream, code))
        self.lost()

    def announce_shutdown(self) -> None:
        """The first GOAWAY of a graceful close: open no more streams, those in flight are
        still served (the last stream id is the largest possible)."""
        if not self.closed:
            self.out.append(goaway(0x7FFFFFFF, NO_ERROR) + frame(PING, 0, 0, bytes(8)))

    def goaway(self, code: int = NO_ERROR) -> None:
        """GOAWAY naming the last stream we serve; later streams are ignored."""
        if not self.closed:
            self.out.append(goaway(self.last_stream, code))
            self.accepting = False

    def lost(self) -> None:
        """The connection is over: reset every stream, stop their handlers."""
        self.closed = True
        for stream in list(self.streams.values()):
            stream.reset = True
            self._close(stream, _RESET)
        self.blocked.clear()
        self.blocked_bytes = 0
        self.continuation = None
