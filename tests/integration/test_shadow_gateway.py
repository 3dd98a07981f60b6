"""Shadow evaluation through the real gateway (Envoy, two ext_proc workers, demo upstreams,
client keys on) with the official ``openai`` client: every request of a shadowing policy is
also answered by the shadow model and both answers are scored by the judge model (the demo
upstream's deterministic judge rule) into feedback that `switchyard outcomes export` joins;
the client sees exactly what it would without shadowing; a policy without shadow gets nothing
extra; and a client cannot forge the gateway's shadow marker to skip keys or recording."""

from __future__ import annotations

import copy
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
import yaml
from gateway_harness import REPO, Gateway, policy_for_ports, start_gateway
from prometheus_client.parser import text_string_to_metric_families
from test_feedback_gateway import outcomes_dir, records

from switchyard.demo.upstream import judge_score
from switchyard.local.ports import free_port_block
from switchyard.operator.clientkeys import hash_key

KEY = "sk-switchyard-shadow-test-4b1d"
LOW = {"x-priority": "low"}  # the example policy's rule: routed to light


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("shadow")
    demo = free_port_block(3)
    ports = {"demo-light": demo, "demo-standard": demo + 1, "demo-capable": demo + 2}
    shadowing = policy_for_ports(ports)
    plain = copy.deepcopy(shadowing)
    shadowing["spec"]["outcomes"] = {
        "record": "prompts",
        "shadow": {"fraction": 1.0, "model": "capable", "judge": "standard", "maxConcurrent": 2},
    }
    plain["metadata"]["name"] = "plain"
    plain["spec"]["match"]["models"] = ["plain"]
    plain["spec"]["outcomes"] = {"record": "prompts"}
    keys = {
        "apiVersion": "switchyard.dev/v1alpha1",
        "kind": "ClientKeys",
        "metadata": {"name": "clients"},
        "spec": {
            "tenants": [{"name": "team"}],
            "keys": [{"name": "k", "tenant": "team", "sha256": hash_key(KEY)}],
        },
    }
    (directory / "keys.yaml").write_text(yaml.safe_dump(keys))
    (directory / "plain.yaml").write_text(yaml.safe_dump(plain))
    running = start_gateway(
        directory,
        shadowing,
        demoUpstreams=[{"name": n, "port": p} for n, p in ports.items()],
        metricsPort=free_port_block(),
    )
    running.demo_ports = ports
    yield running
    assert running.stop() == 0, "".join(running.output)


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0)


def metrics(gateway: Gateway) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    port = yaml.safe_load((gateway.directory / "gateway.yaml").read_text())["spec"]["metricsPort"]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(gateway: Gateway, name: str, **labels: str) -> float:
    found = metrics(gateway)
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def feedback_by_id(gateway: Gateway) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for line in records(gateway, "feedback"):
        out.setdefault(line["id"], {})[line["model"]] = line
    return out


def wait_for(check: Any, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def demo_answer(gateway: Gateway, name: str, messages: list[dict[str, str]]) -> str:
    """What a demo upstream answers to ``messages``, asked directly (not via the gateway)."""
    reply = httpx.post(
        f"http://127.0.0.1:{gateway.demo_ports[name]}/v1/chat/completions",
        json={"model": name, "messages": messages},
        timeout=10,
    )
    return str(reply.json()["choices"][0]["message"]["content"])


def ask(
    client: openai.OpenAI, model: str, text: str, stream: bool, **headers: str
) -> tuple[str, str]:
    """(request id, answer text) of one request, as the client sees it."""
    messages = [{"role": "user", "content": text}]
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=messages, stream=stream, extra_headers={**LOW, **headers}
    )
    assert raw.http_response.status_code == 200
    assert raw.headers["x-switchyard-model"] == "light"
    assert raw.headers["x-switchyard-reason"] == "rule: low-priority"
    if stream:
        content = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    else:
        content = raw.parse().choices[0].message.content or ""
    return raw.headers["x-request-id"], content


def test_shadow_answers_are_judged_into_feedback_for_both_models(
    gateway: Gateway, client: openai.OpenAI
) -> None:
    # First requests of a policy that does not shadow: they must get nothing extra.
    plain = [ask(client, "plain", f"Plain question number {i}?", i % 2 == 1)[0] for i in range(4)]
    asked: dict[str, tuple[str, str]] = {}
    for i in range(6):
        text = f"What is the capital of country number {i}?"
        rid, content = ask(client, "auto", text, stream=i % 2 == 1)
        # Exactly the demo model's answer: nothing of the shadow reaches the client.
        assert content == demo_answer(gateway, "demo-light", [{"role": "user", "content": text}])
        asked[rid] = (text, content)

    wait_for(
        lambda: all(len(feedback_by_id(gateway).get(r, {})) == 2 for r in asked),
        "two shadow feedback lines per request",
    )
    # The shadow secret never reaches a provider (the last request the shadow model got).
    last = httpx.get(
        f"http://127.0.0.1:{gateway.demo_ports['demo-capable']}/_demo/last_request", timeout=10
    ).json()
    assert "x-switchyard-shadow" not in last["headers"]
    assert last["body"]["model"] == "demo-capable-frontier"
    scored = feedback_by_id(gateway)
    for rid, (text, content) in asked.items():
        shadow_answer = demo_answer(gateway, "demo-capable", [{"role": "user", "content": text}])
        lines = scored[rid]
        assert set(lines) == {"light", "capable"}
        # The demo judge's rule: a hash of each answer's text, whichever position it had.
        assert lines["light"]["score"] == judge_score(content)
        assert lines["capable"]["score"] == judge_score(shadow_answer)
        assert all(v["source"] == "shadow" and v["judge"] == "standard" for v in lines.values())

    # Only the clients' requests were recorded: never the gateway's own shadow and judge calls.
    wait_for(lambda: len(records(gateway, "requests")) >= len(plain) + len(asked), "records")
    recorded = records(gateway, "requests")
    assert sorted(r["id"] for r in recorded) == sorted([*plain, *asked])

    # The policy without shadow got nothing extra: no shadow feedback, no shadow calls, and
    # one response per request it was sent.
    assert not set(plain) & set(scored)
    policy = "default/plain"
    wait_for(
        lambda: (
            sum(
                v
                for (name, labels), v in metrics(gateway).items()
                if name == "switchyard_responses_total" and ("policy", policy) in labels
            )
            == len(plain)
        ),
        "the plain policy's responses in the metrics",
    )
    found = metrics(gateway)
    assert not [
        k for k in found if k[0].startswith("switchyard_shadow") and ("policy", policy) in k[1]
    ]

    # What shadowing cost, and that its requests are identifiable.
    shadowing = "default/default"
    assert metric(
        gateway, "switchyard_shadow_evaluations_total", policy=shadowing, outcome="scored"
    ) == len(asked)
    for model, role in (("capable", "answer"), ("standard", "judge")):
        calls = metric(
            gateway,
            "switchyard_shadow_calls_total",
            policy=shadowing,
            model=model,
            role=role,
            outcome="ok",
        )
        assert calls == len(asked)
        cost = metric(
            gateway, "switchyard_shadow_cost_usd_total", policy=shadowing, model=model, role=role
        )
        assert cost > 0
    for model, kind in (("capable", "shadow answer"), ("standard", "shadow judge")):
        wait_for(
            lambda model=model, kind=kind: (
                metric(
                    gateway, "switchyard_decisions_total", policy=shadowing, model=model, kind=kind
                )
                == len(asked)
            ),
            f"{kind} decisions in the metrics",
        )

    # `switchyard outcomes export` yields an outcome for both models of every shadowed request.
    export = subprocess.run(
        [sys.executable, "-m", "switchyard.cli", "outcomes", "export", str(outcomes_dir(gateway))],
        capture_output=True,
        check=True,
        cwd=REPO,
        timeout=120,
    )
    exported = [orjson.loads(line) for line in export.stdout.splitlines()]
    by_request: dict[str, set[str]] = {}
    for record in exported:
        by_request.setdefault(record["id"], set()).add(record["model"])
    assert by_request == {rid: {"light", "capable"} for rid in asked}


def test_a_forged_marker_skips_neither_keys_nor_recording(
    gateway: Gateway, client: openai.OpenAI
) -> None:
    forged = {"x-switchyard-shadow": "answer not-the-secret"}
    body = {"model": "auto", "messages": [{"role": "user", "content": "let me in"}]}
    for value in ("answer not-the-secret", "judge x", "answer"):
        reply = httpx.post(
            f"{gateway.base_url}/chat/completions",
            json=body,
            headers={"x-switchyard-shadow": value, **LOW},
            timeout=10,
        )
        assert reply.status_code == 401, reply.text
        assert reply.json()["error"]["code"] == "invalid_api_key"
    # With a key, a forged marker changes nothing but that the request is not shadowed.
    rid, _ = ask(client, "auto", "A question with a forged marker?", False, **forged)
    # Envoy removed the forged header before the provider saw it.
    last = httpx.get(
        f"http://127.0.0.1:{gateway.demo_ports['demo-light']}/_demo/last_request", timeout=10
    ).json()
    assert last["body"]["messages"][0]["content"] == "A question with a forged marker?"
    assert "x-switchyard-shadow" not in last["headers"]
    later = [ask(client, "auto", f"A later question {i}?", False)[0] for i in range(4)]
    wait_for(
        lambda: all(len(feedback_by_id(gateway).get(r, {})) == 2 for r in later),
        "the later requests' shadow feedback",
    )
    assert rid not in feedback_by_id(gateway)
    # Each worker's recorder writes on its own time: the later requests may have gone to
    # another worker, so the record of this one can come after their feedback.
    wait_for(
        lambda: rid in {r["id"] for r in records(gateway, "requests")},
        "the forged-marker request's record",
    )
