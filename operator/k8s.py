"""The kopf operator: watches RoutePolicies and programs Envoy (ADS) and the ext_procs.

Run with `switchyard operator`. One process serves ADS and the config stream on
``--xds-listen``; gateway Envoys and ext_proc replicas connect to it.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from dataclasses import dataclass, field
from typing import Any

import kopf

from switchyard.operator.control_plane import ControlPlane
from switchyard.operator.crd import GROUP, PLURAL, VERSION
from switchyard.operator.envoy_config import GatewaySettings
from switchyard.operator.reconciler import Outcome, Reconciler

log = logging.getLogger(__name__)


@dataclass
class OperatorSettings:
    xds_listen: str = "0.0.0.0:18000"
    gateway_port: int = 8080
    extproc_endpoints: list[tuple[str, int]] = field(default_factory=lambda: [("127.0.0.1", 9002)])
    namespaces: list[str] = field(default_factory=list)
    fail_open_model: str = ""


SETTINGS = OperatorSettings()
_state: dict[str, Any] = {}


def _reconciler() -> Reconciler:
    return _state["reconciler"]  # type: ignore[no-any-return]


@kopf.on.startup()
async def _start(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.posting.level = logging.WARNING
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    plane = ControlPlane(
        GatewaySettings(
            listen_address="0.0.0.0",
            listen_port=SETTINGS.gateway_port,
            extproc_endpoints=SETTINGS.extproc_endpoints,
        )
    )
    port = await plane.start(SETTINGS.xds_listen)
    log.info("xDS and config stream on port %d", port)
    _state["reconciler"] = Reconciler(plane, SETTINGS.fail_open_model)


@kopf.on.cleanup()
async def _stop(**_: Any) -> None:
    await _reconciler().plane.stop()


def _status(outcome: Outcome, generation: int) -> dict[str, Any]:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "observedGeneration": generation,
        "modelCount": outcome.model_count,
        "configVersion": outcome.config_version,
        "conditions": [
            {
                "type": c.type,
                "status": c.status,
                "reason": c.reason,
                "message": c.message[:4000],
                "lastTransitionTime": now,
                "observedGeneration": generation,
            }
            for c in outcome.conditions
        ],
    }


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")  # type: ignore[arg-type]
async def reconcile(
    body: kopf.Body, meta: kopf.Meta, patch: kopf.Patch, logger: logging.Logger, **_: Any
) -> None:
    """Validate and publish one policy, then write its status."""
    document = {
        "apiVersion": body["apiVersion"],
        "kind": body["kind"],
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "generation": meta.get("generation", 0),
        },
        "spec": dict(body.get("spec", {})),
    }
    outcome = await _reconciler().upsert(document)
    patch.status.update(_status(outcome, meta.get("generation", 0)))
    ready = outcome.conditions[0]
    if ready.status != "True":
        kopf.warn(body, reason=ready.reason, message=ready.message[:1000])
        logger.warning("%s/%s: %s", meta["namespace"], meta["name"], ready.message)


@kopf.on.delete(GROUP, VERSION, PLURAL)
async def forget(meta: kopf.Meta, **_: Any) -> None:
    await _reconciler().delete(meta["namespace"], meta["name"])


def run_operator(settings: OperatorSettings) -> int:
    """Run until SIGINT/SIGTERM."""
    global SETTINGS
    SETTINGS = settings
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(
        kopf.operator(
            clusterwide=not settings.namespaces,
            namespaces=settings.namespaces,
            standalone=True,
        )
    )
    return 0
