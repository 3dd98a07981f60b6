"""UsageMeter: usage read from non-streaming bodies and SSE streams split anyhow, the usage chunk
removed for clients that did not ask for it, estimates for responses cut short."""

from __future__ import annotations

import itertools

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from switchyard.extproc.accounting import stream_options_for_usage
from switchyard.extproc.usage import MAX_JSON_BYTES, Usage, UsageMeter

USAGE = {"prompt_tokens": 7, "completion_tokens": 11, "total_tokens": 18}
PIECES = ["Hello", " there,", " general", " Kenobi"]


def _event(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _stream(include_usage: bool) -> bytes:
    """A chat stream as OpenAI sends it: with include_usage, a null usage on every chunk and a
    usage-only chunk before [DONE]."""
    extra = {"usage": None} if include_usage else {}
    chunks = [{"id": "c", "choices": [{"index": 0, "delta": {"role": "assistant"}}], **extra}]
    chunks += [
        {"id": "c", "choices": [{"index": 0, "delta": {"content": p}}], **extra} for p in PIECES
    ]
    chunks.append({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    chunks[-1].update(extra)
    body = b"".join(_event(c) for c in chunks)
    if include_usage:
        body += _event({"id": "c", "choices": [], "usage": USAGE})
    return body + b"data: [DONE]\n\n"


def _feed(meter: UsageMeter, data: bytes, cuts: list[int]) -> bytes:
    """Feed ``data`` split at ``cuts``; what the client receives."""
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(data))), len(data)]
    out = b""
    for i, (start, stop) in enumerate(itertools.pairwise(bounds)):
        chunk = data[start:stop]
        replaced = meter.feed(chunk, end=i == len(bounds) - 2)
        out += chunk if replaced is None else replaced
    return out


def test_a_non_streaming_body_reports_its_usage_and_passes_unchanged() -> None:
    body = orjson.dumps({"id": "x", "choices": [], "usage": USAGE})
    meter = UsageMeter(streaming=False, strip=False, prompt_estimate=3)
    assert meter.feed(body[:10], end=False) is None
    assert meter.feed(body[10:], end=True) is None
    assert meter.result() == Usage(7, 11, estimated=False)


def test_a_non_json_or_oversized_body_is_estimated() -> None:
    meter = UsageMeter(streaming=False, strip=False, prompt_estimate=3)
    assert meter.feed(b"<html>bad gateway</html>", end=True) is None
    assert meter.result() == Usage(3, 0, estimated=True)
    big = UsageMeter(streaming=False, strip=False, prompt_estimate=5)
    big.feed(b"x" * (MAX_JSON_BYTES + 1), end=False)
    big.feed(orjson.dumps({"usage": USAGE}), end=True)
    assert big.result().estimated


def test_a_stream_that_asked_for_usage_is_read_and_never_changed() -> None:
    data = _stream(include_usage=True)
    meter = UsageMeter(streaming=True, strip=False, prompt_estimate=3)
    assert _feed(meter, data, [17, 100, 101, 250]) == data
    assert meter.result() == Usage(7, 11, estimated=False)


def test_the_usage_chunk_is_removed_for_a_client_that_did_not_ask() -> None:
    meter = UsageMeter(streaming=True, strip=True, prompt_estimate=3)
    received = _feed(meter, _stream(include_usage=True), [])
    assert received == _stream(include_usage=False)
    assert b"usage" not in received
    assert meter.result() == Usage(7, 11, estimated=False)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=2000), max_size=30), st.booleans())
def test_any_chunking_gives_the_same_bytes_and_usage(cuts: list[int], strip: bool) -> None:
    meter = UsageMeter(streaming=True, strip=strip, prompt_estimate=3)
    received = _feed(meter, _stream(include_usage=True), cuts)
    assert received == _stream(include_usage=not strip)
    assert meter.result() == Usage(7, 11, estimated=False)


def test_a_stream_cut_short_is_estimated_from_what_was_delivered() -> None:
    data = _stream(include_usage=True)
    cut = data.index(b" general")  # inside the third content chunk
    meter = UsageMeter(streaming=True, strip=True, prompt_estimate=9)
    meter.feed(data[:cut], end=False)
    delivered = len("Hello") + len(" there,")
    assert meter.result() == Usage(9, -(-delivered // 4), estimated=True)


def test_events_that_are_not_json_pass_and_count_nothing() -> None:
    data = b": keep-alive\n\ndata: not json\n\nevent: ping\ndata: {}\n\n"
    meter = UsageMeter(streaming=True, strip=True, prompt_estimate=1)
    assert _feed(meter, data, [5, 30]) == data
    assert meter.result() == Usage(1, 0, estimated=True)


def test_a_negative_or_malformed_usage_is_ignored() -> None:
    for usage in ({"prompt_tokens": -1, "completion_tokens": 2}, {"prompt_tokens": "7"}, [1]):
        meter = UsageMeter(streaming=False, strip=False, prompt_estimate=4)
        meter.feed(orjson.dumps({"usage": usage}), end=True)
        assert meter.result() == Usage(4, 0, estimated=True)


def test_stream_options_ask_for_usage_and_keep_the_clients_other_options() -> None:
    assert stream_options_for_usage(None) == {"include_usage": True}
    assert stream_options_for_usage("junk") == {"include_usage": True}
    assert stream_options_for_usage({"include_usage": False, "x": 1}) == {
        "include_usage": True,
        "x": 1,
    }
    assert stream_options_for_usage({"include_usage": True}) is None


def test_the_whole_answer_read_marks_the_meter_complete() -> None:
    body = orjson.dumps({"id": "x", "choices": [], "usage": USAGE})
    meter = UsageMeter(streaming=False, strip=False, prompt_estimate=3)
    meter.feed(body[:10], end=False)
    assert not meter.complete  # not a JSON document yet
    meter.feed(body[10:], end=False)
    assert meter.complete and meter.result() == Usage(7, 11, estimated=False)
    stream = UsageMeter(streaming=True, strip=True, prompt_estimate=3)
    data = _stream(include_usage=True)
    stream.feed(data[:-5], end=False)
    assert not stream.complete
    stream.feed(data[-5:], end=False)
    assert stream.complete
