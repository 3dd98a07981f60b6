from __future__ import annotations

import orjson
import pytest

from switchyard.extproc.errors import GatewayError
from switchyard.extproc.request import Endpoint, parse_request


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
