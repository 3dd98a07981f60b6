"""The response half of an ext_proc stream: usage read from the body Envoy streams through,
priced at the answering model, the usage chunk stripped for clients that did not ask, and a
stream that ends early accounted for what passed."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from test_processor import body_msg, headers_msg, state_for

from switchyard.extproc.processor import Processor, StreamState
from switchyard.extproc.tally import TALLY
from switchyard.headers import EXTPROC_FILTER, SERVED_MODEL_ATTRIBUTE, STATUS_ATTRIBUTE

USAGE = {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}


def _chunk(body: bytes, end: bool, served: str = "", status: int = 200) -> bytes:
    message = ep.ProcessingRequest(response_body=ep.HttpBody(body=body, end_of_stream=end))
    if served:
        fields = message.attributes[EXTPROC_FILTER].fields
        fields[SERVED_MODEL_ATTRIBUTE].string_value = served
        fields[STATUS_ATTRIBUTE].number_value = status
    return message.SerializeToString()


async def _routed(processor: Processor, request: dict[str, Any]) -> tuple[StreamState, Any]:
    stream = processor.open()
    await processor.message(stream, headers_msg().SerializeToString())
    raw, done = await processor.message(stream, body_msg(orjson.dumps(request)).SerializeToString())
    assert not done, "a routed request's call stays open for its response"
    return stream, ep.ProcessingResponse.FromString(raw)


def _event(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _sample(name: str, **labels: str) -> float:
    from prometheus_client import REGISTRY

    TALLY.flush()
    return REGISTRY.get_sample_value(name, labels) or 0.0


CHAT = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}


async def test_a_json_response_is_priced_at_the_model_that_answered(
    policy_doc: dict[str, Any],
) -> None:
    processor = Processor(state_for(policy_doc))
    stream, _ = await _routed(processor, CHAT)
    labels = {"policy": "default/default", "model": "standard"}
    before = _sample("switchyard_cost_usd_total", **labels)
    body = orjson.dumps({"id": "x", "choices": [], "usage": USAGE})
    raw, done = await processor.message(stream, _chunk(body[:9], False, served="standard"))
    assert not done
    assert ep.ProcessingResponse.FromString(raw).response_body == ep.BodyResponse()
    raw, done = await processor.message(stream, _chunk(body[9:], True))
    assert done
    meta = ep.ProcessingResponse.FromString(raw).dynamic_metadata.fields["switchyard"]
    fields = meta.struct_value.fields
    assert fields["served_model"].string_value == "standard"
    assert fields["input_tokens"].number_value == 12
    assert fields["output_tokens"].number_value == 30
    cost = (12 * 0.8 + 30 * 4) / 1e6  # standard's prices, not light's
    assert fields["cost_usd"].number_value == pytest.approx(cost)
    assert _sample("switchyard_cost_usd_total", **labels) - before == pytest.approx(cost)
    fallback = {"policy": "default/default", "from_model": "light", "to_model": "standard"}
    assert _sample("switchyard_fallbacks_total", **fallback) >= 1


async def test_a_stream_that_did_not_ask_for_usage_is_asked_and_the_chunk_removed(
    policy_doc: dict[str, Any],
) -> None:
    processor = Processor(state_for(policy_doc))
    stream, decided = await _routed(processor, {**CHAT, "stream": True})
    sent = orjson.loads(decided.request_body.response.body_mutation.body)
    assert sent["stream_options"] == {"include_usage": True}
    content = _event({"choices": [{"delta": {"content": "hello"}}], "usage": None})
    usage = _event({"choices": [], "usage": USAGE})
    raw, _ = await processor.message(stream, _chunk(content, False, served="light"))
    body = ep.ProcessingResponse.FromString(raw).response_body.response.body_mutation.body
    assert body == _event({"choices": [{"delta": {"content": "hello"}}]})
    raw, done = await processor.message(stream, _chunk(usage + b"data: [DONE]\n\n", True))
    assert done
    reply = ep.ProcessingResponse.FromString(raw)
    assert reply.response_body.response.body_mutation.body == b"data: [DONE]\n\n"
    assert (
        reply.dynamic_metadata.fields["switchyard"]
        .struct_value.fields["output_tokens"]
        .number_value
        == 30
    )


async def test_a_stream_cut_short_is_accounted_when_its_call_ends(
    policy_doc: dict[str, Any],
) -> None:
    processor = Processor(state_for(policy_doc))
    stream, _ = await _routed(processor, {**CHAT, "stream": True})
    labels = {"policy": "default/default", "model": "light"}
    before = _sample("switchyard_responses_total", **labels, outcome="incomplete")
    tokens = _sample("switchyard_tokens_total", **labels, direction="output")
    content = _event({"choices": [{"delta": {"content": "x" * 40}}], "usage": None})
    await processor.message(stream, _chunk(content, False, served="light"))
    processor.closed(stream)  # Envoy reset the call: the client hung up
    processor.closed(stream)  # counted once, however often the call is reported closed
    assert _sample("switchyard_responses_total", **labels, outcome="incomplete") - before == 1
    assert _sample("switchyard_tokens_total", **labels, direction="output") - tokens == 10


async def test_an_error_response_counts_no_tokens(policy_doc: dict[str, Any]) -> None:
    processor = Processor(state_for(policy_doc))
    stream, _ = await _routed(processor, CHAT)
    labels = {"policy": "default/default", "model": "light"}
    before = _sample("switchyard_responses_total", **labels, outcome="error")
    error = b'{"error": {"message": "overloaded"}}'
    raw, done = await processor.message(stream, _chunk(error, True, served="light", status=503))
    assert done
    fields = ep.ProcessingResponse.FromString(raw).dynamic_metadata.fields["switchyard"]
    assert fields.struct_value.fields["input_tokens"].number_value == 0
    assert _sample("switchyard_responses_total", **labels, outcome="error") - before == 1


async def test_an_immediate_response_ends_the_call(policy_doc: dict[str, Any]) -> None:
    processor = Processor(state_for(policy_doc))
    stream = processor.open()
    await processor.message(stream, headers_msg().SerializeToString())
    raw, done = await processor.message(stream, body_msg(b"{nope").SerializeToString())
    assert done and stream.account is None
    assert ep.ProcessingResponse.FromString(raw).HasField("immediate_response")


async def test_the_call_ends_once_the_whole_answer_was_read(policy_doc: dict[str, Any]) -> None:
    """Envoy sends an empty last chunk after the body; ending the call first spares it."""
    processor = Processor(state_for(policy_doc))
    stream, _ = await _routed(processor, CHAT)
    body = orjson.dumps({"id": "x", "choices": [], "usage": USAGE})
    raw, done = await processor.message(stream, _chunk(body, False, served="light"))
    assert done
    fields = ep.ProcessingResponse.FromString(raw).dynamic_metadata.fields["switchyard"]
    assert fields.struct_value.fields["output_tokens"].number_value == 30
