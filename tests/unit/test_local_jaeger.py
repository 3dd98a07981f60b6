"""`switchyard up --jaeger` without starting anything: where the binary comes from, what the
gateway's tracing points at, and the settings that make spans reach a person quickly."""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import pytest
import yaml

from switchyard.local import jaeger as local_jaeger
from switchyard.local.documents import load_inputs
from switchyard.local.runner import LocalGateway, _extproc_environment
from switchyard.operator.policy import PolicyError

REPO = Path(__file__).resolve().parents[2]


def _executable(path: Path) -> Path:
    path.write_text("#!/bin/sh\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(local_jaeger.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(local_jaeger.BINARY_ENV, raising=False)
    return tmp_path / "cache" / "bin"


def test_a_named_binary_wins_and_must_be_executable(
    tmp_path: Path, empty_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(local_jaeger.BINARY_ENV, str(tmp_path / "missing"))
    with pytest.raises(local_jaeger.JaegerUnavailable, match="not an executable"):
        local_jaeger.jaeger_binary(print)
    named = _executable(tmp_path / "my-jaeger")
    monkeypatch.setenv(local_jaeger.BINARY_ENV, str(named))
    assert local_jaeger.jaeger_binary(print) == str(named)


def test_the_cached_build_is_used_only_at_the_pinned_version(empty_cache: Path) -> None:
    empty_cache.mkdir(parents=True)
    binary = _executable(empty_cache / "jaeger")
    (empty_cache / ".jaeger.version").write_text("v1.0.0\n")
    assert local_jaeger.cached_binary() is None
    (empty_cache / ".jaeger.version").write_text(f"{local_jaeger.JAEGER_VERSION}\n")
    assert local_jaeger.jaeger_binary(print) == str(binary)


def test_without_go_the_error_says_what_to_do(
    tmp_path: Path, empty_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GO", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no go here
    monkeypatch.setattr(local_jaeger, "GO_FALLBACKS", ())
    said: list[str] = []
    with pytest.raises(local_jaeger.JaegerUnavailable, match="needs Go") as raised:
        local_jaeger.jaeger_binary(said.append)
    assert local_jaeger.BINARY_ENV in str(raised.value)
    assert said == []  # nothing claimed to be building
    monkeypatch.setenv("GO", str(tmp_path / "no-such-go"))
    with pytest.raises(local_jaeger.JaegerUnavailable, match="needs Go"):
        local_jaeger.jaeger_binary(said.append)


def _gateway(
    tmp_path: Path, tracing: dict[str, object], jaeger: bool = False, **spec: object
) -> LocalGateway:
    files = tmp_path / "docs"
    files.mkdir(parents=True)
    (files / "policy.yaml").write_text((REPO / "examples" / "policy.yaml").read_text())
    doc = {
        "apiVersion": "switchyard.dev/v1alpha1",
        "kind": "LocalGateway",
        "spec": {"tracing": tracing, **spec},
    }
    (files / "gateway.yaml").write_text(yaml.safe_dump(doc))
    return LocalGateway([str(files)], load_inputs([str(files)]), tmp_path / "state", None, jaeger)


def test_jaeger_takes_the_gateways_traces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://elsewhere:4317")
    gateway = _gateway(tmp_path, {"jaegerPort": 0}, jaeger=True)
    assert gateway.jaeger is not None
    assert gateway.settings.otlp_endpoint == gateway.jaeger.otlp_endpoint
    assert gateway.jaeger.otlp_endpoint == f"127.0.0.1:{gateway.jaeger.ports.otlp}"
    assert gateway.settings.trace_sampling == 1.0
    ports = gateway.jaeger.ports
    assert len({ports.otlp, ports.query, ports.query_grpc}) == 3
    assert gateway.jaeger.state_file == tmp_path.resolve() / "state" / "jaeger.json"


def test_the_document_can_ask_for_jaeger_with_its_own_sampling(tmp_path: Path) -> None:
    gateway = _gateway(tmp_path, {"jaeger": True, "jaegerPort": 0, "samplingRatio": 0.25})
    assert gateway.jaeger is not None
    assert gateway.settings.trace_sampling == 0.25


def test_jaeger_and_a_collector_are_one_too_many(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="leave otlpEndpoint empty"):
        _gateway(tmp_path / "a", {"otlpEndpoint": "otel:4317"}, jaeger=True)
    with pytest.raises(PolicyError, match="leave otlpEndpoint empty"):
        _gateway(tmp_path / "b", {"otlpEndpoint": "otel:4317", "jaeger": True})


def test_a_taken_query_port_is_reported(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PolicyError, match=f"127.0.0.1:{port} is in use"):
            _gateway(tmp_path, {"jaegerPort": port}, jaeger=True)


def test_spans_leave_within_a_second_for_a_local_jaeger(tmp_path: Path) -> None:
    gateway = _gateway(tmp_path, {"jaegerPort": 0}, jaeger=True)
    env = _extproc_environment(gateway.traces, prompt_export=True)
    assert env is not None and env["OTEL_BSP_SCHEDULE_DELAY"] == "1000"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://{gateway.jaeger.otlp_endpoint}"  # type: ignore[union-attr]
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "3600000"
    try:  # a person's own setting stays
        env = _extproc_environment(gateway.traces, prompt_export=True)
        assert env is not None and env["OTEL_BSP_SCHEDULE_DELAY"] == "3600000"
    finally:
        del os.environ["OTEL_BSP_SCHEDULE_DELAY"]
    path = gateway.control.write_bootstrap(tmp_path / "boot", 9901, trace_flush_ms=1000)
    (layer,) = json.loads(path.read_text())["layered_runtime"]["layers"]
    assert layer["static_layer"] == {"tracing.opentelemetry.flush_interval_ms": 1000}
    plain = gateway.control.write_bootstrap(tmp_path / "plain", 9901)
    assert "layered_runtime" not in json.loads(plain.read_text())


def test_traces_finds_the_running_jaeger_from_the_state_dir(tmp_path: Path) -> None:
    assert local_jaeger.running_url(tmp_path) is None
    jaeger = local_jaeger.LocalJaeger(
        tmp_path / "j", local_jaeger.JaegerPorts(1, 2, 3), tmp_path / local_jaeger.STATE_FILE
    )
    (tmp_path / local_jaeger.STATE_FILE).write_text(json.dumps({"url": jaeger.url}))
    assert local_jaeger.running_url(tmp_path) == "http://127.0.0.1:2"
    jaeger.stop()  # never started: only the record goes
    assert local_jaeger.running_url(tmp_path) is None
