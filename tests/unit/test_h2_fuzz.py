"""Property tests: arbitrary and mutated frame sequences, in arbitrary read sizes, against the
HTTP/2 server. Deterministic (derandomized, a fixed number of examples), a few seconds in all.

For every input: nothing raises out of ``data_received`` and no bug reaches its safety net
(GOAWAY INTERNAL_ERROR); the server's output is whole frames; buffered bytes, the read buffer,
header blocks, streams and remembered streams stay within ``limits``; a connection error ends
in GOAWAY and a close, with nothing written after; and a new connection still serves a call.
"""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from switchyard.extproc.batching import BATCH
from switchyard.extproc.h2 import limits
from switchyard.extproc.h2.connection import _REMEMBERED
from switchyard.extproc.h2.frames import (
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    INTERNAL_ERROR,
    NO_ERROR,
    PREFACE,
    SETTINGS,
    frame,
)
from switchyard.extproc.h2.hpack import literal
from switchyard.extproc.h2grpc import GrpcConnection

METHOD = "/test.Echo/Stream"
BLOCK = b"".join(
    literal(name, value)
    for name, value in [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", METHOD.encode()),
        (b"te", b"trailers"),
    ]
)
# Warm-table blocks as Envoy sends them: literals with incremental indexing, then indexes.
INDEXING_BLOCK = b"".join(b"\x40" + literal(n, v)[1:] for n, v in [(b"x-a", b"1"), (b"x-b", b"2")])
FUZZ = settings(
    max_examples=500,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class Echo:
    def open(self) -> None:
        return None

    async def message(self, _: None, payload: bytes) -> tuple[bytes, bool]:
        return payload[::-1], payload == b"last"


def _same(items: list[bytes]) -> list[bytes]:
    return items


class Batched(Echo):
    """Waits on the read's batch first: its stream is busy, later messages queue."""

    async def message(self, _: None, payload: bytes) -> tuple[bytes, bool]:
        if BATCH.is_open:
            payload = await BATCH.submit(_same, payload)
        return payload[::-1], payload == b"last"


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.after_close = 0

    def write(self, data: Any) -> None:
        if self.closed:
            self.after_close += len(data)
        self.written += data

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _frames(written: bytes) -> list[tuple[int, int, int, bytes]]:
    out, offset = [], 0
    while offset < len(written):
        size = int.from_bytes(written[offset : offset + 3], "big")
        assert offset + 9 + size <= len(written), "a partial frame in the output"
        kind, flags = written[offset + 3], written[offset + 4]
        stream_id = int.from_bytes(written[offset + 5 : offset + 9], "big")
        out.append((kind, flags, stream_id, written[offset + 9 : offset + 9 + size]))
        offset += 9 + size
    return out


def _message(body: bytes) -> bytes:
    return b"\x00" + len(body).to_bytes(4, "big") + body


stream_ids = st.sampled_from([0, 1, 1, 3, 3, 5, 2, 7, 2**31 - 1])
any_frame = st.builds(
    frame,
    st.integers(0, 12),
    st.integers(0, 255),
    stream_ids,
    st.binary(max_size=64),
)
plausible_frame = st.one_of(
    st.builds(lambda s, f: frame(HEADERS, f, s, BLOCK), stream_ids, st.sampled_from([4, 5, 0, 13])),
    st.builds(lambda s: frame(HEADERS, END_HEADERS, s, INDEXING_BLOCK + BLOCK), stream_ids),
    st.builds(
        lambda s, f, b: frame(DATA, f, s, _message(b)),
        stream_ids,
        st.sampled_from([0, 1, 8, 9]),
        st.sampled_from([b"", b"x", b"last", b"y" * 70_000]),
    ),
    st.builds(lambda s, b: frame(9, 4, s, b), stream_ids, st.binary(max_size=16)),
    st.builds(
        lambda pairs: frame(
            SETTINGS, 0, 0, b"".join(k.to_bytes(2, "big") + v.to_bytes(4, "big") for k, v in pairs)
        ),
        st.lists(
            st.tuples(st.integers(0, 8), st.sampled_from([0, 1, 100, 16384, 2**31 - 1, 2**32 - 1])),
            max_size=3,
        ),
    ),
    st.builds(
        lambda s, n: frame(8, 0, s, n.to_bytes(4, "big")),
        stream_ids,
        st.sampled_from([0, 1, 65535, 2**31 - 1]),
    ),
    st.builds(lambda s: frame(3, 0, s, b"\x00\x00\x00\x08"), stream_ids),
    st.just(frame(6, 0, 0, bytes(8))),
    any_frame,
)


@st.composite
def mutated(draw: st.DrawFn) -> list[bytes]:
    """Plausible frames, some bytes changed (lengths, flags, ids, HPACK), cut into reads."""
    data = bytearray(b"".join(draw(st.lists(plausible_frame, min_size=1, max_size=12))))
    for _ in range(draw(st.integers(0, 4))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    return [bytes(data[a:b]) for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def _feed(reads: list[bytes], handler: Echo | None = None) -> tuple[GrpcConnection, Transport]:
    conn = GrpcConnection(METHOD, handler or Echo())
    transport = Transport()
    conn.connection_made(transport)
    for data in reads:
        conn.data_received(data)  # never raises: a raise fails the example
        assert not BATCH.is_open
        h2 = conn.h2
        assert h2.buffered >= 0 and h2.buffered + h2.blocked_bytes <= limits.MAX_BUFFERED
        assert len(h2.buffer) < 9 + limits.MAX_FRAME_SIZE + len(data)
        assert h2.continuation is None or len(h2.continuation[2]) <= limits.MAX_HEADER_BLOCK
        assert len(h2.streams) <= limits.MAX_CONCURRENT_STREAMS
        assert len(h2._finished) <= _REMEMBERED
        held = sum(len(s.buffer) + sum(5 + len(m) for m in s.queue) for s in h2.streams.values())
        assert h2.buffered == held  # the accounting never drifts
        assert h2.blocked_bytes == sum(len(data) for _, data, _ in h2.blocked)
    return conn, transport


def _check(transport: Transport) -> None:
    sent = _frames(bytes(transport.written))
    codes = [int.from_bytes(p[4:8], "big") for k, _, _, p in sent if k == GOAWAY]
    assert INTERNAL_ERROR not in codes, "a bug reached the safety net"
    if any(code != NO_ERROR for code in codes):
        assert transport.closed and sent[-1][0] == GOAWAY  # a connection error: GOAWAY, close
    assert transport.after_close == 0


def _healthy_connection_serves() -> None:
    opening = PREFACE + frame(SETTINGS, 0, 0) + frame(HEADERS, END_HEADERS, 1, BLOCK)
    _, transport = _feed([opening, frame(DATA, END_STREAM, 1, _message(b"last"))])
    assert (DATA, 0, 1, _message(b"tsal")) in _frames(bytes(transport.written))


@FUZZ
@given(reads=mutated(), batched=st.booleans())
def test_mutated_frame_sequences(reads: list[bytes], batched: bool) -> None:
    handler = Batched() if batched else Echo()
    _, transport = _feed([PREFACE + frame(SETTINGS, 0, 0), *reads], handler)
    _check(transport)
    _healthy_connection_serves()


@FUZZ
@given(data=st.binary(max_size=512), cut=st.integers(0, 600))
def test_arbitrary_bytes(data: bytes, cut: int) -> None:
    for prefix in (b"", PREFACE + frame(SETTINGS, 0, 0)):
        stream = prefix + data
        _, transport = _feed([stream[:cut], stream[cut:]])
        _check(transport)
    _healthy_connection_serves()


@FUZZ
@given(frames=st.lists(any_frame, max_size=20), per_read=st.integers(1, 4))
def test_arbitrary_frames(frames: list[bytes], per_read: int) -> None:
    reads = [b"".join(frames[i : i + per_read]) for i in range(0, len(frames), per_read)]
    _, transport = _feed([PREFACE + frame(SETTINGS, 0, 0), *reads])
    _check(transport)
