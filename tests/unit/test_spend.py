"""The operator's spend status (operator/spend.py) against a real redis-server: requests go
through the ext_proc's Processor (real admissions and settlements in RedisStore), then the
follower reads what they were charged. The summary is the tightest budget; a status is written
only when its figures change; Redis down keeps them, logged once without the password."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import redis
import yaml
from conftest import EXAMPLE
from test_limits import answer, keys_doc, meta, send

from switchyard.extproc.config import build_config
from switchyard.extproc.limits_store import redacted_url
from switchyard.extproc.processor import Processor
from switchyard.extproc.scoring import HeuristicScorer
from switchyard.extproc.state import RuntimeState
from switchyard.local.ports import free_port_block
from switchyard.local.redis import LocalRedis
from switchyard.operator.compiler import compile_config
from switchyard.operator.keyring import KeysVerdict, judge, served_store, served_tenant_limits
from switchyard.operator.metrics import OperatorMetrics
from switchyard.operator.policy import parse_policy
from switchyard.operator.spend import SpendFollower, TenantSpend, spend_status

COST = 0.0000085
"""One request answered with 10 prompt and 100 completion tokens on light."""


def verdict_for(url: str, budgets: list[dict[str, Any]]) -> KeysVerdict:
    doc = keys_doc({"budgets": budgets}, store={"redisUrl": url})
    doc["metadata"] = {"name": "clients", "namespace": f"ns-{free_port_block()}"}
    found = judge(doc, {}, [])
    assert found.ready, found.message
    return found


def processor_for(verdict: KeysVerdict) -> Processor:
    """An ext_proc worker serving the keys as the operator publishes them."""
    config = build_config(
        compile_config(
            [parse_policy(yaml.safe_load(EXAMPLE.read_text()))],
            client_keys=verdict.served,
            tenant_limits=served_tenant_limits([verdict]),
            limit_store=served_store([verdict]),
        )
    )
    state = RuntimeState(scorer_loader=lambda _bundle: HeuristicScorer())
    state.swap((config, {b: HeuristicScorer() for b in config.router_bundles}))
    return Processor(state)


async def charge(processor: Processor) -> None:
    response, stream = await send(processor, max_tokens=1000)
    assert meta(response)["model"].string_value == "light"
    answer(stream, 10, 100, "light")
    await processor.limiter.drain()


class Recorder:
    """The status patches the follower makes (the Kubernetes side is tested in
    tests/integration/test_client_keys_spend.py)."""

    def __init__(self) -> None:
        self.patches: list[tuple[str, str, dict[str, Any]]] = []

    async def __call__(self, namespace: str, name: str, status: dict[str, Any]) -> bool:
        self.patches.append((namespace, name, status))
        return True


async def test_spend_is_read_and_written_only_when_it_changes(
    redis_server: LocalRedis,
) -> None:
    server = redis_server
    budgets = [{"usd": 1, "period": "month"}, {"usd": 0.001, "period": "24h"}]
    verdict = verdict_for(server.url, budgets)
    processor = processor_for(verdict)
    for _ in range(2):
        await charge(processor)
    recorder = Recorder()
    follower = SpendFollower(lambda: {verdict.resource: verdict}, recorder, timeout_s=1.0)
    await follower.tick()
    (namespace, name, status) = recorder.patches[0]
    assert f"{namespace}/{name}" == verdict.resource
    month, rolling = status["spend"]
    assert (month["tenant"], month["period"], month["budgetUsd"]) == ("team", "month", 1)
    assert month["spentUsd"] == pytest.approx(2 * COST) == rolling["spentUsd"]
    assert month["resetsAt"].endswith("-01T00:00:00Z") and "resetsAt" not in rolling
    # The tightest: the 24h budget, the larger share spent.
    assert (status["budgetUsd"], status["spentUsd"]) == (0.001, rolling["spentUsd"])
    await follower.tick()
    assert len(recorder.patches) == 1  # unchanged: not written again
    await charge(processor)
    await follower.tick()
    assert len(recorder.patches) == 2
    assert recorder.patches[1][2]["spentUsd"] == pytest.approx(3 * COST)
    # Its budgets removed (or the resource left out): the figures are cleared.
    bare_doc = keys_doc(store={"redisUrl": server.url})
    bare = judge({**bare_doc, "metadata": {"name": name, "namespace": namespace}}, {}, [])
    follower._verdicts = lambda: {verdict.resource: bare}
    await follower.tick()
    assert recorder.patches[2][2] == {"spend": None, "budgetUsd": None, "spentUsd": None}
    await processor.limiter.store.close()


async def test_redis_down_keeps_the_status_and_logs_once(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port_block()  # nothing listens
    url = f"redis://:hunter2-secret@127.0.0.1:{port}/0"
    verdict = verdict_for(url, [{"usd": 1, "period": "day"}])
    recorder = Recorder()
    reads = OperatorMetrics().spend_reads
    follower = SpendFollower(
        lambda: {verdict.resource: verdict}, recorder, timeout_s=0.5, reads=reads
    )
    with caplog.at_level(logging.INFO, logger="switchyard.operator.spend"):
        for _ in range(3):
            await follower.tick()
        assert recorder.patches == []
        assert reads.labels("unavailable")._value.get() == 3
        assert reads.labels("ok")._value.get() == 0
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert f"redis://127.0.0.1:{port}/0 unavailable" in warnings[0].getMessage()
        server = LocalRedis(tmp_path / "r", port=port)
        server.start()
        try:
            with redis.Redis(host="127.0.0.1", port=port) as plain:
                plain.config_set("requirepass", "hunter2-secret")
            await follower.tick()
        finally:
            server.stop()
        assert "answers again" in caplog.text
        assert reads.labels("ok")._value.get() == 1
    (_, _, status) = recorder.patches[0]
    assert status["spend"][0]["spentUsd"] == 0
    assert "hunter2" not in caplog.text and "hunter2" not in repr(recorder.patches)
    assert redacted_url(url) == f"redis://127.0.0.1:{port}/0"


def test_the_summary_is_the_tightest_budget() -> None:
    spends = [
        TenantSpend("team", "month", 100, 50),
        TenantSpend("alice", "day", 10, 9),
        TenantSpend("bob", "day", 5, 0),
    ]
    status = spend_status(spends)
    assert (status["budgetUsd"], status["spentUsd"]) == (10, 9)
    fresh = spend_status([TenantSpend("a", "day", 10, 0), TenantSpend("b", "day", 5, 0)])
    assert (fresh["budgetUsd"], fresh["spentUsd"]) == (5, 0)  # nothing spent: the smallest
    assert spend_status([]) == {"spend": None, "budgetUsd": None, "spentUsd": None}
