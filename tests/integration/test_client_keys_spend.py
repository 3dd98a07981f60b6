"""The ClientKeys spend status on a real kube-apiserver: requests through a real Envoy and
ext_proc are charged in a real redis-server (with a password), and the operator, reading the
same Redis, shows each tenant budget's spend in ``status.spend[]`` and the tightest one in the
``BUDGET USD`` / ``SPENT USD`` columns of ``kubectl get clientkeys``. Unchanged figures are not
written again; Redis down keeps the figures, is logged once, and never stops the operator."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from gateway_harness import REPO
from kube import KubeControlPlane
from operator_harness import SHORT, Cluster
from prometheus_client.parser import text_string_to_metric_families

from switchyard.local.ports import free_port_block
from switchyard.local.redis import LocalRedis
from switchyard.local.runner import port_open, wait_until
from switchyard.operator.clientkeys import hash_key

CRD = REPO / "deploy" / "crds" / "clientkeys.yaml"
KEY = "sk-switchyard-spend-" + os.urandom(6).hex()
PASSWORD = "pw-" + os.urandom(8).hex()
INTERVAL_S = 0.5
OPERATOR_METRICS, EXTPROC_METRICS = free_port_block(), free_port_block()


def require_password(server: LocalRedis) -> None:
    with redis.Redis(host="127.0.0.1", port=server.port) as r:
        r.config_set("requirepass", PASSWORD)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    running = LocalRedis(tmp_path_factory.mktemp("spend") / "redis", port=free_port_block())
    running.start()
    require_password(running)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def cluster(routepolicy_crd: KubeControlPlane, server: LocalRedis) -> Iterator[Cluster]:
    routepolicy_crd.kubectl("apply", "-f", str(CRD))
    routepolicy_crd.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/clientkeys.switchyard.dev"
    )
    url = f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"
    with pytest.MonkeyPatch.context() as env:  # the operator and the ext_proc, as Helm sets it
        env.setenv("SWITCHYARD_REDIS_URL", url)
        running = Cluster(
            routepolicy_crd,
            prefix="spend",
            operator_args=["--spend-interval", str(INTERVAL_S),
                           "--metrics-listen", f"127.0.0.1:{OPERATOR_METRICS}"],
            extproc_args=["--metrics-port", str(EXTPROC_METRICS)],
        )  # fmt: skip
    yield running
    running.close()


def clients(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "switchyard.dev/v1alpha1",
        "kind": "ClientKeys",
        "metadata": {"name": "clients", "namespace": namespace},
        "spec": {
            "tenants": [
                {"name": "team", "limits": {"budgets": [{"usd": 5, "period": "month"},
                                                         {"usd": 2, "period": "day"}]}},
                {"name": "alice", "parent": "team",
                 "limits": {"budgets": [{"usd": 0.5, "period": "24h"}]}},
                {"name": "idle", "limits": {"budgets": [{"usd": 0.25, "period": "day"}]}},
            ],
            "keys": [{"name": "alice", "tenant": "alice", "sha256": hash_key(KEY)}],
        },
    }  # fmt: skip


def status(cluster: Cluster) -> dict[str, Any]:
    ns = cluster.namespace
    out = cluster.kube.kubectl("get", "clientkeys", "clients", "-n", ns, "-o", "json")
    found: dict[str, Any] = json.loads(out)
    return found


def spend(cluster: Cluster) -> dict[tuple[str, str], dict[str, Any]]:
    entries = status(cluster).get("status", {}).get("spend", [])
    return {(e["tenant"], e["period"]): e for e in entries}


def counted(server: LocalRedis, pattern: str) -> float:
    """What the ext_proc charged (read here the way any Redis client would)."""
    with redis.Redis(host="127.0.0.1", port=server.port, password=PASSWORD) as r:
        return sum(float(r.get(k) or 0) for k in r.keys(pattern))


def post(cluster: Cluster, key: str = KEY) -> int:
    url = f"http://127.0.0.1:{cluster.port}/v1/chat/completions"
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url, json=SHORT, headers=headers, timeout=10).status_code


def table_row(header: str, row: str) -> dict[str, str]:
    """A kubectl table row by column (names may hold one space; columns are 2+ apart)."""
    names = re.split(r"\s{2,}", header.strip())
    starts = [header.index(name) for name in names]
    ends = [*starts[1:], len(row)]
    return {n: row[a:b].strip() for n, a, b in zip(names, starts, ends, strict=True)}


def metric(port: int, name: str, **labels: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"{name} {labels} is not exported")


def spend_reads(result: str) -> float:
    """The operator's completed reads of the budget counters (each tick makes one)."""
    return metric(OPERATOR_METRICS, "switchyard_operator_spend_reads_total", result=result)


def operator_log(cluster: Cluster) -> str:
    return Path(cluster.log.name).read_text(errors="replace")


def test_spend_reaches_the_status_and_the_printer_columns(
    cluster: Cluster, server: LocalRedis
) -> None:
    cluster.apply(cluster.policy)
    wait_until(lambda: cluster.condition("assistant").get("status") == "True", 60, "policy Ready")
    wait_until(lambda: port_open("127.0.0.1", cluster.port), 30, "gateway listener")
    cluster.kube.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(clients(cluster.namespace)))
    # Before any request: every budget, nothing spent; the tightest is the smallest.
    wait_until(lambda: len(spend(cluster)) == 4, 30, "spend status")
    first = status(cluster)["status"]
    assert (first["budgetUsd"], first["spentUsd"]) == (0.25, 0)
    day = time.strftime("%Y-%m-%d", time.gmtime())
    table = spend(cluster)
    assert table[("team", "day")]["budgetUsd"] == 2
    assert table[("team", "day")]["resetsAt"] > day  # the next UTC midnight
    assert table[("team", "month")]["resetsAt"].endswith("-01T00:00:00Z")
    assert "resetsAt" not in table[("alice", "24h")]  # rolling: no reset time

    # The status can show before the ext_proc serves the keys: wait for them (and the limits
    # that come with them) before charging.
    wait_until(lambda: post(cluster, key="") == 401, 30, "keys served")
    assert post(cluster) == 200
    for _ in range(4):
        assert post(cluster) == 200
    ns = cluster.namespace

    def charged(tenant: str, period: str) -> float:
        return counted(server, f"sy:l:t:{ns}%2F{tenant}:usd:{period}:*")

    # Settlements are asynchronous (and retried when Redis was slow): the ext_proc counts the
    # finished requests whose charge Redis has not taken yet.
    unsent = "switchyard_limits_settlements_unsent"
    wait_until(lambda: metric(EXTPROC_METRICS, unsent) == 0, 20, "settlements taken by Redis")
    assert charged("alice", "24h") > 0

    def shown() -> bool:
        table = spend(cluster)
        return all(
            charged(t, p) > 0 and table[(t, p)]["spentUsd"] == pytest.approx(charged(t, p), 1e-5)
            for t, p in (("alice", "24h"), ("team", "day"), ("team", "month"))
        )

    wait_until(shown, 30, "spend in the status")
    assert spend(cluster)[("idle", "day")]["spentUsd"] == 0
    # The tightest budget now is alice's 24h one: the largest share spent.
    summary = status(cluster)["status"]
    assert summary["budgetUsd"] == 0.5
    assert summary["spentUsd"] == pytest.approx(charged("alice", "24h"), 1e-5)
    # `kubectl get clientkeys` prints them.
    header, row = cluster.kube.kubectl("get", "clientkeys", "-n", ns).splitlines()[:2]
    columns = table_row(header, row)
    assert columns["BUDGET USD"] == "0.5"
    assert float(columns["SPENT USD"]) == summary["spentUsd"] > 0

    # Unchanged figures are not written again.
    version = status(cluster)["metadata"]["resourceVersion"]
    reads = spend_reads("ok")
    wait_until(lambda: spend_reads("ok") >= reads + 4, 30, "more reads of the same figures")
    assert status(cluster)["metadata"]["resourceVersion"] == version
    assert PASSWORD not in json.dumps(status(cluster))


def test_redis_down_keeps_the_figures_and_the_operator(
    cluster: Cluster, server: LocalRedis
) -> None:
    before = spend(cluster)
    assert before, "runs after the test above"
    server.kill()
    down = "spend status: Redis redis://127.0.0.1:"
    wait_until(lambda: down in operator_log(cluster), 30, "the outage logged")
    failed = spend_reads("unavailable")
    wait_until(lambda: spend_reads("unavailable") >= failed + 4, 30, "more failed reads")
    assert operator_log(cluster).count(down) == 1
    assert spend(cluster) == before
    assert cluster.children[len(cluster.demo_ports)].poll() is None  # the operator runs
    server.start()  # its AOF (appendfsync always) keeps the counters
    require_password(server)
    wait_until(lambda: post(cluster) == 200, 30, "served again")
    alice = before[("alice", "24h")]["spentUsd"]
    wait_until(lambda: spend(cluster)[("alice", "24h")]["spentUsd"] > alice, 30, "new spend shown")
    assert "answers again" in operator_log(cluster)
    assert PASSWORD not in operator_log(cluster)
