"""The execution provider chosen on the command line reaches every router bundle a worker loads,
and CUDA asked for where it cannot run falls back to CPU with one warning per bundle."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from switchyard import cli
from switchyard.api.v1 import routing_pb2 as pb
from switchyard.extproc import server
from switchyard.extproc.router import runtime
from switchyard.extproc.router.bundle import load_bundle
from switchyard.extproc.router.runtime import CPU, CUDA, OnnxRouter, auto_providers
from switchyard.extproc.state import RuntimeState

EXTPROC = ["extproc", "--config", "routing.pb", "--listen", "127.0.0.1:9002"]


def _two_bundles() -> pb.RoutingConfig:
    """A config with two classifier policies on two different bundles (same files)."""
    config = pb.RoutingConfig(version="v1")
    for name, bundle in (("a", "builtin:default"), ("b", str(load_bundle("builtin:default").root))):
        policy = config.policies.add(name=name, namespace="ns", aliases=[name])
        policy.models.add(name="m", backend_key="k", upstream_model="m")
        policy.strategy.type = pb.Strategy.CLASSIFIER
        policy.strategy.router_bundle = bundle
        policy.strategy.tiers.add(model="m", max_difficulty=1.0)
    return config


def _run_workers_args(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> tuple[Any, ...]:
    seen: list[tuple[Any, ...]] = []
    monkeypatch.setattr(server, "run_workers", lambda *args: seen.append(args) or 0)
    assert cli.main(argv) == 0
    (args,) = seen
    return args


def test_the_flag_reaches_run_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cli.EXECUTION_PROVIDER_ENV, raising=False)
    assert _run_workers_args(monkeypatch, EXTPROC)[-1] == "cpu"
    assert _run_workers_args(monkeypatch, [*EXTPROC, "--execution-provider", "cuda"])[-1] == "cuda"


def test_the_environment_sets_the_default_and_the_flag_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(cli.EXECUTION_PROVIDER_ENV, "auto")
    assert _run_workers_args(monkeypatch, EXTPROC)[-1] == "auto"
    assert _run_workers_args(monkeypatch, [*EXTPROC, "--execution-provider", "cpu"])[-1] == "cpu"


def test_a_bad_environment_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(cli.EXECUTION_PROVIDER_ENV, "tpu")
    monkeypatch.setattr(server, "run_workers", lambda *args: 0)
    with pytest.raises(SystemExit) as exited:
        cli.main(EXTPROC)
    assert exited.value.code == 2
    assert "SWITCHYARD_EXECUTION_PROVIDER='tpu'" in capsys.readouterr().err


def test_the_worker_state_loads_every_bundle_on_its_provider(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loaded: list[tuple[str, list[str] | None]] = []

    def fake_load_scorer(bundle: str, providers: list[str] | None = None) -> Any:
        loaded.append((bundle, providers))
        return object()

    monkeypatch.setattr(runtime, "load_scorer", fake_load_scorer)
    config = _two_bundles()
    RuntimeState(execution_provider="cuda").prepare(config)
    assert sorted(loaded) == sorted((p.strategy.router_bundle, ["cuda"]) for p in config.policies)


def test_cuda_on_a_cpu_only_machine_runs_each_bundle_on_cpu_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert CUDA not in runtime.ort.get_available_providers()  # this machine's build
    state = RuntimeState(execution_provider="cuda")
    with caplog.at_level(logging.WARNING):
        _config, scorers = state.prepare(_two_bundles())
    assert len(scorers) == 2
    for scorer in scorers.values():
        assert isinstance(scorer, OnnxRouter)
        assert scorer._session.get_providers() == [CPU]
        assert scorer.inline  # on CPU a static bundle scores on the event loop
        scorer.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, [r.getMessage() for r in warnings]
    assert all(CUDA in r.getMessage() for r in warnings)


@pytest.mark.filterwarnings("ignore:Specified provider")  # onnxruntime's own
def test_a_provider_that_fails_to_start_falls_back_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A GPU build on a machine without a GPU: the build lists CUDA, the session drops it."""
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: [CUDA, CPU])
    with caplog.at_level(logging.WARNING, logger=runtime.__name__):
        router = OnnxRouter(load_bundle("builtin:default"), providers=["cuda"])
    assert router.providers == [CPU]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "failed to start" in warnings[0].getMessage()
    router.close()


def test_auto_puts_encoder_bundles_on_cuda_and_static_ones_on_cpu(
    caplog: pytest.LogCaptureFixture,
) -> None:
    static = load_bundle("builtin:default")
    assert auto_providers(static, [CUDA, CPU]) == [CPU]
    encoder = type("EncoderBundle", (), {"encoder": object()})()
    assert auto_providers(encoder, [CUDA, CPU]) == [CUDA, CPU]
    assert auto_providers(encoder, [CPU]) == [CPU]
    with caplog.at_level(logging.WARNING, logger=runtime.__name__):
        router = OnnxRouter(static, providers=["auto"])
    assert router.providers == [CPU]
    assert not caplog.records  # CPU is an expected outcome of auto
    router.close()
