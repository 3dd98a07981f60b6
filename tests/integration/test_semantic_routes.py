"""Semantic rule conditions through the real gateway (Envoy, ext_proc workers, demo upstreams):
`switchyard up` on the two example files, examples/policy.yaml (alias `auto`) and
examples/semantic.yaml (alias `assistant`: chat, extraction and contract-review rules). A
paraphrase of a rule's examples is routed to that rule's model; an unrelated prompt is left to
the classifier; the policy without semantic rules routes as before."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import yaml
from gateway_harness import DEMO_NAMES, REPO, Gateway, policy_for_ports, start_gateway

from switchyard.local.ports import free_port_block

REASON = re.compile(r"^rule: (?P<rule>[\w-]+), semantic (?P<sim>\d\.\d{3}) >= 0\.5$")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    first = free_port_block(len(DEMO_NAMES))
    ports = {name: first + i for i, name in enumerate(DEMO_NAMES)}
    directory = tmp_path_factory.mktemp("semantic-gateway")
    semantic = yaml.safe_load((REPO / "examples" / "semantic.yaml").read_text())
    for model, name in zip(semantic["spec"]["models"], DEMO_NAMES, strict=True):
        model["backend"]["url"] = f"http://127.0.0.1:{ports[name]}"
    (directory / "semantic.yaml").write_text(yaml.safe_dump(semantic))
    demos = [{"name": n, "port": p} for n, p in ports.items()]
    running = start_gateway(directory, policy_for_ports(ports), demoUpstreams=demos)
    yield running
    assert running.stop() == 0, "".join(running.output)


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key="not-needed", max_retries=0)


def _chat(client: openai.OpenAI, prompt: str, model: str = "assistant") -> Any:
    return client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": prompt}]
    )


@pytest.mark.parametrize(
    ("prompt", "rule", "model", "demo"),
    [
        (
            "Is the limitation of liability in this master services agreement standard?",
            "contract-review",
            "assistant-capable",
            "demo-capable",
        ),
        ("hey, how's it going?", "chat", "assistant-light", "demo-light"),
        (
            "Get the invoice number, total and due date from the document below and output JSON.",
            "extraction",
            "assistant-standard",
            "demo-standard",
        ),
    ],
)
def test_a_paraphrase_goes_to_the_rules_model(
    client: openai.OpenAI, prompt: str, rule: str, model: str, demo: str
) -> None:
    raw = _chat(client, prompt)
    assert raw.http_response.status_code == 200
    assert raw.headers["x-switchyard-model"] == model
    assert raw.headers["x-switchyard-policy"] == "default/assistant"
    found = REASON.match(raw.headers["x-switchyard-reason"])
    assert found is not None, raw.headers["x-switchyard-reason"]
    assert found["rule"] == rule and 0.5 <= float(found["sim"]) <= 1.0
    assert raw.parse().choices[0].message.content.startswith(f"[demo:{demo}]")


@pytest.mark.parametrize(
    "prompt",
    ["What is the capital of France?", "Write a short poem about the ocean at night."],
)
def test_an_unrelated_prompt_is_left_to_the_classifier(client: openai.OpenAI, prompt: str) -> None:
    raw = _chat(client, prompt)
    assert raw.http_response.status_code == 200
    reason = raw.headers["x-switchyard-reason"]
    assert reason.startswith("classifier: difficulty "), reason
    assert "semantic" not in reason
    # the classifier sends these to the cheapest tier, not to the contract-review model
    assert raw.headers["x-switchyard-model"] == "assistant-light"


def test_the_policy_without_semantic_rules_routes_as_before(client: openai.OpenAI) -> None:
    raw = _chat(
        client,
        "Is the limitation of liability in this master services agreement standard?",
        model="auto",
    )
    assert raw.headers["x-switchyard-policy"] == "default/default"
    assert raw.headers["x-switchyard-reason"].startswith("classifier: difficulty ")
    assert raw.headers["x-switchyard-model"] in ("light", "standard", "capable")


def test_streaming_is_routed_by_the_semantic_rule(client: openai.OpenAI) -> None:
    with client.chat.completions.with_streaming_response.create(
        model="assistant",
        messages=[{"role": "user", "content": "Hi, how are you?"}],
        stream=True,
    ) as response:
        assert response.headers["x-switchyard-model"] == "assistant-light"
        assert response.headers["x-switchyard-reason"].startswith("rule: chat, semantic ")
        chunks = [c for c in response.parse() if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks).startswith("[demo:demo-light]")
