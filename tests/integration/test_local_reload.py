"""Policy edits under load in local mode: real Envoy, real ext_proc workers, no failed request.

Renaming or removing a model changes its backend key, so its route and cluster go away. The
control plane must keep them until no ext_proc worker can choose them any more (make before
break), or requests in flight during the edit fail.
"""

from __future__ import annotations

import copy
import os
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from gateway_harness import Gateway, policy_for_ports, start_gateway

from switchyard.local.runner import wait_until

CLIENTS = 4
SHORT = {"model": "auto", "messages": [{"role": "user", "content": "Say hello to my friend."}]}


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    running = start_gateway(tmp_path)
    yield running
    assert running.stop() == 0, "".join(running.output)


def _write(path: Path, policy: dict[str, Any]) -> None:
    """Replace the file in one step, as an editor saving it does."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(yaml.safe_dump(policy))
    os.replace(temporary, path)


def _renamed(policy: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    """``policy`` with model ``old`` called ``new`` everywhere it is named."""
    text = yaml.safe_dump(policy)
    for key in ("name: ", "model: ", "route: ", "- "):
        text = text.replace(f"{key}{old}\n", f"{key}{new}\n")
    renamed: dict[str, Any] = yaml.safe_load(text)
    return renamed


def _without_standard(policy: dict[str, Any]) -> dict[str, Any]:
    edited = copy.deepcopy(policy)
    spec = edited["spec"]
    spec["models"] = [m for m in spec["models"] if m["name"] != "standard"]
    for model in spec["models"]:
        model["fallbacks"] = [f for f in model.get("fallbacks", []) if f != "standard"]
    spec["strategy"]["tiers"] = [t for t in spec["strategy"]["tiers"] if t["model"] != "standard"]
    return edited


class Load:
    """Client threads posting chat completions until stopped; counts every status."""

    def __init__(self, url: str, clients: int) -> None:
        self.url = url
        self.statuses: Counter[int] = Counter()
        self.models: Counter[str] = Counter()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run) for _ in range(clients)]

    @property
    def sent(self) -> int:
        return sum(self.statuses.values())

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                response = client.post(self.url, json=SHORT)
                with self._lock:
                    self.statuses[response.status_code] += 1
                    self.models[response.headers.get("x-switchyard-model", "")] += 1
                    if response.status_code != 200 and len(self.failures) < 5:
                        self.failures.append(f"{response.status_code} {response.text[:200]}")

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def more(self, count: int) -> None:
        """Wait until ``count`` more responses have arrived."""
        target = self.sent + count
        wait_until(lambda: self.sent >= target, 60, f"{count} more responses")


def test_renaming_and_removing_models_under_load_fails_no_request(gateway: Gateway) -> None:
    original = policy_for_ports(gateway.demo_ports)
    renamed = _renamed(original, "light", "lite")
    edits = [renamed, _without_standard(renamed), original, renamed, original]
    with Load(f"{gateway.base_url}/chat/completions", CLIENTS) as load:
        load.more(100)
        for edit in edits:
            _write(gateway.policy_file, edit)
            gateway.wait_for_output(" applied", timeout=30)
            load.more(100)
    print(f"\n{load.sent} requests, statuses {dict(load.statuses)}, models {dict(load.models)}")
    assert set(load.statuses) == {200}, (dict(load.statuses), load.failures)
    assert load.models["lite"] and load.models["light"]  # the edits did reach the traffic
    response = httpx.post(f"{gateway.base_url}/chat/completions", json=SHORT, timeout=30)
    assert response.headers["x-switchyard-model"] == "light"


def test_an_edit_the_extproc_cannot_load_is_reported_and_the_last_good_config_serves(
    gateway: Gateway, tmp_path: Path
) -> None:
    original = policy_for_ports(gateway.demo_ports)
    broken = copy.deepcopy(original)
    broken["spec"]["strategy"]["router"]["bundle"] = str(tmp_path / "no-such-bundle")
    _write(gateway.policy_file, broken)
    line = gateway.wait_for_output("keeping config", timeout=30)
    assert "default/default" in line and "no-such-bundle" in line
    url = f"{gateway.base_url}/chat/completions"
    response = httpx.post(url, json=SHORT, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["x-switchyard-model"] == "light"
    _write(gateway.policy_file, _renamed(original, "light", "lite"))  # a good edit still applies
    gateway.wait_for_output(" applied", timeout=30)
    assert httpx.post(url, json=SHORT, timeout=30).headers["x-switchyard-model"] == "lite"
