"""Request recording and POST /v1/feedback in the ext_proc: the record format, the bounded
writer, retention pruning, feedback validation, and the join into outcome records."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import compile_docs
from prometheus_client import REGISTRY
from test_processor import body_with_attributes, error_of

from switchyard.api.v1 import routing_pb2 as pb
from switchyard.extproc.config import build_config
from switchyard.extproc.errors import GatewayError
from switchyard.extproc.feedback import MAX_BODY_BYTES, parse_feedback
from switchyard.extproc.processor import Processor
from switchyard.extproc.recording import (
    Recorder,
    Retention,
    feedback_line,
    prune,
    request_line,
)
from switchyard.extproc.scoring import HeuristicScorer
from switchyard.extproc.state import RuntimeState
from switchyard.operator.compiler import compile_config
from switchyard.operator.policy import PolicyError, parse_policy
from switchyard.training.outcomes import join_recording, load

RID = "3f2b8c1e-7d4a-4e0b-9a51-0c6f2d9e8b17"


def _recording(policy_doc: dict[str, Any], record: str = "prompts") -> dict[str, Any]:
    policy_doc["spec"]["outcomes"] = {"record": record}
    return policy_doc


# --- the record format ---------------------------------------------------------------------
def test_request_line_format_keeps_the_clients_body_on_one_line() -> None:
    body = b'{\n  "model": "auto",\r\n  "messages": [{"role": "user", "content": "a\\nb"}]\n}'
    headers = {"x-team": "research", "authorization": "Bearer sk-secret", "x-other": "no"}
    line = request_line(
        (1.5, RID, "default/p", "auto", "light", "rule: r", headers, ("x-team",), body)
    )
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    doc = orjson.loads(line)
    assert list(doc) == ["id", "ts", "policy", "alias", "model", "reason", "headers", "body"]
    assert doc["id"] == RID and doc["ts"] == 1.5 and doc["policy"] == "default/p"
    assert (doc["alias"], doc["model"], doc["reason"]) == ("auto", "light", "rule: r")
    assert doc["headers"] == {"x-team": "research"}
    assert doc["body"] == orjson.loads(body)  # the same JSON value, newline in a string kept


def test_decisions_line_has_no_body_and_feedback_line_names_the_model_only_if_given() -> None:
    doc = orjson.loads(request_line((2.0, RID, "d/p", "auto", "m", "weighted", {}, (), None)))
    assert "body" not in doc and doc["headers"] == {}
    assert orjson.loads(feedback_line((3.0, RID, 0.5, None))) == {
        "id": RID,
        "ts": 3.0,
        "score": 0.5,
    }
    assert orjson.loads(feedback_line((3.0, RID, 1.0, "big")))["model"] == "big"


# --- the writer ----------------------------------------------------------------------------
def _dropped(kind: str) -> float:
    return REGISTRY.get_sample_value("switchyard_recording_dropped_total", {"kind": kind}) or 0.0


def _lines(directory: Path, prefix: str) -> list[dict[str, Any]]:
    return [
        orjson.loads(line)
        for path in sorted(directory.glob(f"{prefix}-*.jsonl"))
        for line in path.read_bytes().splitlines()
    ]


def test_a_full_queue_drops_and_counts_and_never_blocks(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path, replica="r0", max_queued=2)
    before = _dropped("requests")
    item = (time.time(), RID, "d/p", "auto", "m", "x", {}, (), None)
    assert [recorder.request(item) for _ in range(3)] == [True, True, False]
    recorder.flush()
    assert len(_lines(tmp_path, "requests")) == 2
    assert _dropped("requests") == before + 1
    assert recorder.request(item)  # room again once written
    recorder.flush()
    assert len(_lines(tmp_path, "requests")) == 3
    assert _dropped("requests") == before + 1  # not counted twice


def test_writer_thread_appends_per_replica_and_day(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path / "out", replica="pod-a-12", flush_s=0.01)
    recorder.start()
    now = time.time()
    recorder.request((now, RID, "d/p", "auto", "m", "x", {}, (), b'{"model": "auto"}'))
    recorder.feedback((now, RID, 0.25, None))
    recorder.stop()
    day = time.strftime("%Y-%m-%d", time.gmtime(now))
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [f"feedback-pod-a-12-{day}.jsonl", f"requests-pod-a-12-{day}.jsonl"]
    assert _lines(tmp_path / "out", "feedback")[0]["score"] == 0.25


def test_a_file_pruned_while_open_is_recreated(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path, replica="r0")
    item = (time.time(), RID, "d/p", "auto", "m", "x", {}, (), None)
    recorder.request(item)
    recorder.flush()
    [path] = tmp_path.glob("requests-*.jsonl")
    path.unlink()  # another worker's prune
    recorder.request(item)
    recorder.flush()
    assert len(path.read_bytes().splitlines()) == 1


# --- retention -----------------------------------------------------------------------------
def _file(directory: Path, name: str, size: int, age_s: float, now: float) -> Path:
    path = directory / name
    path.write_bytes(b"x" * size)
    os.utime(path, (now - age_s, now - age_s))
    return path


def test_prune_by_age_then_size_oldest_first(tmp_path: Path) -> None:
    now = time.time()
    old = _file(tmp_path, "requests-a-2026-01-01.jsonl", 10, 40 * 86400, now)
    mid = _file(tmp_path, "requests-a-2026-11-28.jsonl", 100, 2 * 86400, now)
    new = _file(tmp_path, "feedback-a-2026-11-29.jsonl", 100, 86400, now)
    current = _file(tmp_path, "requests-a-2026-11-30.jsonl", 100, 0, now)
    other = _file(tmp_path, "notes.jsonl", 10_000, 400 * 86400, now)  # not a record file
    deleted = prune(tmp_path, Retention(max_age_s=30 * 86400, max_bytes=250), now, [current])
    assert deleted == [old, mid]
    assert new.exists() and current.exists() and other.exists()
    # The file being written goes last, even when it is the oldest.
    assert prune(tmp_path, Retention(max_bytes=150), now + 10, [new]) == [current]
    assert prune(tmp_path, Retention(), now + 10**9) == []  # 0: unbounded


# --- feedback validation -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b'{"score": 1}', 400, "request_id"),
        (b'{"request_id": 7, "score": 1}', 400, "request_id"),
        (b'{"request_id": "", "score": 1}', 400, "request_id"),
        (b'{"request_id": "a b", "score": 1}', 400, "request_id"),
        (b'{"request_id": "' + b"a" * 129 + b'", "score": 1}', 400, "request_id"),
        (b'{"request_id": "x"}', 400, "score"),
        (b'{"request_id": "x", "score": 1.5}', 400, "score"),
        (b'{"request_id": "x", "score": -0.1}', 400, "score"),
        (b'{"request_id": "x", "score": true}', 400, "score"),
        (b'{"request_id": "x", "score": "1"}', 400, "score"),
        (b'{"request_id": "x", "score": 1, "model": ""}', 400, "model"),
        (b'{"request_id": "x", "score": 1, "model": 3}', 400, "model"),
        (b'{"request_id": "x", "score": 1, "comment": ["a"]}', 400, "comment"),
        (b'{"request_id": ', 400, None),
        (b"[1, 2]", 400, None),
        (b"\xff\xfe", 400, None),
        (b" ", 400, None),
        (b"{" + b" " * MAX_BODY_BYTES + b"}", 413, None),
    ],
)
def test_bad_feedback_names_the_field(body: bytes, status: int, param: str | None) -> None:
    with pytest.raises(GatewayError) as caught:
        parse_feedback(body)
    assert (caught.value.status, caught.value.param) == (status, param)


def test_good_feedback() -> None:
    given = parse_feedback(b'{"request_id": "abc-1", "score": 1, "comment": "great", "x": 1}')
    assert (given.request_id, given.score, given.model) == ("abc-1", 1.0, None)
    assert parse_feedback(b'{"request_id": "a", "score": 0, "model": "big"}').model == "big"


# --- the policy and the processor ----------------------------------------------------------
def test_outcomes_spec_compiles_to_recording(policy_doc: dict[str, Any]) -> None:
    policy_doc["spec"]["outcomes"] = {
        "record": "decisions",
        "retention": {"maxAge": "7d", "maxBytes": "512Mi"},
    }
    config = compile_config([parse_policy(policy_doc)])
    assert config.policies[0].recording == pb.Recording(
        record=pb.Recording.DECISIONS, max_age_s=7 * 86400, max_bytes=512 << 20
    )
    assert "x-request-id" in config.request_headers
    policy_doc["spec"]["outcomes"] = {"record": False}  # YAML's bare `off`
    off = compile_config([parse_policy(policy_doc)])
    assert not off.policies[0].HasField("recording")
    assert "x-request-id" not in off.request_headers
    policy_doc["spec"]["outcomes"] = {"record": "all", "retention": {"maxAge": "1w"}}
    with pytest.raises(PolicyError) as caught:
        parse_policy(policy_doc)
    assert "spec.outcomes.record" in str(caught.value)
    assert "spec.outcomes.retention.maxAge" in str(caught.value)


def test_strictest_retention_applies(policy_doc: dict[str, Any]) -> None:
    other = {**policy_doc, "metadata": {"name": "other"}}
    other["spec"] = {**policy_doc["spec"], "match": {"models": ["other"]}}
    policy_doc["spec"]["outcomes"] = {"record": "prompts", "retention": {"maxAge": "30d"}}
    other["spec"]["outcomes"] = {"record": "decisions", "retention": {"maxBytes": "0"}}
    config = compile_docs(policy_doc, other)
    assert config.retention == Retention(max_age_s=30 * 86400, max_bytes=1 << 30)
    assert set(config.recording) == {"default/default", "default/other"}
    assert "authorization" not in config.recorded_headers
    assert "x-request-id" not in config.recorded_headers


def _state(config: pb.RoutingConfig) -> RuntimeState:
    state = RuntimeState(scorer_loader=lambda _bundle: HeuristicScorer())
    compiled = build_config(config)
    state.swap((compiled, {b: HeuristicScorer() for b in compiled.router_bundles}))
    return state


async def _answer(processor: Processor, message: Any) -> Any:
    stream = processor.open()
    raw, _ = await processor.message(stream, message.SerializeToString())
    from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

    return ep.ProcessingResponse.FromString(raw)


async def test_routed_request_is_recorded_and_feedback_answered(
    policy_doc: dict[str, Any], tmp_path: Path
) -> None:
    state = _state(compile_config([parse_policy(_recording(policy_doc))]))
    recorder = Recorder(tmp_path, replica="r0")
    processor = Processor(state, recorder=recorder)
    body = b'{"model": "auto",\n "messages": [{"role": "user", "content": "hi"}]}'
    message = body_with_attributes(
        body, "/v1/chat/completions", x_request_id=RID, x_priority="low", authorization="Bearer k"
    )
    routed = await _answer(processor, message)
    assert routed.WhichOneof("response") == "request_body"
    feedback = body_with_attributes(
        orjson.dumps({"request_id": RID, "score": 0.75}), "/v1/feedback", x_request_id="other"
    )
    answer = await _answer(processor, feedback)
    reply = answer.immediate_response
    assert (reply.status.code, orjson.loads(reply.body)) == (200, {"status": "recorded"})
    bad = body_with_attributes(b'{"request_id": "x", "score": 2}', "/v1/feedback")
    assert error_of(await _answer(processor, bad))[1]["param"] == "score"
    recorder.flush()
    [record] = _lines(tmp_path, "requests")
    assert record["id"] == RID and record["policy"] == "default/default"
    assert (record["alias"], record["model"]) == ("auto", "light")
    assert record["reason"] == "rule: low-priority"
    assert record["headers"] == {"x-priority": "low"}  # never authorization or the id
    assert record["body"] == orjson.loads(body)
    [scored] = _lines(tmp_path, "feedback")
    assert (scored["id"], scored["score"]) == (RID, 0.75) and "model" not in scored


async def test_decisions_only_and_unrecorded_policies(
    policy_doc: dict[str, Any], tmp_path: Path
) -> None:
    recorder = Recorder(tmp_path, replica="r0")
    body = orjson.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi"}]})
    message = body_with_attributes(body, "/v1/chat/completions", x_request_id=RID)
    decisions = _state(compile_config([parse_policy(_recording(policy_doc, "decisions"))]))
    await _answer(Processor(decisions, recorder=recorder), message)
    plain = _state(compile_config([parse_policy(_recording(policy_doc, "none"))]))
    await _answer(Processor(plain, recorder=recorder), message)
    recorder.flush()
    [record] = _lines(tmp_path, "requests")
    assert "body" not in record
    # Without a recording policy there is no feedback endpoint.
    feedback = body_with_attributes(b'{"request_id": "a", "score": 1}', "/v1/feedback")
    status, error = error_of(await _answer(Processor(plain, recorder=recorder), feedback))
    assert (status, error["code"]) == (404, "unknown_url")


async def test_feedback_needs_a_client_key_when_keys_are_on(
    policy_doc: dict[str, Any], tmp_path: Path
) -> None:
    key = "sk-switchyard-test"
    entry = pb.ClientKey(name="k", sha256=hashlib.sha256(key.encode()).hexdigest())
    config = compile_config([parse_policy(_recording(policy_doc))], client_keys=[entry])
    processor = Processor(_state(config), recorder=Recorder(tmp_path, replica="r0"))
    body = b'{"request_id": "a", "score": 1}'
    missing = body_with_attributes(body, "/v1/feedback")
    assert error_of(await _answer(processor, missing))[0] == 401
    wrong = body_with_attributes(body, "/v1/feedback", authorization="Bearer nope")
    assert error_of(await _answer(processor, wrong))[0] == 401
    good = body_with_attributes(body, "/v1/feedback", authorization=f"Bearer {key}")
    assert (await _answer(processor, good)).immediate_response.status.code == 200


# --- joining -------------------------------------------------------------------------------
def _write(path: Path, docs: list[dict[str, Any]], tail: bytes = b"") -> None:
    path.write_bytes(b"".join(orjson.dumps(d) + b"\n" for d in docs) + tail)


def test_join_across_replicas_last_feedback_wins(tmp_path: Path) -> None:
    chat = {"model": "auto", "messages": [{"role": "user", "content": "hello"}]}
    _write(
        tmp_path / "requests-a-1-2026-11-30.jsonl",
        [
            {"id": "r1", "ts": 1.0, "model": "light", "body": chat},
            {"id": "r2", "ts": 1.0, "model": "light"},  # decisions only
        ],
        tail=b'{"id": "cut sho',  # a line a killed worker left
    )
    _write(
        tmp_path / "requests-b-7-2026-11-30.jsonl",
        [{"id": "r3", "ts": 1.0, "model": "big", "body": {"model": "x", "prompt": "p3"}}],
    )
    _write(
        tmp_path / "feedback-b-7-2026-11-30.jsonl",
        [
            {"id": "r1", "ts": 5.0, "score": 0.2},
            {"id": "r2", "ts": 5.0, "score": 1.0},
            {"id": "r3", "ts": 6.0, "score": 1.0, "model": "light"},
            {"id": "nope", "ts": 6.0, "score": 1.0},
            {"id": "r3", "ts": 7.0, "score": 2.0},  # out of range: not a score
        ],
    )
    _write(
        tmp_path / "feedback-a-1-2026-11-30.jsonl",
        [{"id": "r1", "ts": 9.0, "score": 0.9}, {"id": "r1", "ts": 2.0, "score": 0.0}],
    )
    joined = join_recording(tmp_path)
    records = sorted((orjson.loads(r) for r in joined.records), key=lambda r: r["id"])
    assert records == [
        {"id": "r1", "messages": chat["messages"], "model": "light", "score": 0.9},
        {"id": "r3", "prompt": "p3", "model": "light", "score": 1.0},
    ]
    assert (joined.no_body, joined.unmatched, joined.unreadable) == (1, 1, 2)
    assert (joined.requests, joined.feedback) == (3, 7)
    outs = load([tmp_path])
    assert outs.texts == ["hello", "p3"] and outs.models == ["light"]
    assert len(outs.files) == 4


def test_a_recording_directory_also_reads_outcome_files_put_there(tmp_path: Path) -> None:
    """A refit Job reads the outcomes volume as a directory: the gateway's records joined,
    plus outcome files a user dropped there (eval results)."""
    chat = {"model": "auto", "messages": [{"role": "user", "content": "hello"}]}
    _write(tmp_path / "requests-a-1-2026-11-30.jsonl", [{"id": "r1", "model": "a", "body": chat}])
    _write(tmp_path / "feedback-a-1-2026-11-30.jsonl", [{"id": "r1", "score": 1.0}])
    _write(tmp_path / "evals.jsonl", [{"id": "e1", "prompt": "p", "model": "b", "score": 0.5}])
    (tmp_path / "notes.txt").write_text("not read")
    outs = load([tmp_path])
    assert sorted(outs.texts) == ["hello", "p"] and sorted(outs.models) == ["a", "b"]
    assert sorted(Path(f).name for f in outs.files) == [
        "evals.jsonl",
        "feedback-a-1-2026-11-30.jsonl",
        "requests-a-1-2026-11-30.jsonl",
    ]


def test_missing_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        load([tmp_path / "nowhere"])


async def test_personal_data_is_never_recorded(policy_doc: dict[str, Any], tmp_path: Path) -> None:
    recorder = Recorder(tmp_path, replica="r0")
    content = "Mail the summary to maria.lopez@example.com please"
    body = orjson.dumps({"model": "auto", "messages": [{"role": "user", "content": content}]})
    message = body_with_attributes(body, "/v1/chat/completions", x_request_id="routed")
    routed = _state(compile_config([parse_policy(_recording(policy_doc))]))
    await _answer(Processor(routed, recorder=recorder), message)
    policy_doc["spec"]["personalData"] = {"action": "redact"}
    message = body_with_attributes(body, "/v1/chat/completions", x_request_id="redacted")
    redacting = _state(compile_config([parse_policy(policy_doc)]))
    await _answer(Processor(redacting, recorder=recorder), message)
    recorder.flush()
    by_id = {r["id"]: r for r in _lines(tmp_path, "requests")}
    assert "body" not in by_id["routed"]
    sent = by_id["redacted"]["body"]["messages"][0]["content"]
    assert sent == "Mail the summary to [REDACTED:email] please"
    assert b"maria" not in b"".join(p.read_bytes() for p in tmp_path.iterdir())
