"""Spend against the ClientKeys budgets, written to their status (``kubectl get clientkeys``).

On an interval the operator reads the budget counters the ext_procs keep in Redis (the keys
``extproc.limits`` names, read with one MGET per call; never written) for every tenant budget
of every served resource, and sets ``status.spend[]`` (one entry per tenant and period) and the
summary ``status.budgetUsd`` / ``status.spentUsd``: the figures of the tightest budget, the one
with the largest share spent (with nothing spent, the smallest). A resource's status is patched
only when its figures change. While Redis does not answer, statuses keep their last figures and
the outage is logged once (its URL without credentials).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Counter

from switchyard.extproc.limits import REDIS_URL_ENV, BudgetWindow, tenant_budget_windows
from switchyard.extproc.limits_store import bounded_client, redacted_url
from switchyard.operator.keyring import KeysVerdict, served_store

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 15.0
TIMEOUT_S = 2.0
"""Deadline of one read (connect included)."""
MGET_CHUNK = 2000
"""Keys per MGET."""
SPEND_FIELDS = ("spend", "budgetUsd", "spentUsd")

Patch = Callable[[str, str, dict[str, Any]], Awaitable[bool]]
"""(namespace, name, status fields) → a merge patch of that ClientKeys' status; False when it
failed (tried again at the next tick)."""


@dataclass(frozen=True, slots=True)
class TenantSpend:
    """One budget of one tenant: its limit and what is spent in the current period."""

    tenant: str
    period: str
    budget_usd: float
    spent_usd: float
    resets_at: float = 0.0  # calendar periods only


def _figure(usd: float) -> float:
    """Six significant digits: float noise in the sums never reads as a change."""
    return float(f"{usd:.6g}")


def spend_status(spends: Sequence[TenantSpend]) -> dict[str, Any]:
    """The status fields for a resource's budgets (null fields remove them: no budgets)."""
    if not spends:
        return dict.fromkeys(SPEND_FIELDS)
    entries = []
    for s in spends:
        entry: dict[str, Any] = {
            "tenant": s.tenant,
            "period": s.period,
            "budgetUsd": s.budget_usd,
            "spentUsd": _figure(s.spent_usd),
        }
        if s.resets_at:
            stamp = datetime.fromtimestamp(s.resets_at, UTC)
            entry["resetsAt"] = stamp.strftime("%Y-%m-%dT%H:%M:%SZ")
        entries.append(entry)
    tightest = max(spends, key=lambda s: (s.spent_usd / s.budget_usd, -s.budget_usd))
    return {
        "spend": entries,
        "budgetUsd": tightest.budget_usd,
        "spentUsd": _figure(tightest.spent_usd),
    }


def budget_windows(verdict: KeysVerdict, now: float) -> list[BudgetWindow]:
    """Every budget of a served resource's tenants, in spec order per tenant name."""
    return [
        window
        for limits in verdict.tenant_limits
        for window in tenant_budget_windows(limits.tenant, limits.limits, now)
    ]


def redis_url(verdicts: Mapping[str, KeysVerdict]) -> str:
    """Where the ext_procs count: as ``extproc.limits.store_settings`` finds it (a served
    ``spec.store`` URL, else its environment variable, else SWITCHYARD_REDIS_URL); "" none."""
    store = served_store(verdicts.values())
    if store is not None and store.redis_url:
        return store.redis_url
    env = store.redis_url_env if store is not None and store.redis_url_env else REDIS_URL_ENV
    return os.environ.get(env, "")


class SpendReader:
    """Reads counters from one Redis, each call bounded by ``timeout_s``."""

    def __init__(self, url: str, timeout_s: float = TIMEOUT_S) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._redis = bounded_client(url, timeout_s, max_connections=2)

    async def spent(self, windows: Sequence[BudgetWindow]) -> list[float]:
        """Each window's spend (the sum of its keys); raises on any failure."""
        keys = [key for w in windows for key in w.keys]
        values: list[Any] = []
        try:
            async with asyncio.timeout(self.timeout_s):
                for first in range(0, len(keys), MGET_CHUNK):
                    values += await self._redis.mget(keys[first : first + MGET_CHUNK])
        except BaseException:
            # Idle connections went to the same server: after a restart each would fail once.
            await self._redis.connection_pool.disconnect(inuse_connections=False)
            raise
        out, at = [], 0
        for window in windows:
            found = values[at : at + len(window.keys)]
            at += len(window.keys)
            out.append(max(0.0, sum(float(v) for v in found if v is not None)))
        return out

    async def close(self) -> None:
        await self._redis.aclose()


class SpendFollower:
    """Keeps the ``spend`` status of every served ClientKeys resource current."""

    def __init__(
        self,
        verdicts: Callable[[], Mapping[str, KeysVerdict]],
        patch: Patch,
        interval_s: float = DEFAULT_INTERVAL_S,
        timeout_s: float = TIMEOUT_S,
        clock: Callable[[], float] = time.time,
        reads: Counter | None = None,
    ) -> None:
        self._verdicts = verdicts
        self._reads = reads  # switchyard_operator_spend_reads_total{result}
        self._patch = patch
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._clock = clock
        self._reader: SpendReader | None = None
        self._written: dict[str, dict[str, Any]] = {}
        """resource → the spend fields last written to its status"""
        self._down = False

    async def run(self) -> None:
        """Every ``interval_s`` until cancelled; no failure ends it."""
        try:
            while True:
                try:
                    await self.tick()
                except Exception:  # a bug must not stop the operator, nor this loop
                    log.exception("spend status: tick failed")
                await asyncio.sleep(self.interval_s)
        finally:
            if self._reader is not None:
                await self._reader.close()

    async def tick(self) -> None:
        """Read every served resource's budgets at once; patch the statuses that changed."""
        verdicts = dict(self._verdicts())
        url = redis_url(verdicts)
        if self._reader is None or self._reader.url != url:
            if self._reader is not None:
                await self._reader.close()
            self._reader = SpendReader(url, self.timeout_s) if url else None
            self._down = False
        for gone in [r for r in self._written if r not in verdicts]:
            del self._written[gone]
        if self._reader is None:
            return
        now = self._clock()
        plan = {resource: budget_windows(v, now) for resource, v in verdicts.items()}
        windows = [w for found in plan.values() for w in found]
        try:
            spent = await self._reader.spent(windows) if windows else []
        except Exception as error:  # RedisError, OSError, TimeoutError: keep the statuses
            if self._reads is not None:
                self._reads.labels("unavailable").inc()
            if not self._down:
                self._down = True
                log.warning(
                    "spend status: Redis %s unavailable (%s); ClientKeys statuses keep their "
                    "last figures",
                    redacted_url(url),
                    type(error).__name__,
                )
            return
        if self._down:
            self._down = False
            log.info("spend status: Redis %s answers again", redacted_url(url))
        at = 0
        for resource, found in plan.items():
            spends = [
                TenantSpend(w.tenant.partition("/")[2], w.period, w.usd, used, w.resets_at)
                for w, used in zip(found, spent[at : at + len(found)], strict=True)
            ]
            at += len(found)
            status = spend_status(spends)
            previous = self._written.get(resource)
            if status == previous or (previous is None and not spends):
                continue  # unchanged (a resource without budgets: nothing to clear at first)
            namespace, name = resource.split("/", 1)
            if await self._patch(namespace, name, status):
                self._written[resource] = status
        if self._reads is not None:  # counted once the statuses it changed are written
            self._reads.labels("ok").inc()
