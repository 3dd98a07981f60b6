"""The operator's metrics as a real Prometheus scrapes them, while the real ControlPlane programs a
real Envoy over ADS and a real ext_proc over the config stream: the ACK and NACK counts equal
what Envoy's own stats say it accepted and rejected, and the generation follows the applies."""

from __future__ import annotations

import asyncio
import copy
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import StartPrometheus
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from gateway_harness import DEMO_NAMES, REPO, policy_for_ports
from google.protobuf import json_format

from switchyard.api.v1 import routing_pb2 as pb
from switchyard.local.ports import free_port_block
from switchyard.local.runner import envoy_binary, wait_until
from switchyard.operator.compiler import compile_config
from switchyard.operator.control_plane import ControlPlane
from switchyard.operator.envoy_config import GatewaySettings
from switchyard.operator.metrics import ROUTING_CONFIG, MetricsServer
from switchyard.operator.policy import parse_policy
from switchyard.operator.xds_server import CLUSTER, LISTENER, ROUTE, ads_bootstrap, pack

T = TypeVar("T")
NODE = "metrics-envoy"
XDS_TYPES = (CLUSTER, LISTENER, ROUTE)
REJECTED = r"cluster_manager\.cds\.update_rejected"


class Plane:
    """A ControlPlane and its metrics endpoint on an event-loop thread, with Envoy and one
    ext_proc connected (no upstreams: nothing here sends requests)."""

    def __init__(self, directory: Path) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        first = free_port_block(3)
        self.policy = policy_for_ports({n: first + i for i, n in enumerate(DEMO_NAMES)})
        self.admin, extproc = free_port_block(), free_port_block()
        settings = GatewaySettings(
            listen_port=free_port_block(), extproc_endpoints=[("127.0.0.1", extproc)]
        )
        self.plane = ControlPlane(settings, ack_timeout_s=10)
        self.server = MetricsServer(self.plane.metrics, "127.0.0.1:0")
        self.metrics_port = self.run(self.server.start())
        xds = self.run(self.plane.start())
        self.run(self.plane.prime(self.compile(self.policy)))
        bootstrap = directory / "bootstrap.json"
        bootstrap.write_text(json.dumps(ads_bootstrap(NODE, self.admin, "127.0.0.1", xds)))
        self.children = [
            subprocess.Popen(
                [sys.executable, "-m", "switchyard.cli", "extproc",
                 "--config", f"grpc://127.0.0.1:{xds}", "--listen", f"127.0.0.1:{extproc}"],
                cwd=REPO,
            ),
            subprocess.Popen(
                [envoy_binary(), "-c", str(bootstrap), "--use-dynamic-base-id",
                 "--concurrency", "1", "-l", "error"]
            ),
        ]  # fmt: skip
        wait_until(self.delivered, 60, "Envoy and the ext_proc on the primed config")

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=60)

    @staticmethod
    def compile(*policies: dict[str, Any]) -> pb.RoutingConfig:
        return compile_config([parse_policy(p) for p in policies])

    def delivered(self) -> bool:
        """Envoy ACKed the current snapshot and the ext_proc the current config."""
        ads, stream = self.plane.ads, self.plane.stream
        snapshot = ads.snapshot
        envoy = all(ads.acked_everywhere(t, snapshot[t].version) for t in XDS_TYPES)
        return envoy and stream.acked_everywhere(stream.config.version)

    def envoy_stat(self, pattern: str) -> int:
        """The sum of Envoy's counters whose whole name matches ``pattern``."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/stats?format=json") as r:
            stats = json.loads(r.read())["stats"]
        return sum(int(s["value"]) for s in stats if re.fullmatch(pattern, s.get("name", "")))

    def close(self) -> None:
        for child in self.children:
            child.terminate()
        for child in self.children:
            child.wait(timeout=20)
        self.run(self.server.stop())
        self.run(self.plane.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[Plane]:
    running = Plane(tmp_path)
    yield running
    running.close()


def _broken_cluster() -> Cluster:
    """A STATIC cluster whose endpoint is not an IP address: Envoy NACKs it."""
    address = {"socket_address": {"address": "not-an-ip", "port_value": 1}}
    return json_format.ParseDict(
        {
            "name": "broken",
            "type": "STATIC",
            "load_assignment": {
                "cluster_name": "broken",
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
            },
        },
        Cluster(),
    )


def test_prometheus_sees_the_acks_nacks_and_generation_envoy_and_the_extproc_produced(
    plane: Plane, prometheus: StartPrometheus
) -> None:
    prom = prometheus({"operator": [f"127.0.0.1:{plane.metrics_port}"]})
    edited = copy.deepcopy(plane.policy)
    edited["spec"]["strategy"] = {"type": "rules", "default": "capable"}
    # Four configs for the ext_proc (prime, edit, none, back), each ACKed by everyone.
    for policies in ([edited], [], [plane.policy]):
        result = plane.run(plane.plane.apply(plane.compile(*policies)))
        assert result.envoy_acked and result.extproc_acked and not result.rejected
    # A snapshot Envoy rejects, then the good one again (its clusters are pushed once more).
    good = plane.plane.ads.snapshot
    plane.run(plane.plane.ads.publish({**good, CLUSTER: pack([_broken_cluster()])}))
    wait_until(lambda: plane.envoy_stat(REJECTED) == 1, 10, "NACK")
    plane.run(plane.plane.ads.publish(good))
    wait_until(plane.delivered, 10, "the good snapshot again")

    after = time.time()
    prom.wait_scraped("operator", after)

    def value(selector: str) -> float | None:
        return prom.value(selector)

    def responses(type_url: str, result: str, client: str = NODE) -> float | None:
        return value(
            f'switchyard_operator_xds_responses_total{{client="{client}",'
            f'type_url="{type_url}",result="{result}"}}'
        )

    accepted = {
        CLUSTER: plane.envoy_stat(r"cluster_manager\.cds\.update_success"),
        LISTENER: plane.envoy_stat(r"listener_manager\.lds\.update_success"),
        ROUTE: plane.envoy_stat(r"http\..*\.rds\..*\.update_success"),
    }
    assert accepted[CLUSTER] >= 4 and accepted[ROUTE] >= 3  # each apply changed both
    for type_url, count in accepted.items():
        assert responses(type_url, "ack") == count, type_url
    assert responses(CLUSTER, "nack") == 1
    assert responses(LISTENER, "nack") is None
    extproc = f'switchyard_operator_xds_responses_total{{type_url="{ROUTING_CONFIG}"}}'
    (replica,) = prom.query(extproc)
    assert replica.labels["result"] == "ack" and replica.value == 4

    assert value("switchyard_operator_config_generation") == 4
    version = plane.plane.stream.config.version
    assert value(f'switchyard_operator_config_info{{version="{version}"}}') == 1
    assert value('switchyard_operator_config_applies_total{result="acked"}') == 3
    assert value('sum(switchyard_operator_config_applies_total{result!="acked"})') == 0
    assert value("switchyard_operator_config_apply_seconds_count") == 3
    assert value('switchyard_operator_connected_clients{kind="envoy"}') == 1
    assert value('switchyard_operator_connected_clients{kind="extproc"}') == 1
    assert value("sum(switchyard_operator_clients_behind)") == 0
    # Stuck delivery shows: a snapshot nobody can ACK leaves Envoy behind.
    plane.run(plane.plane.ads.publish({**good, CLUSTER: pack([_broken_cluster()])}))
    wait_until(lambda: plane.envoy_stat(REJECTED) == 2, 10, "NACK")
    prom.wait_scraped("operator", time.time())
    assert value('switchyard_operator_clients_behind{kind="envoy"}') == 1
    assert responses(CLUSTER, "nack") == 2
    with pytest.raises(RuntimeError, match="bad_data"):
        prom.query("switchyard_operator_config_generation{")
