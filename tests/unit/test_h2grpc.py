"""The minimal HTTP/2 gRPC server, driven by a real gRPC client (grpcio's C core)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from switchyard.extproc.batching import BATCH
from switchyard.extproc.h2grpc import (
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    PREFACE,
    SETTINGS,
    GrpcConnection,
    HpackDecoder,
    frame,
    huffman_decode,
)

METHOD = "/test.Echo/Stream"


class Echo:
    """Reverses each message; b"last" ends the call; b"slow" suspends first; b"boom" raises."""

    def open(self) -> list[bytes]:
        return []

    async def message(self, seen: list[bytes], payload: bytes) -> tuple[bytes, bool]:
        if payload == b"slow":
            await asyncio.sleep(0.01)
        if payload == b"boom":
            raise RuntimeError("boom")
        seen.append(payload)
        return payload[::-1], payload == b"last"


async def _serve() -> tuple[asyncio.Server, str]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: GrpcConnection(METHOD, Echo()), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"127.0.0.1:{port}"


async def _call(target: str, messages: list[bytes], method: str = METHOD) -> list[bytes]:
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.stream_stream(method, lambda b: b, lambda b: b)

        async def requests() -> AsyncIterator[bytes]:
            for message in messages:
                yield message

        return [bytes(r) async for r in call(requests())]


async def test_stream_of_messages_ends_when_the_handler_says_so() -> None:
    server, target = await _serve()
    async with server:
        assert await _call(target, [b"abc", b"slow", b"last"]) == [b"cba", b"wols", b"tsal"]


async def test_client_half_close_ends_the_call_ok() -> None:
    server, target = await _serve()
    async with server:
        assert await _call(target, [b"one", b"two"]) == [b"eno", b"owt"]
        assert await _call(target, []) == []


async def test_large_messages_respect_flow_control() -> None:
    server, target = await _serve()
    big = bytes(range(256)) * 12_000  # 3 MB: many frames, beyond the client's first window
    async with server:
        assert await _call(target, [big, b"last"]) == [big[::-1], b"tsal"]


async def test_many_concurrent_calls_share_a_connection() -> None:
    server, target = await _serve()
    async with server, grpc.aio.insecure_channel(target) as channel:
        call = channel.stream_stream(METHOD, lambda b: b, lambda b: b)

        async def one(i: int) -> list[Any]:
            async def requests() -> AsyncIterator[bytes]:
                yield str(i).encode()
                yield b"last"

            return [bytes(r) async for r in call(requests())]

        results = await asyncio.gather(*(one(i) for i in range(200)))
    assert results == [[str(i).encode()[::-1], b"tsal"] for i in range(200)]


async def test_unknown_method_and_handler_failure_are_grpc_errors() -> None:
    server, target = await _serve()
    async with server:
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            # No request message: the answer comes at once and could race a send.
            await _call(target, [], "/test.Echo/Other")
        assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await _call(target, [b"boom"])
        assert failed.value.code() == grpc.StatusCode.INTERNAL
        assert await _call(target, [b"last"]) == [b"tsal"]  # the connection still serves


class BatchedUpper:
    """Upper-cases each message through the batch, recording every batch it ran."""

    def __init__(self) -> None:
        self.runs: list[list[bytes]] = []

    def open(self) -> None:
        return None

    def upper(self, items: list[bytes]) -> list[bytes]:
        self.runs.append(items)
        return [item.upper() for item in items]

    async def message(self, _: None, payload: bytes) -> tuple[bytes, bool]:
        if BATCH.is_open:
            return await BATCH.submit(self.upper, payload), True
        return self.upper([payload])[0], True


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data


def _literal(name: bytes, value: bytes) -> bytes:
    """An HPACK literal header field without indexing, new name, no Huffman (RFC 7541 6.2.2)."""
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def _replies(written: bytes) -> dict[int, bytes]:
    """The gRPC message of each stream's DATA frame in the server's output."""
    out: dict[int, bytes] = {}
    offset = 0
    while offset < len(written):
        size = int.from_bytes(written[offset : offset + 3], "big")
        kind, stream_id = (
            written[offset + 3],
            int.from_bytes(written[offset + 5 : offset + 9], "big"),
        )
        payload = written[offset + 9 : offset + 9 + size]
        if kind == DATA and payload:
            out[stream_id] = payload[5:]
        offset += 9 + size
    return out


def test_messages_of_one_read_are_handled_as_one_batch() -> None:
    handler = BatchedUpper()
    connection = GrpcConnection(METHOD, handler)
    transport = _Transport()
    connection.connection_made(transport)
    block = b"".join(
        _literal(n, v)
        for n, v in [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", METHOD.encode()),
            (b"te", b"trailers"),
        ]
    )
    data = PREFACE + frame(SETTINGS, 0, 0)
    streams = {1 + 2 * i: f"prompt {i}".encode() for i in range(6)}
    for stream_id, text in streams.items():
        data += frame(HEADERS, END_HEADERS, stream_id, block)
        data += frame(DATA, END_STREAM, stream_id, b"\x00" + len(text).to_bytes(4, "big") + text)
    connection.data_received(data)
    assert handler.runs == [list(streams.values())]  # one batch, in arrival order
    assert _replies(bytes(transport.written)) == {k: v.upper() for k, v in streams.items()}
    assert not BATCH.is_open
    # A read with one message is a batch of one.
    connection.data_received(
        frame(HEADERS, END_HEADERS, 13, block)
        + frame(DATA, END_STREAM, 13, b"\x00\x00\x00\x00\x01x")
    )
    assert handler.runs[-1] == [b"x"]


def test_hpack_decoder_rfc7541_examples() -> None:
    """RFC 7541 C.4: requests with Huffman coding, sharing one dynamic table."""
    decoder = HpackDecoder()
    first = bytes.fromhex("828684418cf1e3c2e5f23a6ba0ab90f4ff")
    assert decoder.decode(first) == [
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "www.example.com"),
    ]
    second = bytes.fromhex("828684be5886a8eb10649cbf")
    assert decoder.decode(second)[3:] == [
        (":authority", "www.example.com"),
        ("cache-control", "no-cache"),
    ]
    third = bytes.fromhex("828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf")
    assert decoder.decode(third)[2:] == [
        (":path", "/index.html"),
        (":authority", "www.example.com"),
        ("custom-key", "custom-value"),
    ]
    assert decoder.size == 164  # the RFC's table size after C.4.3
    assert huffman_decode(bytes.fromhex("9d29ad171863c78f0b97c8e9ae82ae43d3")) == (
        b"https://www.example.com"
    )
