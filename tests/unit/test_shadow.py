"""Shadow evaluation in the ext_proc (extproc/shadow.py): sampling, the judge's prompt and its
parsing, the marker only this gateway can set, the bounded queue, and one evaluation against
an HTTP server standing in for the gateway's listener (the real one: tests/integration)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from conftest import compile_docs
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from prometheus_client import REGISTRY
from test_processor import body_with_attributes, error_of
from test_recording import _lines, _state

from switchyard.api.v1 import routing_pb2 as pb
from switchyard.demo.upstream import _judgement, judge_score
from switchyard.extproc.config import ShadowRule, shadow_threshold
from switchyard.extproc.processor import Processor
from switchyard.extproc.recording import Recorder, feedback_line
from switchyard.extproc.shadow import (
    GATEWAY_URL_ENV,
    QUEUE_PER_SLOT,
    SECRET_ENV,
    Capture,
    Marker,
    ShadowEvaluator,
    answer_text,
    from_environment,
    judge_messages,
    parse_judgement,
    primary_is_a,
    question_text,
    sampled,
    secret_from_environment,
)
from switchyard.local.runner import _connect_host
from switchyard.operator.compiler import compile_config
from switchyard.operator.envoy_config import GatewaySettings, build_route_config
from switchyard.operator.policy import PolicyError, parse_policy
from switchyard.training.outcomes import join_recording

SECRET = "s3cret-for-tests"
SHADOW = {"fraction": 1.0, "model": "capable", "judge": "standard", "maxConcurrent": 1}


def _shadowing(policy_doc: dict[str, Any], **shadow: Any) -> dict[str, Any]:
    policy_doc["spec"]["outcomes"] = {"record": "prompts", "shadow": {**SHADOW, **shadow}}
    return policy_doc


def _rule(policy_doc: dict[str, Any], **shadow: Any) -> ShadowRule:
    return compile_docs(_shadowing(policy_doc, **shadow)).shadow["default/default"]


def _count(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- the policy ----------------------------------------------------------------------------
def test_shadow_spec_compiles_and_is_checked(policy_doc: dict[str, Any]) -> None:
    config = compile_config([parse_policy(_shadowing(policy_doc, fraction=0.25))])
    assert config.policies[0].recording.shadow == pb.Recording.Shadow(
        fraction=0.25, model="capable", judge="standard", max_concurrent=1
    )
    assert "x-switchyard-shadow" in config.request_headers
    routes = build_route_config(config, GatewaySettings()).virtual_hosts[0].routes
    backend = [r for r in routes if r.HasField("route") and r.name.endswith("capable")]
    assert backend and all("x-switchyard-shadow" in r.request_headers_to_remove for r in backend)
    compiled = compile_docs(policy_doc).shadow["default/default"]
    assert (compiled.model.name, compiled.judge.name, compiled.fraction) == (
        "capable",
        "standard",
        0.25,
    )
    assert "x-switchyard-shadow" not in compile_docs(policy_doc).recorded_headers

    for outcomes, field in [
        ({"record": "decisions", "shadow": SHADOW}, "outcomes.shadow: needs outcomes.record"),
        ({"record": "prompts", "shadow": {**SHADOW, "model": "nope"}}, "outcomes.shadow.model"),
        ({"record": "prompts", "shadow": {**SHADOW, "judge": "nope"}}, "outcomes.shadow.judge"),
        ({"record": "prompts", "shadow": {**SHADOW, "fraction": 1.5}}, "outcomes.shadow.fraction"),
        ({"record": "prompts", "shadow": {**SHADOW, "maxConcurrent": 0}}, "maxConcurrent"),
    ]:
        policy_doc["spec"]["outcomes"] = outcomes
        with pytest.raises(PolicyError) as caught:
            parse_policy(policy_doc)
        assert field in str(caught.value)


def test_off_by_default_and_at_fraction_zero(policy_doc: dict[str, Any]) -> None:
    policy_doc["spec"]["outcomes"] = {"record": "prompts"}
    off = compile_config([parse_policy(policy_doc)])
    assert not off.policies[0].recording.HasField("shadow")
    assert "x-switchyard-shadow" not in off.request_headers
    assert not compile_docs(policy_doc).shadow
    assert not compile_docs(_shadowing(policy_doc, fraction=0.0)).shadow


# --- sampling, answers and the judge -------------------------------------------------------
def test_sampling_is_deterministic_and_near_the_fraction(policy_doc: dict[str, Any]) -> None:
    ids = [f"id-{i}" for i in range(20_000)]
    half = _rule(policy_doc, fraction=0.5)
    picked = [i for i in ids if sampled(half, i)]
    assert 0.48 < len(picked) / len(ids) < 0.52
    assert picked == [i for i in ids if sampled(half, i)]
    assert all(sampled(_rule(policy_doc, fraction=1.0), i) for i in ids)
    tenth = _rule(policy_doc, fraction=0.1)
    assert set(i for i in ids if sampled(tenth, i)) < set(picked)  # nested by construction
    assert shadow_threshold(1.0) == 1 << 64 and shadow_threshold(0.0) == 0
    order = [primary_is_a(i) for i in ids]
    assert 0.48 < sum(order) / len(order) < 0.52


def test_answer_text_of_json_and_streams() -> None:
    chat = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}}]}
    assert answer_text(orjson.dumps(chat), streaming=False) == "hello"
    assert answer_text(b'{"choices": [{"text": "done"}]}', streaming=False) == "done"
    stream = b"".join(
        b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": p}}]}) + b"\n\n"
        for p in ("Hel", "lo", " there")
    )
    stream += b'data: {"choices": [], "usage": {"prompt_tokens": 1}}\n\ndata: [DONE]\n\n'
    assert answer_text(stream, streaming=True) == "Hello there"
    for bad in (b"not json", b"[]", b'{"choices": []}', b'{"error": {}}'):
        assert answer_text(bad, streaming=False) is None
    assert answer_text(b"data: [DONE]\n\n", streaming=True) is None


@pytest.mark.parametrize(
    ("reply", "scores"),
    [
        ('{"a": 0.25, "b": 1}', (0.25, 1.0)),
        ('```json\n{"A": 0, "B": 0.5}\n```', (0.0, 0.5)),
        ('Here you go: {"b": 0.9, "a": 0.1} -- hope it helps', (0.1, 0.9)),
        ('{"a": "high", "b": 1} then {"a": 0.3, "b": 0.4}', (0.3, 0.4)),
        ('{"a": 1.5, "b": 0.5}', None),
        ('{"a": true, "b": 0.5}', None),
        ('{"a": 0.5}', None),
        ('{"scores": {"a": 0.5, "b": 0.5}}', (0.5, 0.5)),  # the flat object inside
        ("I cannot judge this.", None),
        ("", None),
        ('{"a": NaN, "b": 0.5}', None),
    ],
)
def test_judge_replies_parse_or_are_refused(reply: str, scores: tuple[float, float] | None) -> None:
    assert parse_judgement(reply) == scores


def test_demo_judge_reads_the_judge_prompt() -> None:
    body = {"messages": [{"role": "user", "content": "What is 2+2?"}]}
    question = question_text(body)
    assert question == "user: What is 2+2?"
    messages = judge_messages(question, "4", "five")
    reply = _judgement(messages[-1]["content"])
    assert reply is not None
    assert parse_judgement(reply) == (judge_score("4"), judge_score("five"))
    assert _judgement("What is 2+2?") is None


def test_marker_needs_the_secret_and_a_role() -> None:
    marker = Marker(SECRET)
    assert marker.role({"x-switchyard-shadow": marker.header("answer")}) == "answer"
    assert marker.role({"x-switchyard-shadow": marker.header("judge")}) == "judge"
    for value in ("answer", "answer wrong", f"admin {SECRET}", f"answer {SECRET}x", ""):
        assert marker.role({"x-switchyard-shadow": value}) is None
    assert marker.role({}) is None


def test_shadow_feedback_line_keeps_its_source() -> None:
    line = feedback_line((1.0, "r", 0.5, "capable", {"source": "shadow", "judge": "standard"}))
    assert orjson.loads(line) == {
        "id": "r",
        "ts": 1.0,
        "score": 0.5,
        "model": "capable",
        "source": "shadow",
        "judge": "standard",
    }


# --- a stand-in for the gateway's listener -------------------------------------------------
class FakeGateway:
    """Answers like the gateway would: the shadow model's answer, or the judge's verdict."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.hold = asyncio.Event()
        self.hold.set()
        self.verdict = '{"a": 0.2, "b": 0.9}'

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(({k.lower(): v for k, v in request.headers.items()}, body))
        await self.hold.wait()
        judge = body["model"].endswith("/standard")
        content = self.verdict if judge else "shadow says 4"
        served = "standard" if judge else "capable"
        return web.json_response(
            {
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": 1000, "completion_tokens": 100},
            },
            headers={"x-switchyard-model": served},
        )


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[FakeGateway, str]]:
    fake = FakeGateway()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.chat)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, sock)
    await site.start()
    yield fake, f"http://127.0.0.1:{sock.getsockname()[1]}"
    await runner.cleanup()


def _response_chunk(body: bytes) -> bytes:
    message = ep.ProcessingRequest(response_body=ep.HttpBody(body=body, end_of_stream=True))
    message.attributes["envoy.filters.http.ext_proc"].update({"response.code": 200})
    return message.SerializeToString()


async def _until(check: Any, seconds: float = 10) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not check():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


CLIENT_ANSWER = orjson.dumps(
    {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "client gets 4"}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 3},
    }
)


async def _route(
    processor: Processor, rid: str, **headers: str
) -> tuple[Any, ep.ProcessingResponse]:
    body = orjson.dumps({"model": "auto", "messages": [{"role": "user", "content": "2+2?"}]})
    stream = processor.open()
    message = body_with_attributes(
        body, "/v1/chat/completions", x_request_id=rid, x_priority="low", **headers
    )
    raw, _ = await processor.message(stream, message.SerializeToString())
    return stream, ep.ProcessingResponse.FromString(raw)


async def test_sampled_request_is_judged_into_two_feedback_lines(
    policy_doc: dict[str, Any], tmp_path: Path, gateway: tuple[FakeGateway, str]
) -> None:
    fake, url = gateway
    state = _state(compile_config([parse_policy(_shadowing(policy_doc))]))
    recorder = Recorder(tmp_path, replica="r0")
    shadow = ShadowEvaluator(recorder, url, SECRET)
    processor = Processor(state, recorder=recorder, shadow=shadow)
    rid = "req-1"
    stream, routed = await _route(processor, rid)
    assert routed.WhichOneof("response") == "request_body" and stream.shadow is not None
    assert not fake.requests  # nothing is sent before the client's answer has ended
    cost_before = _count(
        "switchyard_shadow_cost_usd_total", policy="default/default", model="capable", role="answer"
    )
    raw, done = await processor.message(stream, _response_chunk(CLIENT_ANSWER))
    assert done and ep.ProcessingResponse.FromString(raw).response_body  # passed on as it was
    await _until(lambda: not shadow._tasks)
    recorder.flush()
    [(answer_headers, answer), (judge_headers, judge)] = fake.requests
    assert answer_headers["x-switchyard-shadow"] == f"answer {SECRET}"
    assert judge_headers["x-switchyard-shadow"] == f"judge {SECRET}"
    assert answer["model"] == "default/default/capable" and "stream" not in answer
    assert answer["messages"] == [{"role": "user", "content": "2+2?"}]
    assert judge["model"] == "default/default/standard"
    prompt = judge["messages"][-1]["content"]
    first, second = ("client gets 4", "shadow says 4")
    if not primary_is_a(rid):
        first, second = second, first
    assert f"<answer_a>\n{first}\n</answer_a>" in prompt
    assert f"<answer_b>\n{second}\n</answer_b>" in prompt
    routed_score, shadow_score = (0.2, 0.9) if primary_is_a(rid) else (0.9, 0.2)
    lines = {line["model"]: line for line in _lines(tmp_path, "feedback")}
    assert set(lines) == {"light", "capable"}
    assert lines["light"]["score"] == routed_score and lines["capable"]["score"] == shadow_score
    assert all(v["id"] == rid and v["source"] == "shadow" for v in lines.values())
    assert lines["light"]["judge"] == "standard"
    # Priced at the policy's rates for capable: 1000 in at $5/M, 100 out at $25/M.
    cost = _count(
        "switchyard_shadow_cost_usd_total", policy="default/default", model="capable", role="answer"
    )
    assert cost - cost_before == pytest.approx(0.0075)
    # Both models' outcomes for the request join to its recorded prompt.
    joined = {orjson.loads(r)["model"]: orjson.loads(r) for r in join_recording(tmp_path).records}
    assert set(joined) == {"light", "capable"}
    assert joined["capable"]["messages"] == [{"role": "user", "content": "2+2?"}]

    # An answer without text (only tool calls) is not judged.
    skipped = _count(
        "switchyard_shadow_evaluations_total", policy="default/default", outcome="skipped"
    )
    tools = {"choices": [{"index": 0, "message": {"role": "assistant", "content": None}}]}
    stream, _ = await _route(processor, "req-tools")
    await processor.message(stream, _response_chunk(orjson.dumps(tools)))
    await _until(lambda: not shadow._tasks)
    assert len(fake.requests) == 2  # nothing sent for it
    after = _count(
        "switchyard_shadow_evaluations_total", policy="default/default", outcome="skipped"
    )
    assert after == skipped + 1

    # A judge that does not answer as asked is counted, and nothing is written.
    fake.verdict = "Both are fine."
    before = _count(
        "switchyard_shadow_evaluations_total", policy="default/default", outcome="judge_unparsable"
    )
    stream, _ = await _route(processor, "req-2")
    await processor.message(stream, _response_chunk(CLIENT_ANSWER))
    await _until(lambda: not shadow._tasks)
    recorder.flush()
    assert len(_lines(tmp_path, "feedback")) == 2
    after = _count(
        "switchyard_shadow_evaluations_total", policy="default/default", outcome="judge_unparsable"
    )
    assert after == before + 1
    await shadow.close()


async def test_the_queue_is_bounded_and_drops_are_counted(
    policy_doc: dict[str, Any], tmp_path: Path, gateway: tuple[FakeGateway, str]
) -> None:
    fake, url = gateway
    fake.hold.clear()  # the first evaluation waits on its shadow answer
    rule = _rule(policy_doc)  # maxConcurrent 1
    shadow = ShadowEvaluator(Recorder(tmp_path, replica="r0"), url, SECRET)
    served = rule.models["light"]
    body = orjson.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi"}]})

    def capture(i: int) -> Capture:
        c = Capture(rule, f"q-{i}", body, streaming=False, data_class="")
        c.feed(CLIENT_ANSWER)
        return c

    dropped = _count(
        "switchyard_shadow_evaluations_total", policy="default/default", outcome="dropped"
    )
    capacity = 1 + QUEUE_PER_SLOT
    for i in range(capacity + 3):
        shadow.submit(capture(i), served, 200)
    assert shadow.pending("default/default") == (1, QUEUE_PER_SLOT)
    now = _count("switchyard_shadow_evaluations_total", policy="default/default", outcome="dropped")
    assert now == dropped + 3
    await _until(lambda: len(fake.requests) == 1)
    await asyncio.sleep(0.05)
    assert len(fake.requests) == 1  # one at a time: maxConcurrent
    # An error answer or one too large to keep is skipped, not queued.
    shadow.submit(capture(99), served, 503)
    assert shadow.pending("default/default") == (1, QUEUE_PER_SLOT)
    fake.hold.set()
    await _until(lambda: shadow.pending("default/default") == (0, 0))
    assert len(fake.requests) == 2 * capacity  # a shadow answer and a judge call each
    await shadow.close()


async def test_only_this_gateways_marker_skips_keys_recording_and_shadowing(
    policy_doc: dict[str, Any], tmp_path: Path, gateway: tuple[FakeGateway, str]
) -> None:
    _, url = gateway
    key = "sk-switchyard-test"
    entry = pb.ClientKey(name="k", sha256=hashlib.sha256(key.encode()).hexdigest())
    config = compile_config([parse_policy(_shadowing(policy_doc))], client_keys=[entry])
    recorder = Recorder(tmp_path, replica="r0")
    shadow = ShadowEvaluator(recorder, url, SECRET)
    processor = Processor(_state(config), recorder=recorder, shadow=shadow)

    # The gateway's own request: no key needed, not recorded, not shadowed, marked in the reason.
    marker = shadow.marker.header("answer")
    stream, own = await _route(processor, "own", x_switchyard_shadow=marker)
    meta = own.dynamic_metadata.fields["switchyard"].struct_value.fields
    assert meta["reason"].string_value == "shadow answer, rule: low-priority"
    assert stream.shadow is None

    # A forged marker: the key is still required ...
    for forged in ("answer", "answer guess", f"judge {SECRET[:-1]}"):
        _, refused = await _route(processor, "forged", x_switchyard_shadow=forged)
        assert error_of(refused)[0] == 401
    # ... and with a key the request is recorded like any other, just never shadowed.
    stream, forged_ok = await _route(
        processor, "forged", x_switchyard_shadow="answer guess", authorization=f"Bearer {key}"
    )
    meta = forged_ok.dynamic_metadata.fields["switchyard"].struct_value.fields
    assert meta["reason"].string_value == "rule: low-priority"
    assert stream.shadow is None
    stream, _ = await _route(processor, "plain", authorization=f"Bearer {key}")
    assert stream.shadow is not None
    recorder.flush()
    assert sorted(r["id"] for r in _lines(tmp_path, "requests")) == ["forged", "plain"]
    await shadow.close()


def test_evaluator_needs_a_recorder_and_the_gateway_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Set (to empty) through monkeypatch, so the secret the code makes is removed afterwards.
    monkeypatch.setenv(SECRET_ENV, "")
    monkeypatch.setenv(GATEWAY_URL_ENV, "")
    recorder = Recorder(tmp_path, replica="r0")
    assert from_environment(recorder) is None
    monkeypatch.setenv(GATEWAY_URL_ENV, "http://127.0.0.1:8080")
    assert from_environment(None) is None
    evaluator = from_environment(recorder)
    assert evaluator is not None and evaluator.gateway_url == "http://127.0.0.1:8080"
    # The secret is made once and inherited (the environment) by every worker.
    secret = os.environ[SECRET_ENV]
    assert len(secret) >= 32 and secret_from_environment() == secret
    assert evaluator.marker.role({"x-switchyard-shadow": f"judge {secret}"}) == "judge"


@pytest.mark.parametrize(
    ("listen", "host"),
    [("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "127.0.0.1"), ("::", "[::1]"), ("::1", "[::1]")],
)
def test_local_mode_reaches_its_own_listener(listen: str, host: str) -> None:
    assert _connect_host(listen) == host
