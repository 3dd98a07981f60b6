"""A demo OpenAI-compatible model server: stands in for a real provider in local mode and tests.

It answers chat and text completions with a short, deterministic reply that names the demo
model. It reports token usage, streams server-sent events chunk by chunk, and can be slowed
down or made to fail at a configurable rate. It remembers the last request it received
(``GET /_demo/last_request``), so tests can check what the gateway forwarded. Faults can be
changed while it runs: ``POST /_demo/faults {"status": 429, "rate": 1.0, "latency_ms": 0}``
answers that status at that rate and/or after that latency; ``{}`` restores the start settings.

It also stands in for a judge model (shadow evaluation, ``switchyard.extproc.shadow``): a chat
request whose last user message holds ``<answer_a>...</answer_a>`` and
``<answer_b>...</answer_b>`` is answered with ``{"a": <score>, "b": <score>}``, each score
``judge_score`` of that answer's text: the first four bytes of the sha256 of the stripped text,
as a fraction of 2**32 - 1, rounded to 3 decimals. Arbitrary but deterministic, so tests can
predict every score.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import re
import signal
import ssl
import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
from aiohttp import web

LAST_REQUEST: web.AppKey[dict[str, Any]] = web.AppKey("last_request", dict)
CHUNK_WORDS = 3


def _tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


_ERROR_KINDS = {429: ("rate_limit_error", "rate_limit_exceeded")}


def _error(name: str, status: int, message: str, type_: str, code: str) -> web.Response:
    """An OpenAI-style error body."""
    body = {"error": {"message": message, "type": type_, "code": code, "param": None}}
    return web.json_response(body, status=status, headers={"x-demo-upstream": name}, dumps=_dumps)


def _text(content: Any) -> str:
    """The text of a message content: a string or a list of content parts."""
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def _prompt_text(payload: dict[str, Any], chat: bool) -> tuple[str, str]:
    """(all input text, the text to answer)."""
    if not chat:
        prompt = payload["prompt"]
        text = "\n".join(map(str, prompt)) if isinstance(prompt, list) else str(prompt)
        return text, text
    texts, last_user = [], ""
    for message in payload["messages"]:
        content = _text(message.get("content"))
        texts.append(content)
        if message.get("role") == "user":
            last_user = content
    return "\n".join(texts), last_user


def _reply(name: str, question: str, max_tokens: int | None) -> str:
    words = question.split()
    summary = " ".join(words[:12]) + (" ..." if len(words) > 12 else "")
    reply = f"[demo:{name}] You asked: {summary}"
    if max_tokens is not None:
        reply = reply[: max(1, max_tokens * 4)]
    return reply


_JUDGED = re.compile(r"<answer_(a|b)>(.*?)</answer_\1>", re.S)


def judge_score(answer: str) -> float:
    """The demo judge's score of one answer (see the module docstring)."""
    digest = hashlib.sha256(answer.strip().encode()).digest()
    return round(int.from_bytes(digest[:4], "big") / 0xFFFFFFFF, 3)


def _judgement(question: str) -> str | None:
    """The demo judge's reply to a judge prompt; None for any other prompt."""
    found = {m.group(1): m.group(2) for m in _JUDGED.finditer(question)}
    if "a" not in found or "b" not in found:
        return None
    return _dumps({"a": judge_score(found["a"]), "b": judge_score(found["b"])})


def _chunks(text: str) -> Iterator[str]:
    words = text.split(" ")
    for i in range(0, len(words), CHUNK_WORDS):
        piece = " ".join(words[i : i + CHUNK_WORDS])
        yield piece if i == 0 else " " + piece


class DemoModel:
    """Request handlers of one demo model."""

    def __init__(self, name: str, latency_ms: float, failure_rate: float, seed: int | None):
        self.name = name
        self.latency_s = latency_ms / 1000
        self.failure_rate = failure_rate
        self.failure_status = 503
        self.chunk_gap_s = 0.0  # pause between streamed chunks
        self.random = random.Random(seed)
        self._start = (self.latency_s, failure_rate)

    async def faults(self, request: web.Request) -> web.Response:
        """Replace the injected faults: ``status`` (400-599) at ``rate`` (default 1.0),
        ``latency_ms`` and ``chunk_gap_ms`` (between streamed chunks); fields left out take
        their start values."""
        try:
            body = orjson.loads(await request.read() or b"{}")
            status = int(body.get("status", 503))
            rate = float(body.get("rate", 1.0 if "status" in body else self._start[1]))
            latency_s = float(body.get("latency_ms", self._start[0] * 1000)) / 1000
            chunk_gap_s = float(body.get("chunk_gap_ms", 0)) / 1000
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            return self._invalid("expected {status, rate, latency_ms}", "invalid_faults")
        if not (400 <= status <= 599 and 0 <= rate <= 1 and latency_s >= 0 <= chunk_gap_s):
            return self._invalid(
                "status 400-599, rate 0-1, latency_ms and chunk_gap_ms >= 0", "invalid_faults"
            )
        self.failure_status, self.failure_rate, self.latency_s = status, rate, latency_s
        self.chunk_gap_s = chunk_gap_s
        return web.json_response(
            {"status": status, "rate": rate, "latency_ms": latency_s * 1000}, dumps=_dumps
        )

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    async def models(self, _request: web.Request) -> web.Response:
        data = [{"id": self.name, "object": "model", "created": 0, "owned_by": "switchyard-demo"}]
        return web.json_response({"object": "list", "data": data})

    async def last_request(self, request: web.Request) -> web.Response:
        return web.json_response(request.app[LAST_REQUEST])

    async def _complete(self, request: web.Request, chat: bool) -> web.StreamResponse:
        raw = await request.read()
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return self._invalid("the request body is not valid JSON", "invalid_json")
        if not isinstance(payload, dict):
            return self._invalid("the request body must be a JSON object", "invalid_json")
        last = request.app[LAST_REQUEST]
        last.clear()
        last.update(
            {"body": payload, "headers": {k.lower(): v for k, v in request.headers.items()}}
        )
        if chat:
            messages = payload.get("messages")
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                return self._invalid(
                    "'messages' must be a list of message objects", "invalid_request"
                )
        elif not isinstance(payload.get("prompt"), str | list):
            return self._invalid("'prompt' is required", "invalid_request")
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if self.failure_rate and self.random.random() < self.failure_rate:
            message = f"demo model {self.name} is failing on purpose"
            status = self.failure_status
            type_, code = _ERROR_KINDS.get(status, ("server_error", "demo_failure"))
            return _error(self.name, status, message, type_, code)
        text, question = _prompt_text(payload, chat)
        limit = payload.get("max_completion_tokens") or payload.get("max_tokens")
        reply = (_judgement(question) if chat else None) or _reply(
            self.name, question, limit if isinstance(limit, int) else None
        )
        usage = {
            "prompt_tokens": _tokens(text),
            "completion_tokens": _tokens(reply),
            "total_tokens": _tokens(text) + _tokens(reply),
        }
        model = str(payload.get("model", self.name))
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if payload.get("stream") is True:
            return await self._stream(request, chat, ident, model, reply, usage, payload)
        if chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": reply},
                "finish_reason": "stop",
            }
        else:
            choice = {"index": 0, "text": reply, "finish_reason": "stop"}
        body = {
            "id": ident,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": usage,
        }
        return web.json_response(body, headers={"x-demo-upstream": self.name}, dumps=_dumps)

    def _invalid(self, message: str, code: str) -> web.Response:
        return _error(self.name, 400, message, "invalid_request_error", code)

    async def _stream(
        self,
        request: web.Request,
        chat: bool,
        ident: str,
        model: str,
        reply: str,
        usage: dict[str, int],
        payload: dict[str, Any],
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "content-type": "text/event-stream",
                "cache-control": "no-cache",
                "x-demo-upstream": self.name,
            }
        )
        await response.prepare(request)
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        options = payload.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True

        async def send(choices: list[dict[str, Any]], **extra: Any) -> None:
            event = {
                "id": ident,
                "object": kind,
                "created": created,
                "model": model,
                "choices": choices,
                **extra,
            }
            if include_usage and "usage" not in extra:
                event["usage"] = None  # as OpenAI: every chunk but the last carries a null usage
            await response.write(b"data: " + orjson.dumps(event) + b"\n\n")

        if chat:
            await send(
                [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
            )
        for piece in _chunks(reply):
            if self.chunk_gap_s:
                await asyncio.sleep(self.chunk_gap_s)
            delta: dict[str, Any] = {"delta": {"content": piece}} if chat else {"text": piece}
            await send([{"index": 0, **delta, "finish_reason": None}])
        final: dict[str, Any] = {"delta": {}} if chat else {"text": ""}
        await send([{"index": 0, **final, "finish_reason": "stop"}])
        if include_usage:
            await send([], usage=usage)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def build_app(
    name: str, latency_ms: float = 0.0, failure_rate: float = 0.0, seed: int | None = None
) -> web.Application:
    """The aiohttp application of one demo model."""
    model = DemoModel(name, latency_ms, failure_rate, seed)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[LAST_REQUEST] = {}
    app.router.add_post("/v1/chat/completions", model.chat)
    app.router.add_post("/v1/completions", model.completions)
    app.router.add_get("/v1/models", model.models)
    app.router.add_get("/_demo/last_request", model.last_request)
    app.router.add_post("/_demo/faults", model.faults)
    return app


def run_demo_upstream(
    name: str,
    port: int,
    latency_ms: float,
    failure_rate: float,
    host: str = "127.0.0.1",
    tls: tuple[str, str] | None = None,
) -> int:
    """Serve on ``host``:``port`` until SIGINT or SIGTERM; 0 on a clean stop.

    ``tls`` = (certificate chain file, key file) serves https instead of http.
    """
    context = None
    if tls is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*tls)

    async def serve() -> None:
        runner = web.AppRunner(build_app(name, latency_ms, failure_rate), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port, ssl_context=context).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(serve())
    return 0
