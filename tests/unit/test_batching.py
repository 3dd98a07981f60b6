"""Opportunistic batching: one run per distinct job, results and errors back to each item."""

from __future__ import annotations

from switchyard.extproc.batching import Batch


async def _settled(deferred: object) -> object:
    return await deferred  # type: ignore[misc]


def _drive(coro: object) -> object:
    """Resume a coroutine that awaited a settled Deferred (as the HTTP/2 server does)."""
    try:
        coro.send(None)  # type: ignore[attr-defined]
        coro.send(None)  # type: ignore[attr-defined]
    except StopIteration as done:
        return done.value
    raise AssertionError("the coroutine did not finish")


def test_each_job_runs_once_with_all_its_items_in_order() -> None:
    calls: list[tuple[str, list[int]]] = []

    def double(items: list[int]) -> list[int]:
        calls.append(("double", items))
        return [2 * i for i in items]

    def negate(items: list[int]) -> list[int]:
        calls.append(("negate", items))
        return [-i for i in items]

    batch = Batch()
    batch.open()
    waits = [batch.submit(double, 1), batch.submit(negate, 5), batch.submit(double, 2)]
    assert calls == []  # nothing runs while the batch is open
    batch.close()
    assert not batch.is_open
    assert sorted(calls) == [("double", [1, 2]), ("negate", [5])]
    assert [w.value for w in waits] == [2, -5, 4]
    assert _drive(_settled(waits[2])) == 4


def test_a_failing_job_fails_each_of_its_items_only() -> None:
    def broken(items: list[int]) -> list[int]:
        raise ValueError("scorer down")

    batch = Batch()
    batch.open()
    failed = batch.submit(broken, 1)
    fine = batch.submit(lambda items: [i + 1 for i in items], 1)
    batch.close()
    assert fine.value == 2
    coro = _settled(failed)
    coro.send(None)
    try:
        coro.send(None)
    except ValueError as error:
        assert str(error) == "scorer down"
    else:
        raise AssertionError("the item's error was not raised")
