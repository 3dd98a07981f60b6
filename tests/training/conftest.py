"""Fixtures for the training code: a small routing data set in the real files' formats."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "infra"))

from routing_data import write_routing_data


@pytest.fixture(scope="session")
def routing_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic ``data/routing`` folder (see ``tests/infra/routing_data.py``)."""
    return write_routing_data(tmp_path_factory.mktemp("routing"))
