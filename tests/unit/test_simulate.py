"""``switchyard simulate`` on a request log written by the real processor in-process: replaying
the policy in force reproduces every recorded decision; a candidate's changes are listed; bad
input is a clear error with exit status 2."""

from __future__ import annotations

import asyncio
import copy
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from switchyard import cli
from switchyard.extproc.processor import Processor
from switchyard.extproc.request import Endpoint
from switchyard.extproc.state import RuntimeState
from switchyard.local.documents import load_inputs
from switchyard.operator.compiler import compile_config
from switchyard.training import replay, simulate, traffic

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "policy.yaml"
OUTCOMES = ROOT / "examples" / "outcomes.jsonl"
HARD = (
    "Prove step by step that every odd-degree real polynomial has a real root, then implement a "
    "root finder in python and analyze its edge cases."
)


def _chat(text: str, **fields: Any) -> dict[str, Any]:
    return {"model": "auto", "messages": [{"role": "user", "content": text}], **fields}


def _requests() -> list[tuple[dict[str, str], dict[str, Any]]]:
    """(headers, body) pairs that exercise every kind of decision of the example policy."""
    prompts: list[str] = []
    for raw in OUTCOMES.read_bytes().splitlines():
        text = orjson.loads(raw)["prompt"]
        if text not in prompts:
            prompts.append(text)
    out: list[tuple[dict[str, str], dict[str, Any]]] = [({}, _chat(p)) for p in prompts[:40]]
    out += [
        ({}, _chat(HARD)),
        ({"x-priority": "low"}, _chat(HARD)),  # rule
        ({"x-session-id": "s-1"}, _chat(HARD)),
        (
            {"x-session-id": "s-1"},  # a later turn: routed on the first user message
            {
                "model": "auto",
                "messages": [
                    {"role": "user", "content": HARD},
                    {"role": "assistant", "content": "..."},
                    {"role": "user", "content": "thanks"},
                ],
            },
        ),
        ({}, _chat("my e-mail is jane.doe@example.com; " + HARD)),  # personal data: light only
        ({"x-switchyard-data-class": "internal"}, _chat("what is 2+2")),
        ({}, _chat("what is 2+2", max_tokens=40000)),  # too big for light: constrained
        ({}, _chat("call a tool", tools=[{"type": "function", "function": {"name": "f"}}])),
        (
            {},
            {
                "model": "auto",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "what is in this picture?"},
                            {"type": "image_url", "image_url": {"url": "http://x/a.png"}},
                        ],
                    }
                ],
            },
        ),
        ({}, {"model": "auto", "prompt": "Once upon a time"}),  # completions endpoint
        ({}, _chat("hello", model="light")),  # a concrete model
    ]
    return out


async def record_log(
    policy_files: list[str], requests: list[tuple[dict[str, str], dict[str, Any]]], path: Path
) -> list[dict[str, Any]]:
    """Route ``requests`` with the real processor and write what the gateway records."""
    proto = compile_config(load_inputs(policy_files).policies)
    state = RuntimeState()
    state.swap(state.prepare(proto))
    processor = Processor(state)
    routing_headers = set(proto.request_headers)
    records = []
    for i, (headers, body) in enumerate(requests):
        endpoint = Endpoint.CHAT if "messages" in body else Endpoint.COMPLETIONS
        response = await processor.route(endpoint, headers, orjson.dumps(body))
        if response.HasField("immediate_response"):
            continue  # answered by the gateway: not routed, not recorded
        meta = response.dynamic_metadata.fields["switchyard"].struct_value.fields
        records.append(
            {
                "id": f"req-{i}",
                "ts": time.time(),
                "policy": meta["policy"].string_value,
                "alias": body["model"],
                "model": meta["model"].string_value,
                "reason": meta["reason"].string_value,
                "headers": {k: v for k, v in headers.items() if k in routing_headers},
                "body": body,
            }
        )
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return records


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    logs = tmp_path / "log"
    logs.mkdir()
    records = asyncio.run(record_log([str(EXAMPLE)], _requests(), logs / "requests-0.jsonl"))
    # A policy that does not record prompts writes lines without a body.
    bare = {k: v for k, v in records[0].items() if k != "body"}
    null = {**records[1], "body": None}
    (logs / "requests-1.jsonl").write_bytes(orjson.dumps(bare) + b"\n" + orjson.dumps(null) + b"\n")
    return logs


def test_replaying_the_policy_in_force_reproduces_every_recorded_decision(
    log_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recorded = [orjson.loads(x) for x in (log_dir / "requests-0.jsonl").read_bytes().splitlines()]
    reasons = {r["reason"].split(":")[0].split(",")[0] for r in recorded}
    assert {"classifier", "rule", "direct"} <= reasons  # the log exercises the engine
    assert {r["model"] for r in recorded} == {"light", "standard", "capable"}
    assert any(r["reason"].endswith("constrained") for r in recorded)
    assert any("pii" in r["reason"] for r in recorded)

    lines = traffic.read_traffic([log_dir], None)
    assert lines.without_body == 2 and len(lines.lines) == len(recorded)
    sim = asyncio.run(simulate.simulate(replay.load_routing([str(EXAMPLE)]), lines))
    assert sim.changes == []
    assert sim.non_reproducible == 0
    assert sim.identical == len(recorded)  # same model and the same reason, line by line
    assert sim.candidate.counts == sim.current.counts

    assert cli.main(["simulate", "-f", str(EXAMPLE), "--log", str(log_dir)]) == 0
    out = capsys.readouterr().out
    assert f"traffic: {len(recorded)} requests from 2 file(s); 2 recorded without a body" in out
    assert f"decisions: {len(recorded)} of {len(recorded)} identical" in out
    assert "0 change model" in out


def test_a_candidate_lists_the_requests_that_change_model(
    log_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["strategy"]["tiers"] = [
        {"model": "light", "maxDifficulty": 0.5},
        {"model": "capable"},
    ]
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text(yaml.safe_dump(doc))
    recorded = {
        r["id"]: r
        for r in (orjson.loads(x) for x in (log_dir / "requests-0.jsonl").read_bytes().splitlines())
    }
    lines = traffic.read_traffic([log_dir], None)
    sim = asyncio.run(
        simulate.simulate(replay.load_routing([str(candidate)]), lines, output_tokens=100)
    )
    assert sim.changes
    for change in sim.changes:
        assert change.before == recorded[change.id]["model"]
        assert change.before_reason == recorded[change.id]["reason"]
        assert change.after != change.before
    assert "standard" not in sim.candidate.counts  # the candidate has no standard tier
    assert sim.candidate.cost < sim.current.cost

    argv = ["simulate", "-f", str(candidate), "--log", str(log_dir), "--show", "2"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    first = sim.changes[0]
    assert f"  {first.id}: {first.before} -> {first.after}  ({first.before_reason} | " in out
    assert f"and {len(sim.changes) - 2} more (--show 0 lists all)" in out


def test_weighted_draws_replay_with_a_session_and_are_reported_without_one(
    tmp_path: Path,
) -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    for model, weight in zip(doc["spec"]["models"], (3, 1, 1), strict=True):
        model["weight"] = weight
    doc["spec"]["strategy"] = {"type": "weighted"}
    policy = tmp_path / "weighted.yaml"
    policy.write_text(yaml.safe_dump(doc))
    requests = [({"x-session-id": f"s-{i}"}, _chat(f"question {i}")) for i in range(30)]
    requests += [({}, _chat(f"anonymous {i}")) for i in range(10)]
    logs = tmp_path / "requests-0.jsonl"
    asyncio.run(record_log([str(policy)], requests, logs))
    sim = asyncio.run(
        simulate.simulate(replay.load_routing([str(policy)]), traffic.read_traffic([logs], None))
    )
    assert sim.identical == 30  # the session's draw is a hash of its header: replayed exactly
    assert sim.non_reproducible == 10 and sim.changes == []
    assert len(sim.candidate.counts) >= 2
    assert sim.candidate.random == 10


def _log_with(tmp_path: Path, *lines: bytes) -> Path:
    path = tmp_path / "requests-9.jsonl"
    good = orjson.dumps(
        {"id": "a", "policy": "default/default", "model": "light", "body": _chat("hi")}
    )
    path.write_bytes(good + b"\n" + b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"{not json", "requests-9.jsonl:2: not valid JSON"),
        (b'{"id": "b", "model": "light", "body": [1]}', "requests-9.jsonl:2: field 'body' must"),
        (b'{"id": "b", "body": {"model": "auto"}}', "requests-9.jsonl:2: field 'model' must"),
        (
            b'{"id": "b", "model": "light", "headers": {"x": 1}, "body": {}}',
            "requests-9.jsonl:2: field 'headers' must be an object of strings",
        ),
        (b'{"id": true, "model": "light", "body": {}}', "requests-9.jsonl:2: field 'id'"),
        (b'{"id": "b", "text": "x"}', "requests-9.jsonl:2: needs a 'prompt' or a 'messages'"),
    ],
)
def test_a_malformed_line_names_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: bytes, message: str
) -> None:
    log = _log_with(tmp_path, line)
    assert cli.main(["simulate", "-f", str(EXAMPLE), "--log", str(log)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("switchyard simulate: error: ") and message in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--log", "nope/requests.jsonl"], "nope/requests.jsonl: no such file or directory"),
        (["--log", "."], ".: no requests-*.jsonl files in this directory"),
        (["--log", str(OUTCOMES)], "give the policy in force with --current FILE"),
        (["--log", str(OUTCOMES), "--current", "nope.yaml"], "nope.yaml: no such file"),
        (["--log", str(OUTCOMES), "--current", str(EXAMPLE), "--outcomes", "x.jsonl"], "x.jsonl"),
    ],
)
def test_bad_arguments_are_clear_errors(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert cli.main(["simulate", "-f", str(EXAMPLE), *args]) == 2
    assert message in capsys.readouterr().err


def test_an_invalid_candidate_policy_exits_2_without_a_traceback(tmp_path: Path) -> None:
    doc = copy.deepcopy(yaml.safe_load(EXAMPLE.read_text()))
    doc["spec"]["strategy"]["tiers"][0]["model"] = "nonexistent"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "switchyard.cli",
            "simulate",
            "-f",
            str(bad),
            "--log",
            str(OUTCOMES),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert "switchyard simulate: error:" in run.stderr and "nonexistent" in run.stderr
