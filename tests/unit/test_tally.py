"""Tally: increments summed per series and flushed give the same exposition as one
prometheus_client call per update (this pins the bucket-level API the flush relies on)."""

from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from switchyard.extproc.tally import FLUSH_SECONDS, Tally

BUCKETS = (0.001, 0.01, 0.1, 1.0)


def _metrics(registry: CollectorRegistry) -> tuple[Counter, Histogram]:
    counter = Counter("sy_test", "test", ["label"], registry=registry)
    histogram = Histogram("sy_test_seconds", "test", ["label"], buckets=BUCKETS, registry=registry)
    return counter, histogram


@given(
    st.lists(st.floats(min_value=0, max_value=1e3, allow_nan=False), max_size=40),
    st.lists(st.sampled_from(["a", "b"]), max_size=20),
)
def test_a_flushed_tally_exposes_what_direct_calls_expose(
    values: list[float], labels: list[str]
) -> None:
    direct, tallied = CollectorRegistry(), CollectorRegistry()
    counter_d, histogram_d = _metrics(direct)
    counter_t, histogram_t = _metrics(tallied)
    tally = Tally()
    for label in labels:
        counter_d.labels(label).inc(2.5)
        tally.add(counter_t.labels(label), 2.5)
    for i, value in enumerate(values):
        label = "a" if i % 3 else "b"
        histogram_d.labels(label).observe(value)
        tally.observe(histogram_t.labels(label), value)
    tally.flush()
    assert _exposition(tallied) == _exposition(direct)


def _exposition(registry: CollectorRegistry) -> list[bytes]:
    """The sample lines, without the creation timestamps (which differ between registries)."""
    return [
        line
        for line in generate_latest(registry).splitlines()
        if not line.startswith(b"#") and b"_created" not in line
    ]


def test_nothing_reaches_the_series_before_a_flush_and_the_timer_flushes() -> None:
    registry = CollectorRegistry()
    counter, _ = _metrics(registry)
    child = counter.labels("a")
    tally = Tally()
    tally.add(child, 3)
    assert registry.get_sample_value("sy_test_total", {"label": "a"}) == 0.0

    async def run() -> None:
        loop = asyncio.get_running_loop()
        tally.start(loop)
        flushed = loop.create_future()
        loop.call_later(FLUSH_SECONDS * 1.5, flushed.set_result, None)
        await flushed
        assert registry.get_sample_value("sy_test_total", {"label": "a"}) == 3.0
        tally.add(child, 1)
        tally.stop()  # flushes what is pending

    asyncio.run(run())
    assert registry.get_sample_value("sy_test_total", {"label": "a"}) == 4.0
