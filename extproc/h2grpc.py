"""A minimal gRPC server over cleartext HTTP/2, for Envoy's ext_proc stream.

grpc.aio costs about 0.36 ms of CPU per ext_proc message in a do-nothing server, more than
routing itself. Envoy is the only client and it calls one method, so this module speaks just
what that needs, on an asyncio Protocol: HTTP/2 framing and flow control (RFC 9113), an HPACK
decoder (RFC 7541) whose results are cached per header block (Envoy's blocks repeat exactly
once its dynamic table is warm), length-prefixed gRPC messages and ``grpc-status`` trailers.
Nothing is compressed, and other methods get UNIMPLEMENTED.

Handlers see raw message bytes and return raw response bytes, so the hot path builds no
protobuf objects it does not need. A handler coroutine that never suspends is run to completion
inside ``data_received``; one that does suspend continues as a task. Each read is handled inside
an open ``batching.BATCH``: a handler waiting on a batched result is parked and resumed, still
inside ``data_received``, once the batch has run.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import types
from collections import deque
from collections.abc import Coroutine, Generator
from typing import Any, Protocol
from urllib.parse import quote

from switchyard.extproc.batching import BATCH, Deferred

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE = 0x4, 0x5
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR, COMPRESSION_ERROR = 0, 1, 3, 6, 9
MAX_WINDOW = 2**31 - 1
MAX_FRAME = 1 << 20  # what we accept; fewer frames for large bodies
MAX_MESSAGE = 64 * 1024 * 1024
GRPC_UNIMPLEMENTED, GRPC_INTERNAL, GRPC_RESOURCE_EXHAUSTED = 12, 13, 8

_HEADER = struct.Struct(">HBBBI")  # 24-bit length as 16 + 8 bits, type, flags, stream id
_U32 = struct.Struct(">I")
_SETTING = struct.Struct(">HI")

# RFC 7541 Appendix B: (code, bit length) of symbols 0-255 and EOS (256).
_HUFFMAN = (
    (0x1FF8, 13),
    (0x7FFFD8, 23),
    (0xFFFFFE2, 28),
    (0xFFFFFE3, 28),
    (0xFFFFFE4, 28),
    (0xFFFFFE5, 28),
    (0xFFFFFE6, 28),
    (0xFFFFFE7, 28),
    (0xFFFFFE8, 28),
    (0xFFFFEA, 24),
    (0x3FFFFFFC, 30),
    (0xFFFFFE9, 28),
    (0xFFFFFEA, 28),
    (0x3FFFFFFD, 30),
    (0xFFFFFEB, 28),
    (0xFFFFFEC, 28),
    (0xFFFFFED, 28),
    (0xFFFFFEE, 28),
    (0xFFFFFEF, 28),
    (0xFFFFFF0, 28),
    (0xFFFFFF1, 28),
    (0xFFFFFF2, 28),
    (0x3FFFFFFE, 30),
    (0xFFFFFF3, 28),
    (0xFFFFFF4, 28),
    (0xFFFFFF5, 28),
    (0xFFFFFF6, 28),
    (0xFFFFFF7, 28),
    (0xFFFFFF8, 28),
    (0xFFFFFF9, 28),
    (0xFFFFFFA, 28),
    (0xFFFFFFB, 28),
    (0x14, 6),
    (0x3F8, 10),
    (0x3F9, 10),
    (0xFFA, 12),
    (0x1FF9, 13),
    (0x15, 6),
    (0xF8, 8),
    (0x7FA, 11),
    (0x3FA, 10),
    (0x3FB, 10),
    (0xF9, 8),
    (0x7FB, 11),
    (0xFA, 8),
    (0x16, 6),
    (0x17, 6),
    (0x18, 6),
    (0x0, 5),
    (0x1, 5),
    (0x2, 5),
    (0x19, 6),
    (0x1A, 6),
    (0x1B, 6),
    (0x1C, 6),
    (0x1D, 6),
    (0x1E, 6),
    (0x1F, 6),
    (0x5C, 7),
    (0xFB, 8),
    (0x7FFC, 15),
    (0x20, 6),
    (0xFFB, 12),
    (0x3FC, 10),
    (0x1FFA, 13),
    (0x21, 6),
    (0x5D, 7),
    (0x5E, 7),
    (0x5F, 7),
    (0x60, 7),
    (0x61, 7),
    (0x62, 7),
    (0x63, 7),
    (0x64, 7),
    (0x65, 7),
    (0x66, 7),
    (0x67, 7),
    (0x68, 7),
    (0x69, 7),
    (0x6A, 7),
    (0x6B, 7),
    (0x6C, 7),
    (0x6D, 7),
    (0x6E, 7),
    (0x6F, 7),
    (0x70, 7),
    (0x71, 7),
    (0x72, 7),
    (0xFC, 8),
    (0x73, 7),
    (0xFD, 8),
    (0x1FFB, 13),
    (0x7FFF0, 19),
    (0x1FFC, 13),
    (0x3FFC, 14),
    (0x22, 6),
    (0x7FFD, 15),
    (0x3, 5),
    (0x23, 6),
    (0x4, 5),
    (0x24, 6),
    (0x5, 5),
    (0x25, 6),
    (0x26, 6),
    (0x27, 6),
    (0x6, 5),
    (0x74, 7),
    (0x75, 7),
    (0x28, 6),
    (0x29, 6),
    (0x2A, 6),
    (0x7, 5),
    (0x2B, 6),
    (0x76, 7),
    (0x2C, 6),
    (0x8, 5),
    (0x9, 5),
    (0x2D, 6),
    (0x77, 7),
    (0x78, 7),
    (0x79, 7),
    (0x7A, 7),
    (0x7B, 7),
    (0x7FFE, 15),
    (0x7FC, 11),
    (0x3FFD, 14),
    (0x1FFD, 13),
    (0xFFFFFFC, 28),
    (0xFFFE6, 20),
    (0x3FFFD2, 22),
    (0xFFFE7, 20),
    (0xFFFE8, 20),
    (0x3FFFD3, 22),
    (0x3FFFD4, 22),
    (0x3FFFD5, 22),
    (0x7FFFD9, 23),
    (0x3FFFD6, 22),
    (0x7FFFDA, 23),
    (0x7FFFDB, 23),
    (0x7FFFDC, 23),
    (0x7FFFDD, 23),
    (0x7FFFDE, 23),
    (0xFFFFEB, 24),
    (0x7FFFDF, 23),
    (0xFFFFEC, 24),
    (0xFFFFED, 24),
    (0x3FFFD7, 22),
    (0x7FFFE0, 23),
    (0xFFFFEE, 24),
    (0x7FFFE1, 23),
    (0x7FFFE2, 23),
    (0x7FFFE3, 23),
    (0x7FFFE4, 23),
    (0x1FFFDC, 21),
    (0x3FFFD8, 22),
    (0x7FFFE5, 23),
    (0x3FFFD9, 22),
    (0x7FFFE6, 23),
    (0x7FFFE7, 23),
    (0xFFFFEF, 24),
    (0x3FFFDA, 22),
    (0x1FFFDD, 21),
    (0xFFFE9, 20),
    (0x3FFFDB, 22),
    (0x3FFFDC, 22),
    (0x7FFFE8, 23),
    (0x7FFFE9, 23),
    (0x1FFFDE, 21),
    (0x7FFFEA, 23),
    (0x3FFFDD, 22),
    (0x3FFFDE, 22),
    (0xFFFFF0, 24),
    (0x1FFFDF, 21),
    (0x3FFFDF, 22),
    (0x7FFFEB, 23),
    (0x7FFFEC, 23),
    (0x1FFFE0, 21),
    (0x1FFFE1, 21),
    (0x3FFFE0, 22),
    (0x1FFFE2, 21),
    (0x7FFFED, 23),
    (0x3FFFE1, 22),
    (0x7FFFEE, 23),
    (0x7FFFEF, 23),
    (0xFFFEA, 20),
    (0x3FFFE2, 22),
    (0x3FFFE3, 22),
    (0x3FFFE4, 22),
    (0x7FFFF0, 23),
    (0x3FFFE5, 22),
    (0x3FFFE6, 22),
    (0x7FFFF1, 23),
    (0x3FFFFE0, 26),
    (0x3FFFFE1, 26),
    (0xFFFEB, 20),
    (0x7FFF1, 19),
    (0x3FFFE7, 22),
    (0x7FFFF2, 23),
    (0x3FFFE8, 22),
    (0x1FFFFEC, 25),
    (0x3FFFFE2, 26),
    (0x3FFFFE3, 26),
    (0x3FFFFE4, 26),
    (0x7FFFFDE, 27),
    (0x7FFFFDF, 27),
    (0x3FFFFE5, 26),
    (0xFFFFF1, 24),
    (0x1FFFFED, 25),
    (0x7FFF2, 19),
    (0x1FFFE3, 21),
    (0x3FFFFE6, 26),
    (0x7FFFFE0, 27),
    (0x7FFFFE1, 27),
    (0x3FFFFE7, 26),
    (0x7FFFFE2, 27),
    (0xFFFFF2, 24),
    (0x1FFFE4, 21),
    (0x1FFFE5, 21),
    (0x3FFFFE8, 26),
    (0x3FFFFE9, 26),
    (0xFFFFFFD, 28),
    (0x7FFFFE3, 27),
    (0x7FFFFE4, 27),
    (0x7FFFFE5, 27),
    (0xFFFEC, 20),
    (0xFFFFF3, 24),
    (0xFFFED, 20),
    (0x1FFFE6, 21),
    (0x3FFFE9, 22),
    (0x1FFFE7, 21),
    (0x1FFFE8, 21),
    (0x7FFFF3, 23),
    (0x3FFFEA, 22),
    (0x3FFFEB, 22),
    (0x1FFFFEE, 25),
    (0x1FFFFEF, 25),
    (0xFFFFF4, 24),
    (0xFFFFF5, 24),
    (0x3FFFFEA, 26),
    (0x7FFFF4, 23),
    (0x3FFFFEB, 26),
    (0x7FFFFE6, 27),
    (0x3FFFFEC, 26),
    (0x3FFFFED, 26),
    (0x7FFFFE7, 27),
    (0x7FFFFE8, 27),
    (0x7FFFFE9, 27),
    (0x7FFFFEA, 27),
    (0x7FFFFEB, 27),
    (0xFFFFFFE, 28),
    (0x7FFFFEC, 27),
    (0x7FFFFED, 27),
    (0x7FFFFEE, 27),
    (0x7FFFFEF, 27),
    (0x7FFFFF0, 27),
    (0x3FFFFEE, 26),
    (0x3FFFFFFF, 30),
)
# RFC 7541 Appendix A.
_STATIC: tuple[tuple[str, str], ...] = (
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
)


class HpackError(Exception):
    """A header block that does not decode."""


def _build_huffman_tree() -> dict[tuple[int, int], int]:
    return {(length, code): symbol for symbol, (code, length) in enumerate(_HUFFMAN)}


_HUFFMAN_BY_CODE = _build_huffman_tree()


def huffman_decode(data: bytes) -> bytes:
    """Decode one Huffman-coded string (rare here: decoded blocks are cached)."""
    out = bytearray()
    code = length = 0
    for byte in data:
        for shift in range(7, -1, -1):
            code = (code << 1) | ((byte >> shift) & 1)
            length += 1
            symbol = _HUFFMAN_BY_CODE.get((length, code))
            if symbol is not None:
                if symbol == 256:
                    raise HpackError("EOS in a Huffman string")
                out.append(symbol)
                code = length = 0
            elif length > 30:
                raise HpackError("bad Huffman code")
    if length > 7 or code != (1 << length) - 1:
        raise HpackError("bad Huffman padding")
    return bytes(out)


def _integer(block: bytes, i: int, prefix: int) -> tuple[int, int]:
    mask = (1 << prefix) - 1
    value = block[i] & mask
    i += 1
    if value < mask:
        return value, i
    shift = 0
    while True:
        if i >= len(block) or shift > 28:
            raise HpackError("bad integer")
        byte = block[i]
        i += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def _string(block: bytes, i: int) -> tuple[str, int]:
    if i >= len(block):
        raise HpackError("truncated string")
    huffman = block[i] & 0x80
    length, i = _integer(block, i, 7)
    raw = block[i : i + length]
    if len(raw) != length:
        raise HpackError("truncated string")
    return (huffman_decode(raw) if huffman else raw).decode("latin-1"), i + length


class HpackDecoder:
    """One connection's HPACK decoder (the default 4,096-byte table; never resized up)."""

    def __init__(self, max_size: int = 4096) -> None:
        self.limit = self.max_size = max_size
        self.size = 0
        self.table: deque[tuple[str, str]] = deque()
        self._cache: dict[bytes, list[tuple[str, str]]] = {}

    def _get(self, index: int) -> tuple[str, str]:
        if 0 < index <= len(_STATIC):
            return _STATIC[index - 1]
        offset = index - len(_STATIC) - 1
        if 0 <= offset < len(self.table):
            return self.table[offset]
        raise HpackError(f"bad header index {index}")

    def _add(self, name: str, value: str) -> None:
        self.table.appendleft((name, value))
        self.size += len(name) + len(value) + 32
        self._evict()

    def _evict(self) -> None:
        while self.size > self.max_size and self.table:
            name, value = self.table.pop()
            self.size -= len(name) + len(value) + 32

    def decode(self, block: bytes) -> list[tuple[str, str]]:
        """The (name, value) pairs of one complete header block."""
        cached = self._cache.get(block)
        if cached is not None:
            return cached
        headers: list[tuple[str, str]] = []
        changed = False
        i, end = 0, len(block)
        while i < end:
            byte = block[i]
            if byte & 0x80:  # indexed field
                index, i = _integer(block, i, 7)
                headers.append(self._get(index))
                continue
            if byte & 0xE0 == 0x20:  # dynamic table size update
                size, i = _integer(block, i, 5)
                if size > self.limit:
                    raise HpackError("table size update over the limit")
                self.max_size = size
                self._evict()
                changed = True
                continue
            indexing = bool(byte & 0x40)
            index, i = _integer(block, i, 6 if indexing else 4)
            if index:
                name = self._get(index)[0]
            else:
                name, i = _string(block, i)
            value, i = _string(block, i)
            headers.append((name, value))
            if indexing:
                self._add(name, value)
                changed = True
        if changed:
            self._cache.clear()
        else:
            if len(self._cache) >= 64:
                self._cache.clear()
            self._cache[block] = headers
        return headers


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame."""
    size = len(payload)
    return _HEADER.pack(size >> 8, size & 0xFF, kind, flags, stream_id) + payload


def _literal(name: bytes, value: bytes) -> bytes:
    """A header as an HPACK literal without indexing, new name, no Huffman (short strings)."""
    assert len(name) < 127 and len(value) < 127
    return b"\x00" + bytes((len(name),)) + name + bytes((len(value),)) + value


# ":status: 200" is static entry 8; content-type is static name 31 (literal, not indexed).
_RESPONSE_HEADERS = b"\x88\x0f\x10\x10application/grpc"
_OK_TRAILERS = _literal(b"grpc-status", b"0")


def _error_headers(status: int, message: str) -> bytes:
    text = quote(message, safe=" !#$&'()*+,-./:;=?@[]^_`{|}~")[:120].encode()
    return (
        _RESPONSE_HEADERS
        + _literal(b"grpc-status", str(status).encode())
        + _literal(b"grpc-message", text)
    )


class StreamHandler(Protocol):
    """What a server method implements: per-stream state, and one reply per message."""

    def open(self) -> Any:
        """State for a new stream."""
        ...

    def message(self, stream: Any, payload: bytes) -> Coroutine[Any, Any, tuple[bytes, bool]]:
        """Answer one request message: (serialized response, True when the call is over)."""
        ...


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


class _Stream:
    __slots__ = ("buffer", "busy", "ended", "id", "queue", "started", "state", "window")

    def __init__(self, stream_id: int, state: Any, window: int) -> None:
        self.id = stream_id
        self.state = state
        self.buffer = bytearray()
        self.queue: deque[bytes] = deque()
        self.busy = False  # a message's handler has not finished yet
        self.started = False  # response headers sent
        self.ended = False  # the client half-closed
        self.window = window


class GrpcConnection(asyncio.Protocol):
    """One HTTP/2 connection from Envoy, serving ``path`` with ``handler``."""

    def __init__(self, path: str, handler: StreamHandler) -> None:
        self.path = path
        self.handler = handler
        self.transport: asyncio.Transport | None = None
        self.hpack = HpackDecoder()
        self.streams: dict[int, _Stream] = {}
        self.last_stream = 0
        self.preface = False
        self.buffer = bytearray()
        self.out: list[bytes] = []
        self.send_window = 65535
        self.initial_window = 65535
        self.peer_max_frame = 16384
        self.received = 0  # DATA bytes not yet given back with a connection WINDOW_UPDATE
        self.continuation: tuple[int, int, bytearray] | None = None  # (stream, flags, block)
        self.blocked: deque[tuple[_Stream, bytes, bytes | None]] = deque()
        # handlers waiting on this read's batch (batching.BATCH), resumed when it has run
        self.parked: list[tuple[_Stream, Coroutine[Any, Any, tuple[bytes, bool]]]] = []

    # -- transport callbacks ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        settings = _SETTING.pack(SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW) + _SETTING.pack(
            SETTINGS_MAX_FRAME_SIZE, MAX_FRAME
        )
        self.transport.write(  # type: ignore[union-attr]
            frame(SETTINGS, 0, 0, settings)
            + frame(WINDOW_UPDATE, 0, 0, _U32.pack(MAX_WINDOW - 65535))
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.streams.clear()
        self.blocked.clear()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        BATCH.open()
        try:
            self._receive(data)
        finally:
            self._run_batch()
            self._flush()

    def _receive(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if not self.preface:
            if len(buffer) < len(PREFACE):
                if not PREFACE.startswith(bytes(buffer)):
                    self._fail(PROTOCOL_ERROR)
                return
            if buffer[: len(PREFACE)] != PREFACE:
                self._fail(PROTOCOL_ERROR)
                return
            del buffer[: len(PREFACE)]
            self.preface = True
        offset, end = 0, len(buffer)
        try:
            while end - offset >= 9:
                high, low, kind, flags, stream_id = _HEADER.unpack_from(buffer, offset)
                size = (high << 8) | low
                if size > MAX_FRAME:
                    raise _ConnectionError(FRAME_SIZE_ERROR)
                if end - offset - 9 < size:
                    break
                payload = bytes(buffer[offset + 9 : offset + 9 + size])
                offset += 9 + size
                self._frame(kind, flags, stream_id & 0x7FFFFFFF, payload)
                if self.transport is None:
                    return
        except (_ConnectionError, HpackError) as exc:
            del buffer[:offset]
            self._fail(exc.code if isinstance(exc, _ConnectionError) else COMPRESSION_ERROR)
            return
        del buffer[:offset]

    # -- frames ----------------------------------------------------------------------------
    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self.continuation is not None and kind != CONTINUATION:
            raise _ConnectionError(PROTOCOL_ERROR)
        if kind == DATA:
            self._data(flags, stream_id, payload)
        elif kind == HEADERS:
            if flags & PADDED:
                payload = payload[1 : len(payload) - payload[0]]
            if flags & PRIORITY_FLAG:
                payload = payload[5:]
            if flags & END_HEADERS:
                self._headers(stream_id, flags, payload)
            else:
                self.continuation = (stream_id, flags, bytearray(payload))
        elif kind == CONTINUATION:
            if self.continuation is None or self.continuation[0] != stream_id:
                raise _ConnectionError(PROTOCOL_ERROR)
            self.continuation[2].extend(payload)
            if flags & END_HEADERS:
                stream_id, first_flags, block = self.continuation
                self.continuation = None
                self._headers(stream_id, first_flags, bytes(block))
        elif kind == SETTINGS:
            if not flags & ACK:
                self._settings(payload)
        elif kind == WINDOW_UPDATE:
            self._window_update(stream_id, payload)
        elif kind == PING:
            if not flags & ACK:
                self.out.append(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            self.streams.pop(stream_id, None)
        elif kind == GOAWAY:
            pass  # Envoy opens new streams elsewhere; ours finish, then it closes
        elif kind == PUSH_PROMISE:
            raise _ConnectionError(PROTOCOL_ERROR)
        # PRIORITY and unknown frame types are ignored, as RFC 9113 requires.

    def _headers(self, stream_id: int, flags: int, block: bytes) -> None:
        headers = self.hpack.decode(block)  # always, to keep the dynamic table in step
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers from the client: only ends its side
            if flags & END_STREAM:
                self._client_end(stream)
            return
        if stream_id % 2 == 0 or stream_id <= self.last_stream:
            raise _ConnectionError(PROTOCOL_ERROR)
        self.last_stream = stream_id
        path = next((value for name, value in headers if name == ":path"), None)
        if path != self.path:
            self.out.append(
                frame(
                    HEADERS,
                    END_HEADERS | END_STREAM,
                    stream_id,
                    _error_headers(GRPC_UNIMPLEMENTED, f"unknown method {path}"),
                )
            )
            return
        stream = _Stream(stream_id, self.handler.open(), self.initial_window)
        self.streams[stream_id] = stream
        if flags & END_STREAM:
            self._client_end(stream)

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        self.received += len(payload)
        if self.received > MAX_WINDOW // 2:
            self.out.append(frame(WINDOW_UPDATE, 0, 0, _U32.pack(self.received)))
            self.received = 0
        stream = self.streams.get(stream_id)
        if stream is None:
            return  # a stream we already finished or reset
        if flags & PADDED:
            payload = payload[1 : len(payload) - payload[0]]
        buffer = stream.buffer
        buffer += payload
        while len(buffer) >= 5:
            size = _U32.unpack_from(buffer, 1)[0]
            if buffer[0] or size > MAX_MESSAGE:
                self._finish(
                    stream,
                    GRPC_UNIMPLEMENTED if buffer[0] else GRPC_RESOURCE_EXHAUSTED,
                    "compressed messages are not supported" if buffer[0] else "message too large",
                )
                return
            if len(buffer) < 5 + size:
                break
            message = bytes(buffer[5 : 5 + size])
            del buffer[: 5 + size]
            if stream.busy:
                stream.queue.append(message)
            else:
                self._dispatch(stream, message)
            if stream.id not in self.streams:
                return
        if flags & END_STREAM:
            self._client_end(stream)

    def _client_end(self, stream: _Stream) -> None:
        stream.ended = True
        if not stream.busy and not stream.queue:
            self._finish(stream)

    def _settings(self, payload: bytes) -> None:
        if len(payload) % 6:
            raise _ConnectionError(FRAME_SIZE_ERROR)
        for offset in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, offset)
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ConnectionError(FLOW_CONTROL_ERROR)
                for stream in self.streams.values():
                    stream.window += value - self.initial_window
                self.initial_window = value
            elif key == SETTINGS_MAX_FRAME_SIZE:
                self.peer_max_frame = value
        self.out.append(frame(SETTINGS, ACK, 0))
        self._unblock()

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if stream_id == 0:
            self.send_window += increment
        else:
            stream = self.streams.get(stream_id)
            if stream is None:
                return
            stream.window += increment
        self._unblock()

    # -- handlers and replies --------------------------------------------------------------
    def _dispatch(self, stream: _Stream, message: bytes) -> None:
        self._drive(stream, self.handler.message(stream.state, message))

    def _drive(self, stream: _Stream, coro: Coroutine[Any, Any, tuple[bytes, bool]]) -> bool:
        """Run a handler until it answers (True), or park it: on the open batch, or as a task."""
        try:
            pending = coro.send(None)
        except StopIteration as done:
            self._reply(stream, *done.value)
            return True
        except Exception:
            log.exception("ext_proc handler failed")
            self._finish(stream, GRPC_INTERNAL, "handler failed")
            return True
        stream.busy = True
        if isinstance(pending, Deferred):
            self.parked.append((stream, coro))
        else:
            task = asyncio.ensure_future(_resume(coro, pending))
            task.add_done_callback(lambda task: self._resumed(stream, task))
        return False

    def _run_batch(self) -> None:
        """Close this read's batch, then resume the handlers that waited on it."""
        BATCH.close()
        parked, self.parked = self.parked, []
        for stream, coro in parked:
            stream.busy = False
            if self.streams.get(stream.id) is not stream:
                coro.close()  # reset, or the connection failed meanwhile
            elif self._drive(stream, coro):
                self._drain(stream)

    def _resumed(self, stream: _Stream, task: asyncio.Future[tuple[bytes, bool]]) -> None:
        stream.busy = False
        if self.streams.get(stream.id) is not stream:
            return  # reset, or the connection closed meanwhile
        if task.cancelled() or task.exception() is not None:
            if not task.cancelled():
                log.error("ext_proc handler failed", exc_info=task.exception())
            self._finish(stream, GRPC_INTERNAL, "handler failed")
        else:
            self._reply(stream, *task.result())
            self._drain(stream)
        self._flush()

    def _drain(self, stream: _Stream) -> None:
        """After a late answer: the messages that queued meanwhile, then a pending half-close."""
        while stream.queue and not stream.busy and stream.id in self.streams:
            self._dispatch(stream, stream.queue.popleft())
        if stream.ended and not stream.busy and stream.id in self.streams:
            self._finish(stream)

    def _reply(self, stream: _Stream, response: bytes, done: bool) -> None:
        if not stream.started:
            stream.started = True
            self.out.append(frame(HEADERS, END_HEADERS, stream.id, _RESPONSE_HEADERS))
        data = _U32.pack(len(response))
        self._send(stream, b"\x00" + data + response, _OK_TRAILERS if done else None)
        if done:
            del self.streams[stream.id]

    def _finish(self, stream: _Stream, status: int = 0, message: str = "") -> None:
        """End the call: OK trailers, or an error status."""
        self.streams.pop(stream.id, None)
        if status == 0:
            if not stream.started:
                self.out.append(frame(HEADERS, END_HEADERS, stream.id, _RESPONSE_HEADERS))
            trailers = _OK_TRAILERS
        else:
            trailers = _error_headers(status, message)
            if stream.started:
                trailers = trailers[len(_RESPONSE_HEADERS) :]
        self._send(stream, b"", trailers)

    def _send(self, stream: _Stream, data: bytes, trailers: bytes | None) -> None:
        """DATA within the flow-control windows (the rest waits), then optional trailers."""
        if self.blocked and any(s is stream for s, _, _ in self.blocked):
            self.blocked.append((stream, data, trailers))
            return
        allowed = min(self.send_window, stream.window)
        if len(data) > allowed:
            self.blocked.append((stream, data, trailers))
            return
        self.send_window -= len(data)
        stream.window -= len(data)
        limit = self.peer_max_frame
        for start in range(0, len(data), limit):
            self.out.append(frame(DATA, 0, stream.id, data[start : start + limit]))
        if trailers is not None:
            self.out.append(frame(HEADERS, END_HEADERS | END_STREAM, stream.id, trailers))

    def _unblock(self) -> None:
        blocked, self.blocked = self.blocked, deque()
        while blocked:
            stream, data, trailers = blocked.popleft()
            sendable = min(self.send_window, stream.window, len(data))
            if sendable < len(data):
                if sendable > 0:
                    self._send(stream, data[:sendable], None)
                    data = data[sendable:]
                self.blocked.append((stream, data, trailers))
                self.blocked.extend(blocked)
                return
            self._send(stream, data, trailers)

    def _flush(self) -> None:
        if self.out and self.transport is not None:
            out, self.out = self.out, []
            self.transport.write(b"".join(out))

    def _fail(self, code: int) -> None:
        if self.transport is not None:
            self.out.append(frame(GOAWAY, 0, 0, _U32.pack(self.last_stream) + _U32.pack(code)))
            self._flush()
            self.transport.close()
            self.transport = None

    def goaway(self) -> None:
        """Tell the client to open no new streams here (shutdown)."""
        if self.transport is not None:
            self.out.append(frame(GOAWAY, 0, 0, _U32.pack(self.last_stream) + _U32.pack(NO_ERROR)))
            self._flush()


class _ConnectionError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code
