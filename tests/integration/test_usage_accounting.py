"""Token usage and cost read from real responses through real Envoy and the ext_proc, with the
official openai client: exact for non-streaming, streaming-with-usage and streaming-without-usage
requests (whose client sees no usage chunk), priced at the answering model's rates (a fallback
is counted as one), and a stream the client abandons accounted for what was delivered."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from gateway_harness import Gateway, start_gateway, url_model
from prometheus_client.parser import text_string_to_metric_families

from switchyard.local.ports import free_port_block
from switchyard.local.runner import port_open, wait_until

POLICY = "default/metered"
PRICES = {"cheap": (2.0, 8.0), "pricey": (10.0, 30.0), "broken": (1.0, 1.0)}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _model(name: str, port: int, **extra: Any) -> dict[str, Any]:
    return url_model(name, port, PRICES[name], **extra)


@pytest.fixture(scope="module")
def metered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, int]]:
    first = free_port_block(len(PRICES))
    ports = {name: first + i for i, name in enumerate(PRICES)}
    metrics = free_port_block()
    policy = {
        "apiVersion": "switchyard.dev/v1alpha1",
        "kind": "RoutePolicy",
        "metadata": {"name": "metered", "namespace": "default"},
        "spec": {
            "match": {"models": ["auto"]},
            "models": [
                _model("cheap", ports["cheap"]),
                _model("pricey", ports["pricey"]),
                _model("broken", ports["broken"], fallbacks=["pricey"]),
            ],
            "strategy": {"type": "rules", "default": "cheap"},
        },
    }
    demo = [
        {"name": "cheap", "port": ports["cheap"]},
        {"name": "pricey", "port": ports["pricey"]},
        {"name": "broken", "port": ports["broken"], "failureRate": 1.0},
    ]
    gateway = start_gateway(
        tmp_path_factory.mktemp("usage"), policy, demoUpstreams=demo, metricsPort=metrics
    )
    gateway.demo_ports.update(ports)
    wait_until(lambda: port_open("127.0.0.1", metrics), 30, "metrics endpoint")
    yield gateway, metrics
    assert gateway.stop() == 0, "".join(gateway.output)


def _samples(port: int) -> Samples:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


def _client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0)


def _assert_accounted(
    before: Samples, after: Samples, model: str, tokens: tuple[int, int], responses: int = 1
) -> None:
    labels = {"policy": POLICY, "model": model}
    assert (
        _delta(before, after, "switchyard_tokens_total", **labels, direction="input") == (tokens[0])
    )
    assert (
        _delta(before, after, "switchyard_tokens_total", **labels, direction="output")
        == (tokens[1])
    )
    price_in, price_out = PRICES[model]
    cost = (tokens[0] * price_in + tokens[1] * price_out) / 1e6
    assert _delta(before, after, "switchyard_cost_usd_total", **labels) == pytest.approx(cost)
    complete = _delta(before, after, "switchyard_responses_total", **labels, outcome="complete")
    assert complete == responses


def _settled(port: int, before: Samples, responses: float, **labels: str) -> Samples:
    """Metrics once ``responses`` more responses with ``labels`` were counted: a stream's last
    chunk is accounted as it passes, a moment after the client read it."""
    seen: dict[str, Samples] = {}

    def counted() -> bool:
        seen["now"] = _samples(port)
        delta = sum(
            v - before.get(k, 0.0)
            for k, v in seen["now"].items()
            if k[0] == "switchyard_responses_total" and set(labels.items()) <= set(k[1])
        )
        return delta >= responses

    wait_until(counted, 10, f"a response with {labels} to be accounted")
    return seen["now"]


MESSAGES = [{"role": "user", "content": "Summarise the plot of Hamlet in one line."}]


def test_a_non_streaming_response_is_accounted_exactly(metered: tuple[Gateway, int]) -> None:
    gateway, port = metered
    before = _samples(port)
    reply = _client(gateway).chat.completions.create(model="auto", messages=MESSAGES)
    assert reply.usage is not None
    after = _settled(port, before, 1, model="cheap")
    _assert_accounted(
        before, after, "cheap", (reply.usage.prompt_tokens, reply.usage.completion_tokens)
    )


def test_a_stream_that_asks_for_usage_gets_it_and_is_accounted(
    metered: tuple[Gateway, int],
) -> None:
    gateway, port = metered
    before = _samples(port)
    chunks = list(
        _client(gateway).chat.completions.create(
            model="auto", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    after = _settled(port, before, 1, model="cheap")
    _assert_accounted(before, after, "cheap", (usage.prompt_tokens, usage.completion_tokens))


def test_a_stream_that_did_not_ask_gets_no_usage_but_is_accounted(
    metered: tuple[Gateway, int],
) -> None:
    gateway, port = metered
    before = _samples(port)
    body = {"model": "auto", "messages": MESSAGES, "stream": True}
    with httpx.stream("POST", f"{gateway.base_url}/chat/completions", json=body) as response:
        raw = response.read()
    assert response.status_code == 200
    assert b"usage" not in raw  # neither the usage chunk nor the null usage fields
    events = [e for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    # What the provider would have reported, had the client asked: the same request again.
    chunks = list(
        _client(gateway).chat.completions.create(
            model="auto", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    assert len(chunks) == len(events)  # the usage chunk replaces [DONE] in the openai client
    usage = chunks[-1].usage
    assert usage is not None
    after = _settled(port, before, 2, model="cheap")
    tokens = (2 * usage.prompt_tokens, 2 * usage.completion_tokens)
    _assert_accounted(before, after, "cheap", tokens, responses=2)


def test_a_fallback_is_priced_at_the_model_that_answered(metered: tuple[Gateway, int]) -> None:
    gateway, port = metered
    before = _samples(port)
    raw = _client(gateway).chat.completions.with_raw_response.create(
        model="broken", messages=MESSAGES
    )
    assert raw.headers["x-switchyard-model"] == "pricey"
    usage = raw.parse().usage
    assert usage is not None
    after = _settled(port, before, 1, model="pricey")
    _assert_accounted(before, after, "pricey", (usage.prompt_tokens, usage.completion_tokens))
    fallback = {"policy": POLICY, "from_model": "broken", "to_model": "pricey"}
    assert _delta(before, after, "switchyard_fallbacks_total", **fallback) == 1
    assert _delta(before, after, "switchyard_tokens_total", policy=POLICY, model="broken",
                  direction="input") == 0  # fmt: skip


def test_an_abandoned_stream_is_accounted_for_what_was_delivered(
    metered: tuple[Gateway, int],
) -> None:
    gateway, port = metered
    demo = f"http://127.0.0.1:{gateway.demo_ports['cheap']}/_demo/faults"
    assert httpx.post(demo, json={"chunk_gap_ms": 100}).status_code == 200
    try:
        before = _samples(port)
        body = {"model": "auto", "messages": MESSAGES, "stream": True, "max_tokens": 64}
        text = ""
        with httpx.stream("POST", f"{gateway.base_url}/chat/completions", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    event = httpx.Response(200, content=line[6:]).json()
                    text += event["choices"][0]["delta"].get("content") or ""
                if len(text) > 12:
                    break  # hang up mid-stream
        after = _settled(port, before, 1, model="cheap", outcome="incomplete")
        labels = {"policy": POLICY, "model": "cheap"}
        output = _delta(before, after, "switchyard_tokens_total", **labels, direction="output")
        # Envoy may have passed a chunk or two more than the client read before it hung up.
        assert math.ceil(len(text) / 4) <= output <= math.ceil(len(text) / 4) + 8
        assert _delta(before, after, "switchyard_tokens_total", **labels, direction="input") > 0
        assert _delta(before, after, "switchyard_cost_usd_total", **labels) > 0
    finally:
        httpx.post(demo, json={"chunk_gap_ms": 0})
