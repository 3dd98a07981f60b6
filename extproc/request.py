"""Parse an OpenAI request body into the few facts routing needs.

Only the fields routing reads are checked (model, messages/prompt, stream, max tokens, tools,
response_format); everything else is passed through to the model untouched. Checks are
hand-written on the hot path: a full schema validation would cost more than the routing itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

import orjson

from switchyard.extproc.errors import GatewayError, invalid_request
from switchyard.extproc.pii import Scanner

CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4
MAX_WRITTEN_DEPTH = 254
"""The deepest nesting of arrays and objects (the body's own object counted) that orjson writes.
It reads 1,024 levels, so a body between the two parses but cannot be written back."""


class Endpoint(Enum):
    CHAT = "/v1/chat/completions"
    COMPLETIONS = "/v1/completions"


@dataclass(slots=True)
class ParsedRequest:
    """An accepted request: the decoded body plus what routing reads from it."""

    endpoint: Endpoint
    payload: dict[str, Any]
    model: str
    prompt: str
    """The text the router scores: the last user message (chat) or the prompt (completions)."""
    first_prompt: str
    """The conversation's first user message (chat) or the prompt: stable across its turns."""
    prompt_tokens: int
    """Estimated input tokens of the whole request (chars / 4 plus per-message overhead)."""
    max_output_tokens: int
    stream: bool
    capabilities: frozenset[str]
    personal_data: str = ""
    """The personal-data detector that matched the messages; "" none (``screen``)."""
    redacted: bool = False
    """Matches were replaced in ``payload``: the body must be written back."""


def _content_text(content: object, param: str, images: list[bool]) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict):
                raise invalid_request(f"{param}[{i}] must be an object", param=f"{param}[{i}]")
            kind = part.get("type")
            if kind == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise invalid_request(
                        f"{param}[{i}].text must be a string", param=f"{param}[{i}].text"
                    )
                parts.append(text)
            elif kind in ("image_url", "input_image", "image"):
                images.append(True)
        return "\n".join(parts)
    raise invalid_request(f"{param} must be a string or an array of content parts", param=param)


def _chat(payload: dict[str, Any]) -> tuple[str, str, int, bool]:
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid_request(
            "'messages' is required and must be a non-empty array", param="messages"
        )
    images: list[bool] = []
    chars = 0
    first_user: str | None = None
    last_user = ""
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid_request(f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = message.get("role")
        if not isinstance(role, str):
            raise invalid_request(
                f"messages[{i}].role is required and must be a string", param=f"messages[{i}].role"
            )
        text = _content_text(message.get("content"), f"messages[{i}].content", images)
        chars += len(text)
        if role == "user":
            last_user = text
            if first_user is None:
                first_user = text
    tokens = chars // CHARS_PER_TOKEN + TOKENS_PER_MESSAGE * len(messages)
    return last_user, first_user or "", tokens, bool(images)


def _completion(payload: dict[str, Any]) -> tuple[str, str, int, bool]:
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        prompt = "\n".join(prompt)
    if not isinstance(prompt, str):
        raise invalid_request(
            "'prompt' is required and must be a string or an array of strings", param="prompt"
        )
    return prompt, prompt, len(prompt) // CHARS_PER_TOKEN + 1, False


def _max_tokens(payload: dict[str, Any]) -> int:
    for name in ("max_completion_tokens", "max_tokens"):
        value = payload.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise invalid_request(f"'{name}' must be a positive integer", param=name)
        return value
    return 0


def _capabilities(payload: dict[str, Any], images: bool) -> frozenset[str]:
    caps = set()
    if payload.get("tools") or payload.get("functions"):
        caps.add("tools")
    response_format = payload.get("response_format")
    if response_format is not None:
        if not isinstance(response_format, dict):
            raise invalid_request("'response_format' must be an object", param="response_format")
        if response_format.get("type") in ("json_object", "json_schema"):
            caps.add("json")
    if images:
        caps.add("images")
    return frozenset(caps)


def parse_request(endpoint: Endpoint, body: bytes) -> ParsedRequest:
    """Decode and check a request body; raise GatewayError (400) naming the bad field."""
    if not body:
        raise invalid_request("the request body is empty; send a JSON object", code="empty_body")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        reason = (
            "is not valid UTF-8" if "utf-8" in str(exc).lower() else f"is not valid JSON ({exc})"
        )
        raise invalid_request(f"the request body {reason}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise invalid_request("the request body must be a JSON object", code="invalid_json")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise invalid_request("'model' is required and must be a non-empty string", param="model")
    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid_request("'stream' must be a boolean", param="stream")
    if endpoint is Endpoint.CHAT:
        prompt, first_prompt, tokens, images = _chat(payload)
    else:
        prompt, first_prompt, tokens, images = _completion(payload)
    return ParsedRequest(
        endpoint=endpoint,
        payload=payload,
        model=model,
        prompt=prompt,
        first_prompt=first_prompt,
        prompt_tokens=tokens,
        max_output_tokens=_max_tokens(payload),
        stream=stream,
        capabilities=_capabilities(payload, images),
    )


def unwritable(payload: dict[str, Any]) -> GatewayError:
    """400 for a body that parsed but cannot be written back after "model" is rewritten: it
    nests deeper than orjson writes (``MAX_WRITTEN_DEPTH``). Names the field that does."""
    for key, value in payload.items():
        try:
            orjson.dumps([value])  # the value at the depth it has inside the body
        except orjson.JSONEncodeError:
            return invalid_request(
                f"'{key}' is nested deeper than {MAX_WRITTEN_DEPTH} levels", param=key
            )
    return invalid_request(f"the request body is nested deeper than {MAX_WRITTEN_DEPTH} levels")


def _slots(payload: dict[str, Any]) -> Iterator[tuple[Any, Any, str]]:
    """(container, key, text) for every text a model reads: each message's content, all
    roles, and the arguments of earlier tool calls; or the completion prompt(s). The shapes
    parse_request checked are relied on; anything else it passed through is skipped."""
    messages = payload.get("messages")
    if not isinstance(messages, list):
        prompt = payload.get("prompt")
        if isinstance(prompt, str):
            yield payload, "prompt", prompt
        elif isinstance(prompt, list):
            yield from ((prompt, i, p) for i, p in enumerate(prompt) if isinstance(p, str))
        return
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            yield message, "content", content
        elif isinstance(content, list):
            yield from ((p, "text", p["text"]) for p in content if p.get("type") == "text")
        calls = message.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                yield function, "arguments", function["arguments"]


def screen(request: ParsedRequest, scanner: Scanner, redact: bool) -> None:
    """Personal-data detection on every text of ``request`` (one scan over all of them):
    sets ``personal_data`` to the detector that matched; with ``redact``, replaces the
    matches in ``payload`` and sets ``redacted``."""
    if not redact:
        request.personal_data = scanner.first([text for _, _, text in _slots(request.payload)])
        return
    found = ""
    for container, key, text in list(_slots(request.payload)):
        clean, detector = scanner.redact(text)
        if detector:
            container[key] = clean
            found = found or detector
    request.personal_data = found
    request.redacted = bool(found)
