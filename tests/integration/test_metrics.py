"""The ext_proc's Prometheus endpoint counts every decision and rejection of all its workers."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from gateway_harness import Gateway, start_gateway
from prometheus_client.parser import text_string_to_metric_families

from switchyard.local.ports import free_port_block
from switchyard.local.runner import port_open, wait_until

ROUTED = 12


@pytest.fixture(scope="module")
def metered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, int]]:
    port = free_port_block()
    gateway = start_gateway(tmp_path_factory.mktemp("metrics"), extprocWorkers=2, metricsPort=port)
    wait_until(lambda: port_open("127.0.0.1", port), 30, "metrics endpoint")
    yield gateway, port
    assert gateway.stop() == 0, "".join(gateway.output)


def _samples(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _total(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def test_decisions_and_rejections_of_every_worker_are_counted(
    metered: tuple[Gateway, int],
) -> None:
    gateway, port = metered
    before = _samples(port)
    body = {"model": "auto", "messages": [{"role": "user", "content": "Say hi."}]}
    with httpx.Client(base_url=gateway.base_url, timeout=10) as client:
        for _ in range(ROUTED):
            assert client.post("/chat/completions", json=body).status_code == 200
        assert client.post("/chat/completions", content=b"{not json").status_code == 400
    seen: dict[str, dict[tuple[str, frozenset[tuple[str, str]]], float]] = {}

    def decisions() -> float:
        seen["after"] = _samples(port)
        return _total(seen["after"], "switchyard_decisions_total") - _total(
            before, "switchyard_decisions_total"
        )

    # Workers add their counts to the series once a second (extproc/tally.py).
    wait_until(lambda: decisions() >= ROUTED, 10, "the decisions to be counted")
    assert decisions() == ROUTED
    after = seen["after"]
    light = ("switchyard_decisions_total", frozenset(
        {("policy", "default/default"), ("model", "light"), ("kind", "classifier")}
    ))  # fmt: skip
    assert after[light] - before.get(light, 0) == ROUTED
    rejected = (
        "switchyard_rejections_total",
        frozenset({("status", "400"), ("code", "invalid_json")}),
    )
    assert after[rejected] - before.get(rejected, 0) == 1
