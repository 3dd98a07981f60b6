"""Subscribes an ext_proc worker to the control plane's config stream.

Each RoutingConfig received is prepared off the event loop, swapped in, and acknowledged. A
policy that does not load is left out and listed in the ACK (``policy_errors``), the others
are served; only a config that fails to load as a whole is NACKed, and the last good one keeps
serving.
The stream reconnects with capped exponential backoff.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from switchyard.api.v1 import config_stream_pb2 as cs
from switchyard.api.v1 import config_stream_pb2_grpc as cs_grpc
from switchyard.api.v1 import routing_pb2 as pb
from switchyard.extproc.state import RuntimeState
from switchyard.tls import TlsFiles

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 5.0


class ConfigStreamClient:
    """Keeps ``state`` in step with the config stream at ``target`` (host:port), over mTLS
    with ``tls`` (the files are read again at each reconnect, so renewals are picked up)."""

    def __init__(
        self, target: str, node: str, state: RuntimeState, tls: TlsFiles | None = None
    ) -> None:
        self.target = target
        self.node = node
        self.state = state
        self.tls = tls
        self.first_config = asyncio.Event()

    async def run(self) -> None:
        """Subscribe until cancelled, reconnecting after failures."""
        backoff = 0.1
        while True:
            try:
                await self._subscribe()
                backoff = 0.1
            except grpc.aio.AioRpcError as error:
                log.warning("config stream %s: %s", self.target, error.code().name)
            except OSError as error:  # certificate files unreadable (mid-rotation)
                log.warning("config stream %s: %s", self.target, error)
            await asyncio.sleep(backoff)
            backoff = min(MAX_BACKOFF_S, backoff * 2)

    async def _subscribe(self) -> None:
        acks: asyncio.Queue[cs.ConfigAck] = asyncio.Queue()
        await acks.put(cs.ConfigAck(node=self.node))

        async def outgoing() -> AsyncIterator[cs.ConfigAck]:
            while True:
                yield await acks.get()

        if self.tls is None:
            channel = grpc.aio.insecure_channel(self.target)
        else:
            credentials = await asyncio.to_thread(self.tls.grpc_channel_credentials)
            channel = grpc.aio.secure_channel(self.target, credentials)
        async with channel:
            stub = cs_grpc.ConfigStreamStub(channel)
            async for config in stub.Subscribe(outgoing()):
                await acks.put(await self.apply(config))

    async def apply(self, config: pb.RoutingConfig) -> cs.ConfigAck:
        """Load one version; the ACK or NACK to send back."""
        try:
            prepared = await asyncio.to_thread(self.state.prepare, config)
        except Exception as error:  # a bad config must never take the worker down
            log.exception("rejecting routing config %s", config.version)
            return cs.ConfigAck(node=self.node, version=config.version, error=str(error))
        self.state.swap(prepared)
        self.first_config.set()
        errors = [
            cs.PolicyError(policy=key, message=message)
            for key, message in sorted(prepared[0].policy_errors.items())
        ]
        return cs.ConfigAck(node=self.node, version=config.version, policy_errors=errors)
