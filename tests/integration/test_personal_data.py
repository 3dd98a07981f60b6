"""Personal-data detection through the real gateway (Envoy, ext_proc workers, demo upstreams,
examples/policy.yaml): a client that forgets x-switchyard-data-class still keeps personal data
on the model that may see it, a redacting policy strips it from what the upstream receives,
and the matched text shows up in no response header, metric or log line."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import yaml
from gateway_harness import Gateway, start_gateway

from switchyard.local.ports import free_port_block
from switchyard.local.runner import port_open, wait_until

HARD = (
    "Prove rigorously, step by step, that every polynomial with real coefficients of odd degree "
    "has a real root, then implement a numerically stable root-finding algorithm in python and "
    "analyze its edge cases and convergence."
)
EMAIL = "maria.lopez@example.com"
CARD = "4111 1111 1111 1111"
IBAN = "DE89 3704 0044 0532 0130 00"
SECRETS = (EMAIL, CARD, IBAN, CARD.replace(" ", ""), IBAN.replace(" ", ""))
PII_PROMPTS = {
    "email": f"{HARD} Send the result to {EMAIL}.",
    "payment-card": f"{HARD} Bill it to my card {CARD}.",
    "iban": f"{HARD} Refund to IBAN {IBAN}.",
}
DEMO_PORT = {"light": "demo-light", "standard": "demo-standard", "capable": "demo-capable"}


@pytest.fixture(scope="module")
def metered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, int]]:
    port = free_port_block()
    gateway = start_gateway(tmp_path_factory.mktemp("pii"), metricsPort=port)
    wait_until(lambda: port_open("127.0.0.1", port), 30, "metrics endpoint")
    yield gateway, port
    assert gateway.stop() == 0, "".join(gateway.output)


@pytest.fixture(scope="module")
def client(metered: tuple[Gateway, int]) -> openai.OpenAI:
    return openai.OpenAI(base_url=metered[0].base_url, api_key="not-needed", max_retries=0)


def chat(client: openai.OpenAI, prompt: str) -> Any:
    return client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": prompt}]
    )


def last_request(gateway: Gateway, model: str) -> dict[str, Any]:
    port = gateway.demo_ports[DEMO_PORT[model]]
    seen: dict[str, Any] = httpx.get(f"http://127.0.0.1:{port}/_demo/last_request").json()
    return seen


def assert_no_secret(where: str, text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} in {where}"


def test_pii_without_the_header_is_served_only_by_the_pii_model(
    metered: tuple[Gateway, int], client: openai.OpenAI
) -> None:
    gateway, _ = metered
    # Without personal data, the same hard prompt goes to a model that may not see pii.
    assert chat(client, HARD).headers["x-switchyard-model"] in ("standard", "capable")
    for detector, prompt in PII_PROMPTS.items():
        raw = chat(client, prompt)
        assert raw.http_response.status_code == 200
        assert raw.headers["x-switchyard-model"] == "light"
        assert raw.headers["x-switchyard-reason"].endswith(f", pii: {detector}")
        assert raw.parse().choices[0].message.content.startswith("[demo:demo-light]")
        for name, value in raw.headers.items():
            assert_no_secret(f"response header {name}", value)
        # Routed, not altered: the model allowed to see it gets the text as sent.
        body = last_request(gateway, "light")["body"]
        assert body["messages"] == [{"role": "user", "content": prompt}]


def test_redacting_policy_strips_the_text_sent_upstream(
    metered: tuple[Gateway, int], client: openai.OpenAI
) -> None:
    gateway, _ = metered
    original = gateway.policy_file.read_text()
    policy = yaml.safe_load(original)
    policy["spec"]["personalData"] = {"action": "redact"}
    gateway.policy_file.write_text(yaml.safe_dump(policy))
    try:
        raw = _reason_within(client, PII_PROMPTS["email"], "pii redacted: email", seconds=15)
        model = raw.headers["x-switchyard-model"]
        assert model in ("standard", "capable")  # the class stays public: routed on merit
        for name, value in raw.headers.items():
            assert_no_secret(f"response header {name}", value)
        content = last_request(gateway, model)["body"]["messages"][0]["content"]
        assert content == PII_PROMPTS["email"].replace(EMAIL, "[REDACTED:email]")
    finally:
        gateway.policy_file.write_text(original)
    _reason_within(client, PII_PROMPTS["email"], ", pii: email", seconds=15)


def test_matched_text_is_in_no_metric_or_log_line(metered: tuple[Gateway, int]) -> None:
    gateway, metrics_port = metered
    metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    assert "switchyard" in metrics
    assert_no_secret("ext_proc metrics", metrics)
    stats = httpx.get(f"http://127.0.0.1:{gateway.admin_port}/stats", timeout=5).text
    assert_no_secret("Envoy stats", stats)
    # Everything the gateway printed (Envoy, the ext_proc workers, the control plane).
    assert_no_secret("gateway output", "".join(gateway.output))


def _reason_within(client: openai.OpenAI, prompt: str, reason: str, seconds: float) -> Any:
    """Poll until ``prompt``'s reason contains ``reason`` on 6 requests in a row (every worker
    has the edited policy); the last response."""
    deadline = time.monotonic() + seconds
    in_a_row = 0
    while time.monotonic() < deadline:
        raw = chat(client, prompt)
        in_a_row = in_a_row + 1 if reason in raw.headers["x-switchyard-reason"] else 0
        if in_a_row == 6:
            return raw
    raise AssertionError(f"no {reason!r} within {seconds}s: {raw.headers['x-switchyard-reason']}")
