"""`switchyard up -f examples/tenants/` as the README describes it: the demo key's daily budget
is spent after a few dozen requests (then 429 with Retry-After), the batch tenant's token rate
limit refuses the rest of its minute, and an unknown key gets 401. Real Envoy, two ext_proc
workers, the real redis-server the document asks for, the official `openai` client."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from gateway_harness import REPO, Gateway, start_gateway

CLIENTS = REPO / "examples" / "tenants" / "clients.yaml"
HARD = (
    "Prove step by step that every odd-degree real polynomial has a real root, then implement "
    "a root finder in python and analyze its edge cases."
)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    directory: Path = tmp_path_factory.mktemp("tenants")
    shutil.copy(CLIENTS, directory / "clients.yaml")  # the example, verbatim
    running = start_gateway(directory)
    yield running
    assert running.stop() == 0, "".join(running.output)


def client(gateway: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0)


def test_the_demo_keys_budget_is_spent_after_a_few_dozen_requests(gateway: Gateway) -> None:
    demo = client(gateway, "sk-switchyard-demo")
    raw = demo.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": HARD}]
    )
    assert raw.headers["x-switchyard-model"] == "light"  # the demo tenant may use light only
    usages = [raw.parse().usage]
    with pytest.raises(openai.RateLimitError) as refused:
        while len(usages) < 400:
            answer = demo.chat.completions.create(
                model="auto", messages=[{"role": "user", "content": "What is 2 + 2?"}]
            )
            usages.append(answer.usage)
    assert 12 <= len(usages) <= 200, len(usages)
    error = refused.value
    assert error.code == "budget_exceeded"
    assert "budget of tenant 'demo' ($0.0002 per day) is spent" in error.message
    assert 0 < int(error.response.headers["retry-after"]) <= 86_400
    # What was served, at light's prices ($0.05 / $0.08 per 1M tokens), fits the budget.
    spent = sum(u.prompt_tokens * 0.05e-6 + u.completion_tokens * 0.08e-6 for u in usages if u)
    assert 0.00005 < spent <= 0.0002  # refusals may come early: settlements lag a little


def test_the_batch_tenants_token_rate_limit_holds(gateway: Gateway) -> None:
    batch = client(gateway, "sk-switchyard-batch-demo")
    tokens = 0
    with pytest.raises(openai.RateLimitError) as refused:
        for _ in range(400):
            answer = batch.chat.completions.create(
                model="auto",
                messages=[{"role": "user", "content": "Summarise Hamlet in two sentences."}],
                max_tokens=100,
            )
            assert answer.usage is not None
            tokens += answer.usage.total_tokens
    assert tokens <= 2_000
    assert refused.value.code == "rate_limit_exceeded"
    assert 0 < int(refused.value.response.headers["retry-after"]) <= 60


def test_an_unknown_key_gets_401(gateway: Gateway) -> None:
    with pytest.raises(openai.AuthenticationError):
        client(gateway, "sk-switchyard-not-a-key").chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "hi"}]
        )
