"""The demo upstream speaks enough OpenAI for the official client."""

from __future__ import annotations

import json
import math
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from switchyard.demo.upstream import LAST_REQUEST, build_app

Client = TestClient[web.Request, web.Application]
QUESTION = "one two three four five six seven"


@pytest.fixture
async def demo() -> AsyncIterator[Client]:
    async with TestClient(TestServer(build_app("demo-x", seed=1))) as client:
        yield client


def api_for(client: Client) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="x", max_retries=0)


async def test_chat_answers_with_usage_header_and_records_the_request(demo: Client) -> None:
    api = api_for(demo)
    raw = await api.chat.completions.with_raw_response.create(
        model="m1",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": QUESTION},
        ],
        extra_headers={"X-Probe": "p1"},
    )
    completion = raw.parse()
    assert raw.headers["x-demo-upstream"] == "demo-x"
    assert completion.model == "m1"
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.created > 0
    choice = completion.choices[0]
    assert choice.index == 0 and choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert choice.message.content == f"[demo:demo-x] You asked: {QUESTION}"
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens == math.ceil(len("be brief\n" + QUESTION) / 4)
    assert usage.completion_tokens == math.ceil(len(choice.message.content) / 4)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    recorded = demo.app[LAST_REQUEST]
    assert recorded["body"]["model"] == "m1"
    assert recorded["headers"]["x-probe"] == "p1"
    seen = await (await demo.get("/_demo/last_request")).json()
    assert seen["body"]["messages"][1] == {"role": "user", "content": QUESTION}
    assert seen["headers"]["x-probe"] == "p1"

    body = {"model": "m2", "messages": []}
    await demo.post("/v1/chat/completions", json=body, headers={"X-Mixed-Case": "v"})
    assert demo.app[LAST_REQUEST]["body"] == body
    assert demo.app[LAST_REQUEST]["headers"]["x-mixed-case"] == "v"


@pytest.mark.parametrize("limit", ["max_tokens", "max_completion_tokens"])
async def test_token_limit_truncates_the_reply(demo: Client, limit: str) -> None:
    body: dict[str, Any] = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}
    body[limit] = 3
    response = await demo.post("/v1/chat/completions", json=body)
    assert response.status == 200
    answer = await response.json()
    assert answer["choices"][0]["message"]["content"] == "[demo:demo-x"
    assert answer["usage"]["completion_tokens"] == 3


async def test_text_completion(demo: Client) -> None:
    raw = await api_for(demo).completions.with_raw_response.create(model="m2", prompt="Say hi")
    completion = raw.parse()
    assert raw.headers["x-demo-upstream"] == "demo-x"
    assert completion.model == "m2"
    assert completion.object == "text_completion"
    assert completion.choices[0].text == "[demo:demo-x] You asked: Say hi"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 2
    assert completion.usage.total_tokens == 2 + completion.usage.completion_tokens


async def test_models_lists_the_demo_model(demo: Client) -> None:
    assert [m.id async for m in api_for(demo).models.list()] == ["demo-x"]
    listing = await (await demo.get("/v1/models")).json()
    assert listing["object"] == "list"
    assert listing["data"][0]["owned_by"] == "switchyard-demo"


async def test_chat_streams_chunks_then_usage(demo: Client) -> None:
    stream = await api_for(demo).chat.completions.create(
        model="m1",
        messages=[{"role": "user", "content": QUESTION}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert all(c.object == "chat.completion.chunk" and c.model == "m1" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(pieces) > 2
    assert "".join(pieces) == f"[demo:demo-x] You asked: {QUESTION}"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == math.ceil(len("".join(pieces)) / 4)


async def test_stream_without_include_usage_has_no_usage_chunk(demo: Client) -> None:
    stream = await api_for(demo).chat.completions.create(
        model="m1", messages=[{"role": "user", "content": QUESTION}], stream=True
    )
    chunks = [c async for c in stream]
    assert chunks and all(c.usage is None and c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_completion_streams(demo: Client) -> None:
    stream = await api_for(demo).completions.create(
        model="m2", prompt=QUESTION, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == f"[demo:demo-x] You asked: {QUESTION}"
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 2
    assert chunks[-1].usage is not None


async def test_stream_is_sse_written_one_event_at_a_time(
    demo: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[bytes] = []
    original = web.StreamResponse.write

    async def spy(self: web.StreamResponse, data: bytes | bytearray | memoryview) -> None:
        writes.append(bytes(data))
        await original(self, data)

    monkeypatch.setattr(web.StreamResponse, "write", spy)
    body = {
        "model": "m1",
        "messages": [{"role": "user", "content": QUESTION}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    response = await demo.post("/v1/chat/completions", json=body)
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-demo-upstream"] == "demo-x"
    text = await response.text()
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["usage"]["total_tokens"] > 0
    assert len(events) > 4
    # Every event went out in its own write, not buffered into one body.
    assert [w.decode() for w in writes] == [e + "\n\n" for e in events]


async def test_failure_rate_one_always_fails() -> None:
    async with TestClient(TestServer(build_app("f", failure_rate=1.0, seed=0))) as client:
        response = await client.post(
            "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user"}]}
        )
        assert response.status == 503
        assert response.headers["x-demo-upstream"] == "f"
        error = (await response.json())["error"]
        assert error["code"] == "demo_failure"
        assert error["type"] == "server_error"
        assert "f" in error["message"]
        with pytest.raises(openai.InternalServerError) as caught:
            await api_for(client).completions.create(model="m", prompt="x")
        assert caught.value.status_code == 503


async def test_failures_follow_the_seed() -> None:
    rng = random.Random(7)
    expected = [503 if rng.random() < 0.5 else 200 for _ in range(20)]
    assert 200 in expected and 503 in expected
    async with TestClient(TestServer(build_app("f", failure_rate=0.5, seed=7))) as client:
        body = {"model": "m", "prompt": "x"}
        statuses = [(await client.post("/v1/completions", json=body)).status for _ in range(20)]
    assert statuses == expected


@pytest.mark.parametrize(
    ("path", "data", "code"),
    [
        ("/v1/chat/completions", b"{nope", "invalid_json"),
        ("/v1/chat/completions", b"[1, 2]", "invalid_json"),
        ("/v1/chat/completions", b'{"model": "m"}', "invalid_request"),
        ("/v1/chat/completions", b'{"model": "m", "messages": ["hi"]}', "invalid_request"),
        ("/v1/completions", b'{"model": "m"}', "invalid_request"),
    ],
)
async def test_bad_requests_get_400(demo: Client, path: str, data: bytes, code: str) -> None:
    response = await demo.post(path, data=data, headers={"content-type": "application/json"})
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["code"] == code
    assert error["type"] == "invalid_request_error"
    assert error["message"]


async def test_latency_delays_the_answer() -> None:
    async with TestClient(TestServer(build_app("slow", latency_ms=200))) as client:
        started = time.monotonic()
        response = await client.post("/v1/completions", json={"model": "m", "prompt": "x"})
        elapsed = time.monotonic() - started
    assert response.status == 200
    assert elapsed >= 0.2


async def test_faults_change_at_runtime_and_empty_restores_the_start() -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    async with TestClient(TestServer(build_app("f", seed=0))) as client:
        assert (await client.post("/v1/chat/completions", json=chat)).status == 200
        set_429 = await client.post("/_demo/faults", json={"status": 429, "rate": 1.0})
        assert await set_429.json() == {"status": 429, "rate": 1.0, "latency_ms": 0.0}
        limited = await client.post("/v1/chat/completions", json=chat)
        assert limited.status == 429
        error = (await limited.json())["error"]
        assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
        await client.post("/_demo/faults", json={"status": 500})
        failed = await client.post("/v1/chat/completions", json=chat)
        assert failed.status == 500
        assert (await failed.json())["error"]["type"] == "server_error"
        await client.post("/_demo/faults", json={"latency_ms": 200})
        started = time.monotonic()
        slow = await client.post("/v1/chat/completions", json=chat)
        assert slow.status == 200 and time.monotonic() - started >= 0.2
        await client.post("/_demo/faults", json={})
        started = time.monotonic()
        assert (await client.post("/v1/chat/completions", json=chat)).status == 200
        assert time.monotonic() - started < 0.2


@pytest.mark.parametrize(
    "body", [b"{nope", b"[1]", b'{"status": 200}', b'{"rate": 2}', b'{"latency_ms": -1}']
)
async def test_invalid_faults_get_400_and_change_nothing(body: bytes) -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    async with TestClient(TestServer(build_app("f", seed=0))) as client:
        response = await client.post("/_demo/faults", data=body)
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "invalid_faults"
        assert (await client.post("/v1/chat/completions", json=chat)).status == 200


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_serves_until_signalled(sig: signal.Signals) -> None:
    port = free_port()
    args = ["demo-upstream", "--name", "cli-x", "--port", str(port)]
    args += ["--latency-ms", "0", "--failure-rate", "0"]
    child = subprocess.Popen([sys.executable, "-m", "switchyard.cli", *args])
    try:
        deadline = time.monotonic() + 30
        while True:
            assert child.poll() is None, "demo upstream exited early"
            try:
                listing = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).json()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "demo upstream never listened"
                time.sleep(0.05)
        assert listing["data"][0]["id"] == "cli-x"
        child.send_signal(sig)
        assert child.wait(timeout=30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
