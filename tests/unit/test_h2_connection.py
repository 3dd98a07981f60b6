"""The HTTP/2 server against a hostile client: bytes fed to ``GrpcConnection`` by hand.

Each case here once raised out of ``data_received``, grew memory without bound, or was
accepted against RFC 9113 / RFC 7541.
"""

from __future__ import annotations

import asyncio
import tracemalloc
from typing import Any

import pytest

from switchyard.extproc.h2 import limits
from switchyard.extproc.h2.connection import Connection
from switchyard.extproc.h2.frames import (
    COMPRESSION_ERROR,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    GOAWAY,
    HEADERS,
    INTERNAL_ERROR,
    NO_ERROR,
    PADDED,
    PING,
    PREFACE,
    PRIORITY_FLAG,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    RST_STREAM,
    SETTINGS,
    SETTINGS_INITIAL_WINDOW_SIZE,
    SETTINGS_MAX_CONCURRENT_STREAMS,
    SETTINGS_MAX_FRAME_SIZE,
    SETTINGS_MAX_HEADER_LIST_SIZE,
    WINDOW_UPDATE,
    frame,
    settings,
    window_update,
)
from switchyard.extproc.h2.hpack import literal
from switchyard.extproc.h2.stream import Stream
from switchyard.extproc.h2grpc import GrpcConnection
from switchyard.extproc.processor import Processor
from switchyard.extproc.state import RuntimeState

METHOD = "/test.Echo/Stream"
ACK_FLAG = 0x1
BLOCK = b"".join(
    literal(name, value)
    for name, value in [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", METHOD.encode()),
        (b"te", b"trailers"),
    ]
)


def message(body: bytes) -> bytes:
    return b"\x00" + len(body).to_bytes(4, "big") + body


class Echo:
    """Reverses each message; b"last" ends the call, anything else keeps it open."""

    def open(self) -> None:
        return None

    async def message(self, _: None, payload: bytes) -> tuple[bytes, bool]:
        return payload[::-1], payload == b"last"


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.reading = True

    def write(self, data: Any) -> None:
        assert not self.closed, "written after close"
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


def frames(written: bytes | bytearray) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream id, payload) of every frame the server wrote."""
    out = []
    offset = 0
    while offset < len(written):
        size = int.from_bytes(written[offset : offset + 3], "big")
        kind, flags = written[offset + 3], written[offset + 4]
        stream_id = int.from_bytes(written[offset + 5 : offset + 9], "big") & 0x7FFFFFFF
        out.append((kind, flags, stream_id, bytes(written[offset + 9 : offset + 9 + size])))
        offset += 9 + size
    return out


def goaway_codes(transport: Transport) -> list[int]:
    return [
        int.from_bytes(p[4:8], "big") for k, _, _, p in frames(transport.written) if k == GOAWAY
    ]


def resets(transport: Transport) -> dict[int, int]:
    return {
        s: int.from_bytes(p, "big") for k, _, s, p in frames(transport.written) if k == RST_STREAM
    }


def connect(handler: Any = None) -> tuple[GrpcConnection, Transport]:
    conn = GrpcConnection(METHOD, handler or Echo())
    transport = Transport()
    conn.connection_made(transport)
    conn.data_received(PREFACE + frame(SETTINGS, 0, 0))
    return conn, transport


def request(stream_id: int, body: bytes = b"last", end: bool = False) -> bytes:
    return frame(HEADERS, END_HEADERS, stream_id, BLOCK) + frame(
        DATA, END_STREAM if end else 0, stream_id, message(body)
    )


def failed_with(transport: Transport, code: int) -> bool:
    return goaway_codes(transport)[-1:] == [code] and transport.closed


# -- the reported defects ---------------------------------------------------------------------
def test_padded_frames_with_an_empty_payload_are_protocol_errors() -> None:
    conn, transport = connect()
    conn.data_received(frame(HEADERS, END_HEADERS, 1, BLOCK) + frame(DATA, PADDED, 1, b""))
    assert failed_with(transport, PROTOCOL_ERROR)
    conn, transport = connect()
    conn.data_received(frame(HEADERS, END_HEADERS | PADDED, 1, b""))
    assert failed_with(transport, PROTOCOL_ERROR)


def test_headers_with_padding_and_priority_fields_are_served_like_plain_ones() -> None:
    """The fast path skips unpadding for Envoy's plain blocks; padded or prioritised ones
    (another client's) still lose their padding and priority fields before decoding."""
    priority = (3).to_bytes(4, "big") + b"\x10"  # depends on stream 3, weight 16
    payload = b"\x02" + priority + BLOCK + b"\x00\x00"  # pad length 2
    flags = END_HEADERS | PADDED | PRIORITY_FLAG
    conn, transport = connect()
    conn.data_received(frame(HEADERS, flags, 1, payload) + frame(DATA, 0, 1, message(b"last")))
    assert (DATA, 0, 1, message(b"tsal")) in frames(transport.written)
    assert not goaway_codes(transport)


def test_a_window_update_of_three_bytes_is_a_frame_size_error() -> None:
    conn, transport = connect()
    conn.data_received(frame(WINDOW_UPDATE, 0, 0, b"\x00\x00\x01"))
    assert failed_with(transport, FRAME_SIZE_ERROR)


def test_max_frame_size_zero_is_refused_before_any_reply() -> None:
    conn, transport = connect()
    conn.data_received(settings((SETTINGS_MAX_FRAME_SIZE, 0)) + request(1))
    assert failed_with(transport, PROTOCOL_ERROR)


async def test_an_empty_processing_request_gets_an_answer() -> None:
    processor = Processor(RuntimeState())
    response, done = await processor.message(processor.open(), b"")
    assert done and response  # an immediate 400, not an AttributeError


def test_buffered_bytes_stay_bounded_across_many_unfinished_streams() -> None:
    conn, transport = connect()
    chunk = message(b"x" * (limits.MAX_MESSAGE - 5))[: 1 << 20]  # 1 MiB of a 9 MiB message
    tracemalloc.start()
    try:
        for stream_id in range(1, 201, 2):  # 100 streams, 1 MiB each, none finished
            conn.data_received(frame(HEADERS, END_HEADERS, stream_id, BLOCK))
            conn.data_received(frame(DATA, 0, stream_id, chunk))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert conn.h2.buffered <= limits.MAX_BUFFERED
    assert sum(len(s.buffer) for s in conn.h2.streams.values()) == conn.h2.buffered
    assert peak < limits.MAX_BUFFERED + (8 << 20)
    assert set(resets(transport).values()) == {ENHANCE_YOUR_CALM}
    assert not transport.closed  # the streams under the bound are still served
    conn.data_received(request(201))  # a whole message needs no buffer: still served
    assert (DATA, 0, 201, message(b"tsal")) in frames(transport.written)
    for stream_id in list(conn.h2.streams):
        conn.data_received(frame(RST_STREAM, 0, stream_id, b"\x00\x00\x00\x08"))
    assert conn.h2.buffered == 0


def test_a_continuation_flood_is_cut_off() -> None:
    conn, transport = connect()
    conn.data_received(frame(HEADERS, 0, 1, BLOCK))
    for _ in range(200):
        conn.data_received(frame(CONTINUATION, 0, 1, b"\x00" * 16384))
        if transport.closed:
            break
    assert failed_with(transport, ENHANCE_YOUR_CALM)
    assert conn.h2.continuation is None


def test_many_empty_continuation_frames_are_cut_off() -> None:
    conn, transport = connect()
    conn.data_received(frame(HEADERS, 0, 1, BLOCK) + frame(CONTINUATION, 0, 1) * 100)
    assert failed_with(transport, ENHANCE_YOUR_CALM)


def test_max_concurrent_streams_is_advertised_and_enforced() -> None:
    conn, transport = connect()
    advertised = frames(transport.written)[0]
    assert advertised[0] == SETTINGS
    pairs = {
        int.from_bytes(advertised[3][i : i + 2], "big"): int.from_bytes(
            advertised[3][i + 2 : i + 6], "big"
        )
        for i in range(0, len(advertised[3]), 6)
    }
    assert pairs[SETTINGS_MAX_CONCURRENT_STREAMS] == limits.MAX_CONCURRENT_STREAMS
    assert pairs[SETTINGS_MAX_HEADER_LIST_SIZE] == limits.MAX_HEADER_LIST_SIZE
    limit = limits.MAX_CONCURRENT_STREAMS
    opened = b"".join(frame(HEADERS, END_HEADERS, 1 + 2 * i, BLOCK) for i in range(limit + 1))
    conn.data_received(opened)
    assert resets(transport) == {1 + 2 * limit: REFUSED_STREAM}
    conn.data_received(frame(DATA, 0, 1, message(b"last")))  # one call ends...
    conn.data_received(request(3 + 2 * limit))  # ...so a new one is served
    assert (DATA, 0, 3 + 2 * limit, message(b"tsal")) in frames(transport.written)


def test_a_message_over_the_cap_is_resource_exhausted() -> None:
    conn, transport = connect()
    header = b"\x00" + (limits.MAX_MESSAGE + 1).to_bytes(4, "big")
    conn.data_received(frame(HEADERS, END_HEADERS, 1, BLOCK) + frame(DATA, 0, 1, header))
    trailers = [p for k, f, s, p in frames(transport.written) if k == HEADERS and f & END_STREAM]
    assert trailers and b"grpc-status\x018" in trailers[0]
    assert conn.h2.buffered == 0


def test_a_reset_stream_gets_no_data_when_the_window_opens() -> None:
    conn, transport = connect()
    big = b"y" * 100_000  # the reply is over the 65,535-byte connection window
    conn.data_received(request(1, big))
    assert conn.h2.blocked
    conn.data_received(frame(RST_STREAM, 0, 1, b"\x00\x00\x00\x08"))
    sent = len(transport.written)
    conn.data_received(window_update(0, 1_000_000) + window_update(1, 1_000_000))
    assert not [f for f in frames(transport.written[sent:]) if f[0] == DATA]
    assert not conn.h2.blocked and conn.h2.blocked_bytes == 0


def test_hpack_size_update_in_the_middle_of_a_block_is_a_compression_error() -> None:
    conn, transport = connect()
    conn.data_received(frame(HEADERS, END_HEADERS, 1, BLOCK + b"\x20"))
    assert failed_with(transport, COMPRESSION_ERROR)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (frame(PING, 0, 0, b"1234567"), FRAME_SIZE_ERROR),
        (frame(SETTINGS, ACK_FLAG, 0, b"\x00" * 6), FRAME_SIZE_ERROR),
        (frame(DATA, 0, 0, b"abc"), PROTOCOL_ERROR),
        (window_update(0, 0), PROTOCOL_ERROR),
        (window_update(0, 2**31 - 1), FLOW_CONTROL_ERROR),
        (frame(DATA, 0, 7, b"abc"), PROTOCOL_ERROR),  # an idle stream
        (frame(HEADERS, END_HEADERS, 2, BLOCK), PROTOCOL_ERROR),  # an even stream id
        (frame(CONTINUATION, END_HEADERS, 1, b""), PROTOCOL_ERROR),
        (frame(1, 0, 0, b"x" * (limits.MAX_FRAME_SIZE + 1)), FRAME_SIZE_ERROR),
    ],
)
def test_connection_errors_end_in_goaway(data: bytes, code: int) -> None:
    conn, transport = connect()
    conn.data_received(data)
    assert failed_with(transport, code)


def test_stream_errors_reset_only_the_stream() -> None:
    conn, transport = connect()
    conn.data_received(frame(HEADERS, END_HEADERS, 1, BLOCK))
    conn.data_received(window_update(1, 0))  # zero increment on a stream
    conn.data_received(frame(HEADERS, END_HEADERS, 3, BLOCK) + window_update(3, 2**31 - 1))
    conn.data_received(frame(HEADERS, END_HEADERS, 5, BLOCK) + frame(HEADERS, END_HEADERS, 5, b""))
    assert resets(transport) == {1: PROTOCOL_ERROR, 3: FLOW_CONTROL_ERROR, 5: PROTOCOL_ERROR}
    assert not transport.closed
    conn.data_received(request(7))
    assert (DATA, 0, 7, message(b"tsal")) in frames(transport.written)


def test_a_stream_over_its_window_is_reset() -> None:
    conn, transport = connect()
    conn.data_received(frame(HEADERS, END_HEADERS, 1, BLOCK))
    conn.h2.streams[1].recv = 3
    conn.data_received(frame(DATA, 0, 1, b"\x00\x00\x00"))
    conn.data_received(frame(DATA, 0, 1, b"\x00"))
    assert resets(transport) == {1: FLOW_CONTROL_ERROR}


def test_a_header_list_over_the_limit_is_resource_exhausted() -> None:
    conn, transport = connect()
    big = BLOCK + literal(b"x-big", b"v" * 120) * (limits.MAX_HEADER_LIST_SIZE // 150)
    conn.data_received(frame(HEADERS, END_HEADERS, 1, big))
    trailers = [p for k, _, s, p in frames(transport.written) if k == HEADERS and s == 1]
    assert trailers and b"grpc-status\x018" in trailers[0]
    conn.data_received(request(3))
    assert (DATA, 0, 3, message(b"tsal")) in frames(transport.written)


# -- floods -----------------------------------------------------------------------------------
def test_rapid_reset_is_cut_off() -> None:
    conn, transport = connect()
    for stream_id in range(1, 2 * limits.RESET_MIN_STREAMS + 200, 2):
        conn.data_received(
            frame(HEADERS, END_HEADERS, stream_id, BLOCK)
            + frame(RST_STREAM, 0, stream_id, b"\x00\x00\x00\x08")
        )
        if transport.closed:
            break
    assert failed_with(transport, ENHANCE_YOUR_CALM)


def test_resets_after_answers_are_normal_traffic() -> None:
    conn, transport = connect()
    for stream_id in range(1, 4 * limits.RESET_MIN_STREAMS, 2):  # what Envoy may do
        conn.data_received(request(stream_id) + frame(RST_STREAM, 0, stream_id, bytes(4)))
    assert not goaway_codes(transport) and not transport.closed


def test_a_ping_flood_is_cut_off_but_a_steady_rate_is_not() -> None:
    now = [0.0]
    conn, transport = connect()
    conn.h2.clock = lambda: now[0]
    conn.h2.stamp = 0.0
    ping = frame(PING, 0, 0, bytes(8))
    for _ in range(5 * limits.CONTROL_BURST):  # pings at the sustained rate: fine
        now[0] += 1 / limits.CONTROL_RATE
        conn.data_received(ping)
    assert not transport.closed
    conn.data_received(ping * (limits.CONTROL_BURST + 1))  # a burst over the bucket
    assert failed_with(transport, ENHANCE_YOUR_CALM)


def test_a_settings_flood_is_cut_off() -> None:
    conn, transport = connect()
    conn.h2.clock = lambda: 0.0
    conn.h2.stamp = 0.0
    conn.data_received(frame(SETTINGS, 0, 0) * (limits.CONTROL_BURST + 1))
    assert failed_with(transport, ENHANCE_YOUR_CALM)


# -- the driver -------------------------------------------------------------------------------
def test_a_client_that_does_not_read_stops_being_read() -> None:
    conn, transport = connect()
    conn.pause_writing()
    assert not transport.reading
    conn.resume_writing()
    assert transport.reading


def test_a_bug_closes_only_its_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    conn, transport = connect()

    def broken(data: bytes) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(conn.h2, "receive", broken)
    conn.data_received(b"anything")  # does not raise
    assert failed_with(transport, INTERNAL_ERROR)


async def _served() -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: GrpcConnection(METHOD, Echo()), "127.0.0.1", 0)


async def test_no_preface_in_time_closes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "PREFACE_TIMEOUT", 0.05)
    server = await _served()
    async with server:
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        written = await asyncio.wait_for(reader.read(), 10)  # EOF when the server closes
        assert frames(written)[0][0] == SETTINGS
        writer.close()


async def test_an_idle_connection_is_closed_gracefully(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "PREFACE_TIMEOUT", 0.01)
    monkeypatch.setattr(limits, "IDLE_TIMEOUT", 0.05)
    monkeypatch.setattr(limits, "DRAIN_GRACE", 0.01)
    server = await _served()
    async with server:
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        writer.write(PREFACE + frame(SETTINGS, 0, 0) + request(1, b"last", end=True))
        written = await asyncio.wait_for(reader.read(), 10)
        sent = frames(written)
        assert (DATA, 0, 1, message(b"tsal")) in sent
        away = [
            (int.from_bytes(p[:4], "big"), int.from_bytes(p[4:], "big"))
            for k, _, _, p in sent
            if k == GOAWAY
        ]
        assert away == [(2**31 - 1, NO_ERROR), (1, NO_ERROR)]  # announce, then the last stream
        writer.close()


def test_initial_window_changes_apply_to_open_streams() -> None:
    conn, transport = connect()
    conn.data_received(settings((SETTINGS_INITIAL_WINDOW_SIZE, 0)) + request(1, b"abc"))
    assert not [f for f in frames(transport.written) if f[0] == DATA]  # blocked by the window
    conn.data_received(settings((SETTINGS_INITIAL_WINDOW_SIZE, 100)))
    assert (DATA, 0, 1, message(b"cba")) in frames(transport.written)
    conn.data_received(window_update(1, 1000) + settings((SETTINGS_INITIAL_WINDOW_SIZE, 2**31 - 1)))
    assert failed_with(transport, FLOW_CONTROL_ERROR)  # the open stream's window overflows


class Waits:
    """Suspends on an event (a handler that runs as a task), then answers."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.cancelled = 0

    def open(self) -> None:
        return None

    async def message(self, _: None, payload: bytes) -> tuple[bytes, bool]:
        try:
            await self.go.wait()
        except (asyncio.CancelledError, GeneratorExit):  # cancelled, or closed before its turn
            self.cancelled += 1
            raise
        return payload, True


async def test_a_reset_stops_its_running_handler_and_frees_its_slot() -> None:
    handler = Waits()
    conn, transport = connect(handler)
    conn.data_received(request(1) + request(3))
    assert conn.running == 2
    conn.data_received(frame(RST_STREAM, 0, 1, b"\x00\x00\x00\x08"))
    assert conn.h2.zombies == 1  # counts against MAX_CONCURRENT_STREAMS until it stops
    while conn.running > 1:
        await asyncio.sleep(0)  # let the cancellation run (one loop turn, no timing)
    assert handler.cancelled == 1 and conn.h2.zombies == 0
    handler.go.set()
    while conn.running:
        await asyncio.sleep(0)
    sent = frames(transport.written)
    assert (DATA, 0, 3, message(b"last")) in sent
    assert not [f for f in sent if f[0] == DATA and f[2] == 1]


def test_the_state_machine_alone_bytes_in_calls_and_bytes_out() -> None:
    """No driver, no asyncio: messages come out through ``dispatch``, replies go in."""
    got: list[tuple[int, bytes]] = []
    abandoned: list[int] = []

    def dispatch(stream: Stream, payload: bytes) -> None:
        got.append((stream.id, payload))
        h2.reply(stream, payload.upper(), done=payload == b"end")

    h2 = Connection(METHOD, lambda: None, dispatch, lambda s: abandoned.append(s.id))
    h2.initiate()
    h2.receive(PREFACE + frame(SETTINGS, 0, 0) + request(1, b"a") + request(3, b"end", end=True))
    assert got == [(1, b"a"), (3, b"end")]
    sent = frames(b"".join(h2.out))
    assert (DATA, 0, 1, message(b"A")) in sent and (DATA, 0, 3, message(b"END")) in sent
    assert list(h2.streams) == [1]  # stream 3 is over, stream 1 still open
    h2.receive(frame(PING, 0, 0, b"12345678"))
    assert frames(h2.out[-1]) == [(PING, 1, 0, b"12345678")]
    h2.receive(frame(GOAWAY, 0, 1, bytes(8)))
    assert h2.closed and frames(h2.out[-1])[-1][0] == GOAWAY and not abandoned


def test_an_error_before_any_reply_is_trailers_only_with_no_data_frame() -> None:
    """A DATA frame before a response's first HEADERS is a protocol error to Envoy, which then
    resets every stream in flight on the connection."""
    other = b"".join(
        literal(name, value)
        for name, value in [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/test.Echo/Other"),
            (b"te", b"trailers"),
        ]
    )
    conn, transport = connect()
    transport.written.clear()
    conn.data_received(
        frame(HEADERS, END_HEADERS, 1, other) + frame(DATA, END_STREAM, 1, message(b"x"))
    )
    on_stream = [
        (kind, flags) for kind, flags, stream, _ in frames(transport.written) if stream == 1
    ]
    assert on_stream and on_stream[0] == (HEADERS, END_HEADERS | END_STREAM), on_stream
    assert all(kind != DATA for kind, _ in on_stream)
