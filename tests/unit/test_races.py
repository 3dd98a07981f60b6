"""first_completed: the first awaitable wins, the rest never outlive the call."""

from __future__ import annotations

import asyncio

import pytest

from switchyard.operator.races import first_completed


async def test_returns_when_the_first_finishes_and_cancels_the_rest() -> None:
    queue: asyncio.Queue[str] = asyncio.Queue()
    never = asyncio.Event()
    queue.put_nowait("request")
    getter, waiter = await first_completed(queue.get(), never.wait())
    assert getter.result() == "request"
    assert waiter.cancelled()


async def test_cancelling_the_caller_cancels_every_awaitable() -> None:
    # The shutdown case: a stream handler cancelled while it waits must leave no task behind.
    queue: asyncio.Queue[str] = asyncio.Queue()
    never = asyncio.Event()
    before = asyncio.all_tasks()
    caller = asyncio.create_task(first_completed(queue.get(), never.wait()))
    while len(asyncio.all_tasks()) < len(before) + 3:  # the caller and its two awaitables
        await asyncio.sleep(0)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    for _ in range(3):  # let the cancellations run
        await asyncio.sleep(0)
    assert asyncio.all_tasks() == before
    queue.put_nowait("later")
    assert queue.get_nowait() == "later"  # the cancelled get took nothing
