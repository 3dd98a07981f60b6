from __future__ import annotations

from typing import Any

import orjson
import pytest
from conftest import compile_docs
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from switchyard.extproc.errors import GatewayError
from switchyard.extproc.processor import Processor
from switchyard.extproc.request import MAX_WRITTEN_DEPTH, Endpoint, parse_request, unwritable
from switchyard.extproc.scoring import HeuristicScorer
from switchyard.extproc.state import RuntimeState
from switchyard.headers import EXTPROC_FILTER


def chat(**fields: object) -> bytes:
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi there"}], **fields}
    return orjson.dumps(body)


def test_chat_request_facts() -> None:
    body = orjson.dumps(
        {
            "model": "auto",
            "stream": True,
            "max_tokens": 100,
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "response_format": {"type": "json_object"},
            "messages": [
                {"role": "system", "content": "You are terse."},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Describe"},
                        {"type": "image_url", "image_url": {"url": "x"}},
                    ],
                },
                {"role": "assistant", "content": None},
                {"role": "user", "content": "the last question"},
            ],
        }
    )
    req = parse_request(Endpoint.CHAT, body)
    assert req.model == "auto"
    assert req.prompt == "the last question"
    assert req.stream is True
    assert req.max_output_tokens == 100
    assert req.capabilities == {"tools", "json", "images"}
    chars = len("You are terse.") + len("Describe") + len("the last question")
    assert req.prompt_tokens == chars // 4 + 4 * 4


def test_completion_prompt_list() -> None:
    req = parse_request(Endpoint.COMPLETIONS, orjson.dumps({"model": "m", "prompt": ["a", "b"]}))
    assert req.prompt == "a\nb"
    assert req.capabilities == frozenset()


BAD = [
    (b"", "empty_body", None),
    (b"{not json", "invalid_json", None),
    (b'{"model": "\xff\xfe"}', "invalid_json", None),
    (b"[1, 2]", "invalid_json", None),
    (orjson.dumps({"messages": []}), "invalid_request", "model"),
    (orjson.dumps({"model": 7, "messages": []}), "invalid_request", "model"),
    (orjson.dumps({"model": "auto"}), "invalid_request", "messages"),
    (orjson.dumps({"model": "auto", "messages": "hi"}), "invalid_request", "messages"),
    (orjson.dumps({"model": "auto", "messages": [3]}), "invalid_request", "messages[0]"),
    (
        orjson.dumps({"model": "auto", "messages": [{"content": "x"}]}),
        "invalid_request",
        "messages[0].role",
    ),
    (
        orjson.dumps({"model": "auto", "messages": [{"role": "user", "content": 5}]}),
        "invalid_request",
        "messages[0].content",
    ),
    (
        orjson.dumps(
            {
                "model": "auto",
                "messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}],
            }
        ),
        "invalid_request",
        "messages[0].content[0].text",
    ),
    (chat(stream="yes"), "invalid_request", "stream"),
    (chat(max_tokens=-3), "invalid_request", "max_tokens"),
    (chat(max_tokens=True), "invalid_request", "max_tokens"),
    (chat(response_format="json"), "invalid_request", "response_format"),
]


@pytest.mark.parametrize(("body", "code", "param"), BAD)
def test_bad_bodies_are_400_with_param(body: bytes, code: str, param: str | None) -> None:
    with pytest.raises(GatewayError) as info:
        parse_request(Endpoint.CHAT, body)
    error = info.value
    assert error.status == 400
    assert error.code == code
    assert error.param == param
    payload = orjson.loads(error.body())
    assert set(payload["error"]) == {"message", "type", "code", "param"}
    assert payload["error"]["type"] == "invalid_request_error"


# -- regressions found by tests/integration/test_request_fuzz.py (through real Envoy) -----------
def _undecodable_message(attribute: str) -> bytes:
    """A body message whose ``attribute`` is not UTF-8, serialized as Envoy sends it (Envoy
    copies header bytes into attribute strings as they came; protobuf refuses to parse them)."""
    message = ep.ProcessingRequest(request_body=ep.HttpBody(body=chat(), end_of_stream=True))
    fields = message.attributes[EXTPROC_FILTER].fields
    fields["request.path"].string_value = "/v1/chat/completions"
    fields["request.headers['x-priority']"].string_value = "low"
    fields[attribute].string_value = "\x01\x02\x03"
    raw: bytes = message.SerializeToString()
    assert raw.count(b"\x01\x02\x03") == 1
    return raw.replace(b"\x01\x02\x03", b"\xff\xfe\x80")


@pytest.mark.parametrize("header", ["x-session-id", "x-switchyard-data-class"])
async def test_header_that_is_not_utf8_is_a_400_naming_it(header: str) -> None:
    # Was: `x-session-id: \xff\xfe\x80` -> DecodeError out of Processor.message -> gRPC error ->
    # Envoy answered 503 router_unavailable.
    processor = Processor(RuntimeState(scorer_loader=lambda _bundle: HeuristicScorer()))
    raw, done = await processor.message(
        processor.open(), _undecodable_message(f"request.headers['{header}']")
    )
    reply = ep.ProcessingResponse.FromString(raw).immediate_response
    assert done
    assert reply.status.code == 400
    error = orjson.loads(reply.body)["error"]
    assert error["code"] == "invalid_header"
    assert error["param"] == header
    assert error["message"] == f"header {header} is not valid UTF-8"


async def test_undecodable_message_without_a_bad_header_is_a_400() -> None:
    processor = Processor(RuntimeState(scorer_loader=lambda _bundle: HeuristicScorer()))
    raw, done = await processor.message(processor.open(), _undecodable_message("request.path"))
    reply = ep.ProcessingResponse.FromString(raw).immediate_response
    assert done and reply.status.code == 400
    assert orjson.loads(reply.body)["error"]["code"] == "invalid_header"
    raw, done = await processor.message(processor.open(), b"\x0a\xff")  # truncated field
    assert done and ep.ProcessingResponse.FromString(raw).immediate_response.status.code == 400


async def test_body_nested_deeper_than_orjson_writes_is_a_400_naming_the_field(
    policy_doc: dict[str, Any],
) -> None:
    # Was: 255..1,024 levels parse, but writing the body back after the model rewrite raised
    # out of Processor.route ("Recursion limit reached") -> gRPC error -> 503 router_unavailable,
    # and every request in flight on that ext_proc connection failed with it.
    state = RuntimeState(scorer_loader=lambda _bundle: HeuristicScorer())
    config = compile_docs(policy_doc)
    state.swap((config, {b: HeuristicScorer() for b in config.router_bundles}))
    processor = Processor(state)
    for depth, status in [(MAX_WRITTEN_DEPTH - 1, 0), (MAX_WRITTEN_DEPTH, 400), (1000, 400)]:
        tools = b"[" * depth + b"]" * depth  # the body's own object is one more level
        body = chat()[:-1] + b', "tools": ' + tools + b"}"
        response = await processor.route(Endpoint.CHAT, {}, body)
        if status == 0:
            assert orjson.loads(response.request_body.response.body_mutation.body)["tools"]
            continue
        reply = response.immediate_response
        assert reply.status.code == status
        error = orjson.loads(reply.body)["error"]
        assert error["param"] == "tools"
        assert error["message"] == f"'tools' is nested deeper than {MAX_WRITTEN_DEPTH} levels"


def test_unwritable_without_a_deep_field_still_explains() -> None:
    error = unwritable({"model": "auto"})
    assert error.status == 400
    assert error.message == f"the request body is nested deeper than {MAX_WRITTEN_DEPTH} levels"
