"""The config stream: pushes RoutingConfig versions to every ext_proc replica, records ACK/NACK.

An ACK may list policies the replica left out (``policy_errors``: e.g. a router bundle path
missing on that pod); they are recorded per replica and version, for those policies' status.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import grpc

from switchyard.api.v1 import config_stream_pb2 as cs
from switchyard.api.v1 import config_stream_pb2_grpc as cs_grpc
from switchyard.api.v1 import routing_pb2 as pb
from switchyard.operator.metrics import EXTPROC, ROUTING_CONFIG, OperatorMetrics
from switchyard.operator.races import first_completed

log = logging.getLogger(__name__)

NackCallback = Callable[[str, str, str], None]
"""(replica, rejected version, error)."""
PolicyErrorsCallback = Callable[[str, str, dict[str, str]], None]
"""(replica, applied version, policy key → why that replica does not serve it)."""


class ConfigStreamServer(cs_grpc.ConfigStreamServicer):  # type: ignore[misc]
    """Holds the current RoutingConfig and streams every new version to subscribers."""

    def __init__(
        self, on_nack: NackCallback | None = None, metrics: OperatorMetrics | None = None
    ) -> None:
        self._config = pb.RoutingConfig()
        self._changed = asyncio.Event()
        self.acked: dict[str, str] = {}
        self.nacked: dict[str, tuple[str, str]] = {}
        self.policy_errors: dict[str, tuple[str, dict[str, str]]] = {}
        """Replica → (the version it ACKed, policy key → why it left that policy out)."""
        self.on_policy_errors: PolicyErrorsCallback | None = None
        self._on_nack = on_nack
        self._metrics = metrics or OperatorMetrics()

    @property
    def config(self) -> pb.RoutingConfig:
        return self._config

    async def publish(self, config: pb.RoutingConfig) -> None:
        self._config = config
        self._metrics.config_current(config.version)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def acked_everywhere(self, version: str) -> bool:
        return bool(self.acked) and all(v == version for v in self.acked.values())

    def rejected_policies(self, version: str) -> dict[str, dict[str, str]]:
        """Policy key → {replica: why} for the replicas that ACKed ``version`` without it."""
        found: dict[str, dict[str, str]] = {}
        for node, (acked, errors) in self.policy_errors.items():
            if acked == version:
                for key, message in errors.items():
                    found.setdefault(key, {})[node] = message
        return found

    async def Subscribe(
        self, request_iterator: AsyncIterator[cs.ConfigAck], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RoutingConfig]:
        node = ""
        acks: asyncio.Queue[cs.ConfigAck | None] = asyncio.Queue()

        async def read() -> None:
            async for ack in request_iterator:
                await acks.put(ack)
            await acks.put(None)

        reader = asyncio.create_task(read())
        sent = ""
        self._metrics.stream_opened(EXTPROC)
        try:
            while True:
                if self._config.version and self._config.version != sent:
                    sent = self._config.version
                    yield self._config
                changed = self._changed
                getter, _ = await first_completed(acks.get(), changed.wait())
                if not getter.done() or getter.cancelled():
                    continue
                ack = getter.result()
                if ack is None:
                    return
                if ack.node and ack.node != node:
                    self._metrics.client_named(EXTPROC, ack.node, node)
                node = ack.node or node
                if not ack.version:
                    continue
                self._metrics.response(EXTPROC, node, ROUTING_CONFIG, acked=not ack.error)
                if ack.error:
                    self.nacked[node] = (ack.version, ack.error)
                    log.warning("%s rejected routing config %s: %s", node, ack.version, ack.error)
                    if self._on_nack is not None:
                        self._on_nack(node, ack.version, ack.error)
                else:
                    errors = {e.policy: e.message for e in ack.policy_errors}
                    self.policy_errors[node] = (ack.version, errors)
                    self.acked[node] = ack.version
                    if errors:
                        log.warning("%s left out policies of %s: %s", node, ack.version, errors)
                    if self.on_policy_errors is not None:
                        self.on_policy_errors(node, ack.version, errors)
        finally:
            reader.cancel()
            self.acked.pop(node, None)
            self.policy_errors.pop(node, None)
            self._metrics.stream_closed(EXTPROC, node)
