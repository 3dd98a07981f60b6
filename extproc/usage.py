"""Token usage and cost of one routed request, read from its response as Envoy streams the
response body through the ext_proc.

A non-streaming body is collected (up to ``MAX_JSON_BYTES``) and its ``usage`` read at the end.
A server-sent-event stream is scanned event by event: the last non-null ``usage`` wins. When the
gateway added ``stream_options.include_usage`` to a request that did not ask for it
(``strip``), the usage-only chunk the provider then sends (``choices: []``) and the
``"usage":null`` it adds to every other chunk are removed, so the client receives exactly the
stream it asked for; every other byte passes unchanged, and a chunk is rewritten only when it
holds something to remove or ends inside an event (held back until the event is complete).

A response that ends before its usage arrives (a client that hung up, an upstream that failed
mid-stream) is accounted for what was delivered: the request's estimated prompt tokens and the
delivered text at four characters a token, flagged ``estimated``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import orjson

MAX_JSON_BYTES = 8 * 1024 * 1024
"""A non-streaming body above this is not parsed (its usage is estimated)."""
MAX_EVENT_BYTES = 1024 * 1024
"""An SSE event above this is passed on unread (its text is not counted)."""

_EVENT_END = b"\n\n"
_NULL_USAGE = (b',"usage":null', b', "usage": null')


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens of one request, and whether they were estimated rather than reported."""

    input_tokens: int
    output_tokens: int
    estimated: bool


def _reported(usage: Any) -> tuple[int, int] | None:
    """(input, output) from an OpenAI ``usage`` object; None when absent or malformed."""
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    if prompt < 0 or completion < 0:
        return None
    return prompt, completion


def _text_length(event: dict[str, Any]) -> int:
    """Characters of generated text in one chunk (chat deltas or completion text)."""
    total = 0
    choices = event.get("choices")
    if not isinstance(choices, list):
        return 0
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if isinstance(delta, dict):
            content = delta.get("content")
            if isinstance(content, str):
                total += len(content)
            reasoning = delta.get("reasoning_content")
            if isinstance(reasoning, str):
                total += len(reasoning)
        text = choice.get("text")
        if isinstance(text, str):
            total += len(text)
    return total


def _event_json(event: bytes) -> Any:
    """The JSON of an SSE event's ``data:`` lines; None for [DONE], comments or non-JSON."""
    data = b"".join(
        line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")
    )
    if not data or data == b"[DONE]":
        return None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


class UsageMeter:
    """Reads one response's body chunks; see the module docstring."""

    __slots__ = (
        "_body",
        "_carry",
        "_chars",
        "_overflow",
        "_reported",
        "complete",
        "prompt_estimate",
        "streaming",
        "strip",
    )

    def __init__(self, streaming: bool, strip: bool, prompt_estimate: int) -> None:
        self.streaming = streaming
        self.strip = strip and streaming
        self.prompt_estimate = prompt_estimate
        self._body = bytearray()  # non-streaming: the body so far
        self._carry = b""  # streaming: an event not yet complete
        self._chars = 0  # streaming: generated characters delivered
        self._reported: tuple[int, int] | None = None
        self._overflow = False
        self.complete = False
        """The whole answer was read (a JSON document, or a stream up to ``[DONE]``): later
        chunks, such as the empty last one, need not be read."""

    def feed(self, chunk: bytes, end: bool) -> bytes | None:
        """Read one body chunk; returns what to send instead, or None to send it unchanged."""
        if not self.streaming:
            if not self._overflow:
                if len(self._body) + len(chunk) > MAX_JSON_BYTES:
                    self._overflow = True
                    self._body = bytearray()
                else:
                    self._body += chunk
            # A body that ends a JSON object is tried at once: usually the whole answer comes
            # in one chunk, and the empty last chunk then need not make a round trip.
            if self._body and (end or self._body.rstrip().endswith(b"}")):
                try:
                    document = orjson.loads(self._body)
                except orjson.JSONDecodeError:
                    document = None
                if document is not None or end:
                    self.complete = True
                    if isinstance(document, dict):
                        self._reported = _reported(document.get("usage"))
                    self._body = bytearray()
            return None
        return self._events(chunk, end)

    def _events(self, chunk: bytes, end: bool) -> bytes | None:
        held = bool(self._carry)
        data = self._carry + chunk if held else chunk
        parts = data.split(_EVENT_END)
        tail = parts.pop()  # b"" when data ends with an event's end, else an event's start
        if len(tail) > MAX_EVENT_BYTES:  # an absurd event: pass it on unread
            parts.append(tail)
            tail = b""
        changed = False
        out: list[bytes] = []
        for event in parts:
            keep = self._event(event) if event else event
            if keep is not event:
                changed = True
            if keep or not event:
                out.append(keep + _EVENT_END)
        if end and tail:
            keep = self._event(tail)
            changed = changed or keep is not tail
            out.append(keep)
            tail = b""
        self._carry = tail
        if not self.strip or not (changed or held or tail):
            return None
        return b"".join(out)

    def _event(self, event: bytes) -> bytes:
        """One complete event: read it; returns it (the same object when unchanged), an edited
        copy, or b"" to drop it."""
        if b"data:" not in event:
            return event
        if event.endswith(b"[DONE]") and event.lstrip(b"\r\n").startswith(b"data: [DONE]"):
            self.complete = True
            return event
        parsed = _event_json(event)
        if not isinstance(parsed, dict):
            return event
        self._chars += _text_length(parsed)
        if "usage" not in parsed:
            return event
        usage = _reported(parsed["usage"])
        if usage is not None:
            self._reported = usage
            if self.strip and parsed.get("choices") == []:
                return b""  # the usage-only chunk the client did not ask for
        if self.strip:
            edited = event
            for null in _NULL_USAGE:
                edited = edited.replace(null, b"")
            return edited if edited != event else event
        return event

    def result(self) -> Usage:
        """Usage as reported by the provider, else estimated from what was delivered."""
        if self._reported is not None:
            return Usage(*self._reported, estimated=False)
        return Usage(self.prompt_estimate, math.ceil(self._chars / 4), estimated=True)
