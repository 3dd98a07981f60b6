"""Shared builders for unit tests."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from switchyard.extproc.config import CompiledConfig, build_config
from switchyard.local.ports import free_port_block
from switchyard.local.redis import LocalRedis
from switchyard.operator.compiler import compile_config
from switchyard.operator.policy import RoutePolicy, parse_policy

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "policy.yaml"


@pytest.fixture
def policy_doc() -> dict[str, Any]:
    """The example RoutePolicy as a mutable dict."""
    return copy.deepcopy(yaml.safe_load(EXAMPLE.read_text()))


def compile_docs(*docs: dict[str, Any], fail_open: str = "") -> CompiledConfig:
    policies: list[RoutePolicy] = [parse_policy(d) for d in docs]
    return build_config(compile_config(policies, fail_open))


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    """A real redis-server for the module's tests (no password)."""
    server = LocalRedis(tmp_path_factory.mktemp("redis"), port=free_port_block())
    server.start()
    yield server
    server.stop()
