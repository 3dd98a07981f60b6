"""HTTP/2 frames (RFC 9113 §4, §6): constants, serialising, and the per-frame checks that need
no connection state. Pure code, no I/O."""

from __future__ import annotations

import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20

SETTINGS_HEADER_TABLE_SIZE, SETTINGS_ENABLE_PUSH, SETTINGS_MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE, SETTINGS_MAX_HEADER_LIST_SIZE = 4, 5, 6

NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = 0x5, 0x6, 0x7, 0x8
COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x9, 0xB

MAX_WINDOW = 2**31 - 1
MIN_MAX_FRAME, MAX_MAX_FRAME = 1 << 14, (1 << 24) - 1

HEADER = struct.Struct(">HBBBI")  # 24-bit length as 16 + 8 bits, type, flags, stream id
U32 = struct.Struct(">I")
SETTING = struct.Struct(">HI")

# The exact payload length of fixed-size frames; anything else is FRAME_SIZE_ERROR.
FIXED_LENGTH = {PRIORITY: 5, RST_STREAM: 4, PING: 8, WINDOW_UPDATE: 4}


class ConnectionError_(Exception):  # the builtin ConnectionError is an OSError
    """A connection error (RFC 9113 §5.4.1): GOAWAY with ``code``, then close."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


class StreamError(Exception):
    """A stream error (RFC 9113 §5.4.2): RST_STREAM with ``code`` on ``stream_id``."""

    def __init__(self, stream_id: int, code: int) -> None:
        super().__init__(stream_id, code)
        self.stream_id = stream_id
        self.code = code


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One serialised frame."""
    size = len(payload)
    return HEADER.pack(size >> 8, size & 0xFF, kind, flags, stream_id) + payload


def goaway(last_stream: int, code: int) -> bytes:
    return frame(GOAWAY, 0, 0, U32.pack(last_stream) + U32.pack(code))


def rst_stream(stream_id: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream_id, U32.pack(code))


def settings(*pairs: tuple[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(SETTING.pack(key, value) for key, value in pairs))


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, U32.pack(increment))


def unpad(flags: int, payload: bytes) -> bytes:
    """The payload of a DATA or HEADERS frame without its padding (§6.1, §6.2)."""
    if not flags & PADDED:
        return payload
    if not payload or payload[0] >= len(payload):
        raise ConnectionError_(PROTOCOL_ERROR, "padding fills the frame")
    return payload[1 : len(payload) - payload[0]]


def header_fragment(flags: int, stream_id: int, payload: bytes) -> tuple[bytes, bool]:
    """A HEADERS frame's block fragment without padding and priority fields, and whether the
    stream depends on itself (a stream error once the block is decoded, §5.3.1)."""
    payload = unpad(flags, payload)
    if not flags & PRIORITY_FLAG:
        return payload, False
    if len(payload) < 5:
        raise ConnectionError_(FRAME_SIZE_ERROR, "HEADERS too short for its priority")
    return payload[5:], U32.unpack_from(payload)[0] & 0x7FFFFFFF == stream_id


def check_fixed(kind: int, stream_id: int, size: int) -> None:
    """Length and stream checks of PRIORITY, RST_STREAM, PING, WINDOW_UPDATE (§6)."""
    if kind == PRIORITY:
        if stream_id == 0:
            raise ConnectionError_(PROTOCOL_ERROR, "PRIORITY on stream 0")
        if size != 5:
            raise StreamError(stream_id, FRAME_SIZE_ERROR)
        return
    if kind == WINDOW_UPDATE and size != 4:
        raise ConnectionError_(FRAME_SIZE_ERROR, "WINDOW_UPDATE of length other than 4")
    if size != FIXED_LENGTH[kind]:
        raise ConnectionError_(FRAME_SIZE_ERROR, f"frame type {kind} of length {size}")
    if kind == PING and stream_id:
        raise ConnectionError_(PROTOCOL_ERROR, "PING on a stream")
    if kind == RST_STREAM and not stream_id:
        raise ConnectionError_(PROTOCOL_ERROR, "RST_STREAM on stream 0")


def parse_settings(flags: int, stream_id: int, payload: bytes) -> list[tuple[int, int]]:
    """The (key, value) pairs of a SETTINGS frame, checked (§6.5.2)."""
    if stream_id:
        raise ConnectionError_(PROTOCOL_ERROR, "SETTINGS on a stream")
    if flags & ACK:
        if payload:
            raise ConnectionError_(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
        return []
    if len(payload) % 6:
        raise ConnectionError_(FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
    pairs = [SETTING.unpack_from(payload, offset) for offset in range(0, len(payload), 6)]
    for key, value in pairs:
        if key == SETTINGS_ENABLE_PUSH and value > 1:
            raise ConnectionError_(PROTOCOL_ERROR, "ENABLE_PUSH not 0 or 1")
        if key == SETTINGS_INITIAL_WINDOW_SIZE and value > MAX_WINDOW:
            raise ConnectionError_(FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE over 2^31-1")
        if key == SETTINGS_MAX_FRAME_SIZE and not MIN_MAX_FRAME <= value <= MAX_MAX_FRAME:
            raise ConnectionError_(PROTOCOL_ERROR, "MAX_FRAME_SIZE out of range")
    return pairs
