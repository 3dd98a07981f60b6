"""Waiting for the first of several awaitables without leaking the others."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any


async def first_completed(*awaitables: Awaitable[Any]) -> list[asyncio.Future[Any]]:
    """Run ``awaitables`` until one finishes; return them as futures, in the order given.

    The unfinished ones are cancelled and awaited, also when the caller itself is cancelled. A bare
    ``asyncio.wait`` leaves them pending then, and a stream handler cancelled at shutdown would
    leave tasks behind that kopf waits 5 s for before exiting.
    """
    futures: list[asyncio.Future[Any]] = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)
    finally:
        unfinished = [future for future in futures if not future.done()]
        for future in unfinished:
            future.cancel()
        if unfinished:
            await asyncio.wait(unfinished)
    return futures
