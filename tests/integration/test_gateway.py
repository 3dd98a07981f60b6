"""The local gateway end to end: the official OpenAI client through real Envoy and ext_proc."""

from __future__ import annotations

import time
from typing import Any

import httpx
import openai
import pytest
import yaml
from gateway_harness import Gateway

SHORT = "What is the capital of France?"
HARD = (
    "Prove rigorously, step by step, that every polynomial with real coefficients of odd degree "
    "has a real root, then implement a numerically stable root-finding algorithm in python and "
    "analyze its edge cases and convergence."
)


def chat(client: openai.OpenAI, prompt: str, **kwargs: Any) -> Any:
    return client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": prompt}], **kwargs
    )


def test_chat_completion_is_routed_with_decision_headers(client: openai.OpenAI) -> None:
    raw = chat(client, SHORT)
    completion = raw.parse()
    assert raw.http_response.status_code == 200
    assert raw.headers["x-switchyard-model"] == "light"
    assert raw.headers["x-switchyard-policy"] == "default/default"
    assert raw.headers["x-switchyard-reason"].startswith("classifier: difficulty")
    assert completion.model == "demo-light-8b"
    assert completion.choices[0].message.content.startswith("[demo:demo-light]")
    assert completion.usage is not None and completion.usage.prompt_tokens > 0


def test_short_and_hard_prompts_go_to_different_models(client: openai.OpenAI) -> None:
    short = chat(client, SHORT).headers["x-switchyard-model"]
    hard = chat(client, HARD).headers["x-switchyard-model"]
    assert short == "light"
    assert hard in ("standard", "capable")


def test_session_affinity_keeps_a_conversation_on_one_model(client: openai.OpenAI) -> None:
    session = {"x-session-id": "conversation-42"}
    turns = [{"role": "user", "content": SHORT}]
    first = client.chat.completions.with_raw_response.create(
        model="auto", messages=turns, extra_headers=session
    )
    turns += [{"role": "assistant", "content": "Paris."}, {"role": "user", "content": HARD}]
    later = client.chat.completions.with_raw_response.create(
        model="auto", messages=turns, extra_headers=session
    )
    unpinned = client.chat.completions.with_raw_response.create(model="auto", messages=turns)
    assert first.headers["x-switchyard-model"] == "light"
    assert later.headers["x-switchyard-model"] == "light"  # the hard turn stays with the session
    assert unpinned.headers["x-switchyard-model"] in ("standard", "capable")


def test_upstream_receives_the_rewritten_model(client: openai.OpenAI, gateway: Gateway) -> None:
    chat(client, HARD, max_tokens=50)
    port = gateway.demo_ports["demo-capable"]
    seen = httpx.get(f"http://127.0.0.1:{port}/_demo/last_request").json()
    body = seen["body"]
    assert body["model"] == "demo-capable-frontier"
    assert body["max_tokens"] == 50
    assert body["messages"] == [{"role": "user", "content": HARD}]
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert "x-switchyard-backend" not in headers


# "standard" has a fallback, so it streams through the aggregate cluster's upstream filters.
@pytest.mark.parametrize(("model", "served_by"), [("auto", "light"), ("standard", "standard")])
def test_streaming_arrives_in_chunks(client: openai.OpenAI, model: str, served_by: str) -> None:
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": SHORT}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert text.startswith(f"[demo:demo-{served_by}]")
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0


def test_streaming_is_not_buffered(gateway: Gateway) -> None:
    body = {"model": "auto", "stream": True, "messages": [{"role": "user", "content": SHORT}]}
    with httpx.stream("POST", f"{gateway.base_url}/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert len(events) > 2


def test_completions_endpoint(client: openai.OpenAI) -> None:
    raw = client.completions.with_raw_response.create(model="auto", prompt="Say hi")
    assert raw.headers["x-switchyard-model"] == "light"
    assert raw.parse().choices[0].text.startswith("[demo:demo-light]")


def test_models_lists_aliases_and_models(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {"auto", "light", "standard", "capable", "default/default/capable"} <= ids


def test_concrete_model_goes_straight_there(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="capable", messages=[{"role": "user", "content": SHORT}]
    )
    assert raw.headers["x-switchyard-model"] == "capable"
    assert raw.headers["x-switchyard-reason"] == "direct: model named in request"


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "model_not_found"


def test_data_class_keeps_pii_on_allowed_models(client: openai.OpenAI) -> None:
    raw = chat(client, HARD, extra_headers={"x-switchyard-data-class": "pii"})
    assert raw.headers["x-switchyard-model"] == "light"
    with pytest.raises(openai.PermissionDeniedError) as info:
        chat(client, SHORT, extra_headers={"x-switchyard-data-class": "top-secret"})
    assert info.value.code == "data_class_not_allowed"


def test_header_rule(client: openai.OpenAI) -> None:
    raw = chat(client, HARD, extra_headers={"x-priority": "low"})
    assert raw.headers["x-switchyard-model"] == "light"
    assert raw.headers["x-switchyard-reason"] == "rule: low-priority"


def _error(response: httpx.Response) -> dict[str, Any]:
    error = response.json()["error"]
    assert {"message", "type", "code"} <= set(error)
    assert response.headers["content-type"].startswith("application/json")
    return dict(error)


BAD_REQUESTS = [
    ("POST", "/v1/chat/completions", b'{"model": "auto", "messages": [', 400, "invalid_json"),
    ("POST", "/v1/chat/completions", b'{"model": "auto", "messages": "\xff"}', 400, "invalid_json"),
    ("POST", "/v1/chat/completions", b"[]", 400, "invalid_json"),
    ("POST", "/v1/chat/completions", b'{"messages": []}', 400, "invalid_request"),
    ("POST", "/v1/chat/completions", b'{"model": 3, "messages": []}', 400, "invalid_request"),
    ("POST", "/v1/chat/completions", b'{"model": "auto"}', 400, "invalid_request"),
    (
        "POST",
        "/v1/chat/completions",
        b'{"model": "auto", "messages": [{"role": 1}]}',
        400,
        "invalid_request",
    ),
    (
        "POST",
        "/v1/chat/completions",
        b'{"model": "auto", "stream": "yes", "messages": [{"role": "user", "content": "x"}]}',
        400,
        "invalid_request",
    ),
    ("POST", "/v1/completions", b'{"model": "auto", "prompt": 42}', 400, "invalid_request"),
    ("POST", "/v1/chat/completions", b"", 400, "empty_body"),
    ("GET", "/v1/chat/completions", None, 405, "method_not_allowed"),
    ("POST", "/v1/embeddings", b"{}", 404, "unknown_url"),
    ("GET", "/admin", None, 404, "unknown_url"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "code"), BAD_REQUESTS)
def test_bad_requests_get_openai_errors(
    gateway: Gateway, method: str, path: str, body: bytes | None, status: int, code: str
) -> None:
    url = f"http://127.0.0.1:{gateway.port}{path}"
    response = httpx.request(
        method, url, content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == status, response.text
    assert _error(response)["code"] == code


def test_oversized_body_is_413_and_gateway_keeps_serving(
    gateway: Gateway, client: openai.OpenAI
) -> None:
    huge = (
        b'{"model": "auto", "messages": [{"role": "user", "content": "' + b"a" * (9 << 20) + b'"}]}'
    )
    response = httpx.post(f"{gateway.base_url}/chat/completions", content=huge, timeout=30)
    assert response.status_code == 413
    assert _error(response)["code"] == "request_too_large"
    assert chat(client, SHORT).http_response.status_code == 200


def test_policy_edit_applies_without_restart(gateway: Gateway, client: openai.OpenAI) -> None:
    policy = yaml.safe_load(gateway.policy_file.read_text())
    original = gateway.policy_file.read_text()
    policy["spec"]["strategy"] = {"type": "rules", "default": "standard"}
    gateway.policy_file.write_text(yaml.safe_dump(policy))
    try:
        assert _model_within(client, "standard", seconds=10)
        assert chat(client, SHORT).headers["x-switchyard-reason"] == "default"
        # An invalid edit is reported and the last good config keeps serving.
        gateway.policy_file.write_text("spec: [not, a, policy")
        gateway.wait_for_output("keeping config")
        assert chat(client, SHORT).headers["x-switchyard-model"] == "standard"
    finally:
        gateway.policy_file.write_text(original)
    assert _model_within(client, "light", seconds=10)


def _model_within(client: openai.OpenAI, expected: str, seconds: float) -> bool:
    """Poll until short prompts route to ``expected`` (a policy edit has reached every worker)."""
    deadline = time.monotonic() + seconds
    in_a_row = 0
    while time.monotonic() < deadline and in_a_row < 6:  # 6 in a row: both workers updated
        matched = chat(client, SHORT).headers["x-switchyard-model"] == expected
        in_a_row = in_a_row + 1 if matched else 0
    return in_a_row == 6
