"""The wire layer alone: frame checks and HPACK, no connection state, no I/O."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from switchyard.extproc.h2.frames import (
    ACK,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    PADDED,
    PING,
    PRIORITY,
    PRIORITY_FLAG,
    PROTOCOL_ERROR,
    RST_STREAM,
    SETTING,
    SETTINGS_ENABLE_PUSH,
    SETTINGS_INITIAL_WINDOW_SIZE,
    SETTINGS_MAX_FRAME_SIZE,
    WINDOW_UPDATE,
    ConnectionError_,
    StreamError,
    check_fixed,
    header_fragment,
    parse_settings,
    unpad,
)
from switchyard.extproc.h2.hpack import (
    _HUFFMAN,
    HeaderListTooLarge,
    HpackDecoder,
    HpackError,
    encode_integer,
    huffman_decode,
    literal,
)
from switchyard.extproc.h2.requests import Malformed, check_trailers, request_target


def _code(error: pytest.ExceptionInfo[ConnectionError_]) -> int:
    return error.value.code


@pytest.mark.parametrize("payload", [b"", b"\x01", b"\x05abcd"])
def test_padding_that_fills_the_frame_is_a_protocol_error(payload: bytes) -> None:
    with pytest.raises(ConnectionError_) as error:
        unpad(PADDED, payload)
    assert _code(error) == PROTOCOL_ERROR
    assert unpad(PADDED, b"\x02abcd\x00\x00"[:5]) == b"ab"
    assert unpad(0, b"") == b""
    assert unpad(PADDED, b"\x00") == b""


def test_headers_priority_fields_are_checked() -> None:
    with pytest.raises(ConnectionError_) as error:
        header_fragment(PRIORITY_FLAG, 1, b"\x00\x00")
    assert _code(error) == FRAME_SIZE_ERROR
    assert header_fragment(PRIORITY_FLAG, 1, b"\x00\x00\x00\x03\x10block") == (b"block", False)
    assert header_fragment(PRIORITY_FLAG, 3, b"\x00\x00\x00\x03\x10block") == (b"block", True)


@pytest.mark.parametrize(
    ("kind", "stream_id", "size", "code"),
    [
        (WINDOW_UPDATE, 0, 3, FRAME_SIZE_ERROR),
        (WINDOW_UPDATE, 1, 5, FRAME_SIZE_ERROR),
        (PING, 0, 7, FRAME_SIZE_ERROR),
        (PING, 1, 8, PROTOCOL_ERROR),
        (RST_STREAM, 1, 3, FRAME_SIZE_ERROR),
        (RST_STREAM, 0, 4, PROTOCOL_ERROR),
        (PRIORITY, 0, 5, PROTOCOL_ERROR),
    ],
)
def test_fixed_size_frames(kind: int, stream_id: int, size: int, code: int) -> None:
    with pytest.raises(ConnectionError_) as error:
        check_fixed(kind, stream_id, size)
    assert _code(error) == code


def test_a_priority_frame_of_the_wrong_length_is_a_stream_error() -> None:
    with pytest.raises(StreamError) as error:
        check_fixed(PRIORITY, 3, 4)
    assert (error.value.stream_id, error.value.code) == (3, FRAME_SIZE_ERROR)
    check_fixed(PRIORITY, 3, 5)


@pytest.mark.parametrize(
    ("flags", "stream_id", "payload", "code"),
    [
        (0, 0, b"\x00" * 5, FRAME_SIZE_ERROR),
        (ACK, 0, SETTING.pack(1, 1), FRAME_SIZE_ERROR),
        (0, 1, b"", PROTOCOL_ERROR),
        (0, 0, SETTING.pack(SETTINGS_MAX_FRAME_SIZE, 0), PROTOCOL_ERROR),
        (0, 0, SETTING.pack(SETTINGS_MAX_FRAME_SIZE, 1 << 24), PROTOCOL_ERROR),
        (0, 0, SETTING.pack(SETTINGS_ENABLE_PUSH, 2), PROTOCOL_ERROR),
        (0, 0, SETTING.pack(SETTINGS_INITIAL_WINDOW_SIZE, 2**31), FLOW_CONTROL_ERROR),
    ],
)
def test_settings_are_checked(flags: int, stream_id: int, payload: bytes, code: int) -> None:
    with pytest.raises(ConnectionError_) as error:
        parse_settings(flags, stream_id, payload)
    assert _code(error) == code


def test_valid_settings_and_unknown_ones() -> None:
    payload = SETTING.pack(SETTINGS_MAX_FRAME_SIZE, 16384) + SETTING.pack(0x99, 7)
    assert parse_settings(0, 0, payload) == [(SETTINGS_MAX_FRAME_SIZE, 16384), (0x99, 7)]


def test_hpack_table_size_update_only_at_the_start_of_a_block() -> None:
    decoder = HpackDecoder()
    assert decoder.decode(b"\x20\x82") == [(":method", "GET")]  # size 0 first: fine
    with pytest.raises(HpackError):
        HpackDecoder().decode(b"\x82\x20")  # after a field: RFC 7541 §4.2
    with pytest.raises(HpackError):
        HpackDecoder().decode(b"\x3f\xe2\x1f")  # over the 4,096 limit


def test_hpack_header_list_limit_keeps_the_table_in_step() -> None:
    decoder = HpackDecoder(max_list=100)
    big = b"\x40" + literal(b"x-big", b"v" * 90)[1:]  # with incremental indexing
    with pytest.raises(HeaderListTooLarge):
        decoder.decode(big)
    assert decoder.table[0] == ("x-big", "v" * 90)  # the entry was still added
    assert decoder.decode(b"\x82") == [(":method", "GET")]


def test_literal_encodes_long_names_and_values() -> None:
    assert encode_integer(10, 5) == b"\x0a"
    assert encode_integer(1337, 5) == b"\x1f\x9a\x0a"  # RFC 7541 C.1.2
    value = b"v" * 300
    assert HpackDecoder().decode(literal(b"grpc-message", value)) == [
        ("grpc-message", value.decode())
    ]


def test_request_header_lists() -> None:
    good = [(":method", "POST"), (":scheme", "http"), (":path", "/a"), ("te", "trailers")]
    assert request_target(good) == ("/a", None)
    assert request_target([*good, ("content-length", "4")]) == ("/a", 4)
    for bad in (
        [(":method", "POST"), (":path", "/a")],
        [("te", "trailers"), *good],
        [*good, ("Upper", "x")],
        [*good, ("connection", "close")],
        [*good, ("te", "gzip")],
        [*good[:2], (":path", "")],
        [*good, (":status", "200")],
        [*good, ("content-length", "x")],
    ):
        with pytest.raises(Malformed):
            request_target(bad)
    with pytest.raises(Malformed):
        check_trailers([(":path", "/")])
    check_trailers([("grpc-status", "0")])


def _huffman_encode(data: bytes) -> bytes:
    value = bits = 0
    for byte in data:
        code, length = _HUFFMAN[byte]
        value, bits = (value << length) | code, bits + length
    pad = -bits % 8
    return ((value << pad) | ((1 << pad) - 1)).to_bytes((bits + pad) // 8, "big")


@settings(max_examples=300, derandomize=True, database=None)
@given(st.binary(max_size=64))
def test_huffman_round_trip(data: bytes) -> None:
    assert huffman_decode(_huffman_encode(data)) == data


@pytest.mark.parametrize("bad", [b"\xff", b"\xff\xff", b"\xfe", b"\xff\xff\xff\xff"])
def test_huffman_rejects_eos_and_long_or_wrong_padding(bad: bytes) -> None:
    with pytest.raises(HpackError):
        huffman_decode(bad)
