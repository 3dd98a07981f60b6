"""The demo upstream speaks enough OpenAI for the official client."""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer

from switchyard.demo.upstream import build_app


@pytest.fixture
async def demo() -> AsyncIterator[TestClient[object, object]]:
    async with TestClient(TestServer(build_app("demo-x", seed=1))) as client:
        yield client


async def test_chat_with_usage_and_last_request(demo: TestClient[object, object]) -> None:
    api = openai.AsyncOpenAI(base_url=str(demo.make_url("/v1")), api_key="x")
    completion = await api.chat.completions.create(
        model="m1", messages=[{"role": "user", "content": "hello there"}], max_tokens=3
    )
    assert completion.model == "m1"
    assert completion.choices[0].message.content == "[demo:demo-x"[:12]
    assert completion.usage is not None and completion.usage.prompt_tokens == 3
    seen = await (await demo.get("/_demo/last_request")).json()
    assert seen["body"]["max_tokens"] == 3


async def test_streaming_chunks_and_usage(demo: TestClient[object, object]) -> None:
    api = openai.AsyncOpenAI(base_url=str(demo.make_url("/v1")), api_key="x")
    stream = await api.chat.completions.create(
        model="m1",
        messages=[{"role": "user", "content": "one two three four five six seven"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    pieces = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(pieces) > 2
    assert "".join(pieces).startswith("[demo:demo-x] You asked: one two")
    assert chunks[-1].usage is not None


async def test_completions_and_models(demo: TestClient[object, object]) -> None:
    api = openai.AsyncOpenAI(base_url=str(demo.make_url("/v1")), api_key="x")
    completion = await api.completions.create(model="m2", prompt="Say hi")
    assert completion.choices[0].text.startswith("[demo:demo-x]")
    assert [m.id async for m in api.models.list()] == ["demo-x"]


async def test_failure_rate_and_bad_json() -> None:
    async with TestClient(TestServer(build_app("f", failure_rate=1.0, seed=0))) as client:
        response = await client.post("/v1/chat/completions", json={"model": "m", "messages": []})
        assert response.status == 503
        assert (await response.json())["error"]["code"] == "demo_failure"
        response = await client.post("/v1/chat/completions", data=b"{nope")
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "invalid_json"
