"""Envoy's path-based xDS for local mode: a bootstrap plus LDS/RDS/CDS files, swapped atomically.

Envoy watches the directory and reloads a resource file when a new version is moved in, so a
policy edit reaches Envoy without a restart or a control-plane process.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from switchyard.api.v1 import routing_pb2 as pb
from switchyard.operator.envoy_config import (
    ROUTE_CONFIG_NAME,
    GatewaySettings,
    build_clusters,
    build_listener,
    build_route_config,
)

LDS = "lds.json"
CDS = "cds.json"
RDS = "rds.json"
ROUTING = "routing.pb"


def atomic_write(path: Path, data: bytes) -> None:
    """Write via a temp file and rename, so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def _source(directory: Path, name: str) -> dict[str, Any]:
    return {
        "path_config_source": {
            "path": str(directory / name),
            "watched_directory": {"path": str(directory)},
        },
        "resource_api_version": "V3",
    }


def _discovery(version: str, resources: list[dict[str, Any]]) -> bytes:
    return json.dumps({"version_info": version, "resources": resources}, indent=1).encode()


def bootstrap(directory: Path, admin_port: int) -> dict[str, Any]:
    """Envoy bootstrap reading listeners and clusters from ``directory``."""
    return {
        "node": {"id": "switchyard-local", "cluster": "switchyard"},
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "dynamic_resources": {
            "lds_config": _source(directory, LDS),
            "cds_config": _source(directory, CDS),
        },
        "layered_runtime": {
            "layers": [
                {
                    "name": "static",
                    "static_layer": {"overload.global_downstream_max_connections": 50000},
                }
            ]
        },
    }


class XdsFiles:
    """Writes one config version's resources into the watched directory."""

    def __init__(self, directory: Path, settings: GatewaySettings) -> None:
        self.directory = directory
        self.settings = settings
        self._versions: dict[str, str] = {}
        directory.mkdir(parents=True, exist_ok=True)

    def write_bootstrap(self, admin_port: int) -> Path:
        path = self.directory / "bootstrap.json"
        atomic_write(path, json.dumps(bootstrap(self.directory, admin_port), indent=1).encode())
        return path

    def write_listeners(self, config: pb.RoutingConfig) -> str | None:
        """Write LDS; return its version, or None when the listener did not change."""
        rds = {
            "route_config_name": ROUTE_CONFIG_NAME,
            "config_source": _source(self.directory, RDS),
        }
        return self._write_if_changed(LDS, [build_listener(config, self.settings, rds)])

    def write_clusters(self, config: pb.RoutingConfig) -> str | None:
        """Write CDS; return its version, or None when the clusters did not change."""
        return self._write_if_changed(CDS, build_clusters(config, self.settings))

    def write_routes(self, config: pb.RoutingConfig) -> str | None:
        """Write RDS; return its version, or None when the routes did not change."""
        return self._write_if_changed(RDS, [build_route_config(config, self.settings)])

    def _write_if_changed(self, name: str, resources: list[dict[str, Any]]) -> str | None:
        # Versions hash the resources themselves: Envoy ignores identical updates, so a
        # version is only meaningful (and only awaited) when the content changed.
        content = json.dumps(resources, sort_keys=True).encode()
        version = hashlib.sha256(content).hexdigest()[:16]
        if self._versions.get(name) == version:
            return None
        atomic_write(self.directory / name, _discovery(version, resources))
        self._versions[name] = version
        return version

    def write_routing(self, config: pb.RoutingConfig) -> None:
        atomic_write(self.directory / ROUTING, config.SerializeToString(deterministic=True))
