"""Spend budgets and rate limits of client keys and their tenants, enforced at admission.

Every limit up a key's tenant chain is a counter (``limits_store``). Once a request is routed,
one atomic store call checks them all and reserves the request's estimate in each: its prompt
tokens (known before routing) plus an output estimate (``max_tokens``, capped; a default when
absent), priced at the chosen model's rates, and one request. When its response ends (complete,
cut off or failed), ``Reservation.settle`` replaces the estimate with the real tokens and cost.
Replicas share the counters in Redis, so a budget is exceeded only by the estimation error of
the requests in flight. Budgets and token counts are charged where they were reserved (the
period or bucket of admission).

A spent budget gives a 429 with ``Retry-After`` naming it, or, under a policy's
``budget.onExhausted: downgrade``, the request is routed among that policy's ``downgradeTo``
models (still within the key's allowance), served past the budget and still counted. When the
store does not answer within its deadline, the configured mode decides: open admits the request
and charges it once the store is back; closed answers 503 ``limits_unavailable``. Both are
counted in ``switchyard_limits_store_unavailable_total{mode}`` and logged (at most every 10 s).
"""

from __future__ import annotations

import asyncio
import calendar
import functools
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from prometheus_client import Counter, Gauge

from switchyard.api.v1 import routing_pb2 as pb
from switchyard.extproc.errors import GatewayError
from switchyard.extproc.limits_store import (
    Check,
    CounterStore,
    Delta,
    MemoryStore,
    RedisStore,
    Refusal,
    StoreUnavailable,
)

if TYPE_CHECKING:
    from switchyard.extproc.config import ModelRoute
    from switchyard.extproc.engine import Decision
    from switchyard.extproc.request import ParsedRequest

log = logging.getLogger(__name__)

REDIS_URL_ENV = "SWITCHYARD_REDIS_URL"
"""The ext_proc's Redis URL when the ClientKeys documents set no ``store``."""
DEFAULT_OUTPUT_TOKENS = 512
"""Output tokens reserved for a request without ``max_tokens`` ..."""
MAX_OUTPUT_ESTIMATE = 4096
"""... and the most reserved for one with it."""
RATE_WINDOW_S = 60
RATE_BUCKETS = 6
"""Rate limits count over the last minute in 10 s buckets."""
ROLLING_BUCKETS = 24
"""Rolling budgets count over their window in 24 buckets (1 h buckets for 24h)."""
DOWN_FOR_S = 0.5
"""After a failed call, the store is not tried again for this long (fail mode at once)."""
LOG_EVERY_S = 10.0
SETTLE_EVERY_S = 0.005
"""Settlements are sent at most this late, together."""
MAX_PENDING = 20_000
"""Settlement calls kept while the store is down (the oldest are dropped beyond)."""

STORE_UNAVAILABLE = Counter(
    "switchyard_limits_store_unavailable",
    "Requests admitted (mode=open) or refused (mode=closed) because the limits store "
    "(Redis) did not answer in time.",
    ["mode"],
)
SETTLEMENTS_UNSENT = Gauge(
    "switchyard_limits_settlements_unsent",
    "Finished requests whose spend the limits store (Redis) has not taken yet: batched, in "
    "flight, or kept while it does not answer. Zero when every charge is counted.",
    multiprocess_mode="livesum",
)
BUDGET_DOWNGRADES = Counter(
    "switchyard_budget_downgrades",
    "Requests routed to a policy's downgradeTo models because a budget was spent.",
    ["policy"],
)


class Kind(IntEnum):
    USD = 0
    REQUESTS = 1
    TOKENS = 2


@dataclass(frozen=True, slots=True)
class LimitCounter:
    """One limit of one tenant or key."""

    scope: str  # "tenant 'alice'", "key 'ci'"
    prefix: str  # the store keys' common prefix
    kind: Kind
    limit: float
    period: str  # day, month, or a window such as 24h, 1m
    window_s: int  # sliding window length; 0: calendar period
    model: str = ""  # per-model rate limits: the model

    @property
    def budget(self) -> bool:
        return self.kind is Kind.USD

    def describe(self) -> str:
        if self.kind is Kind.USD:
            per = self.period if self.window_s == 0 else f"rolling {self.period}"
            return f"budget of {self.scope} (${self.limit:g} per {per})"
        what = "requests" if self.kind is Kind.REQUESTS else "tokens"
        on = f" on model '{self.model}'" if self.model else ""
        return f"rate limit of {self.scope}: {self.limit:g} {what} per minute{on}"


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """Every limit a key's requests meet: its own and its tenants'."""

    counters: tuple[LimitCounter, ...]
    per_model: Mapping[str, tuple[LimitCounter, ...]]


def _scope_counters(scope: str, ident: str, limits: pb.ClientLimits) -> list[LimitCounter]:
    base = f"sy:l:{ident}"
    out = [
        LimitCounter(
            scope,
            f"{base}:usd:{b.period}",
            Kind.USD,
            b.usd,
            b.period,
            int(b.window_s),
        )
        for b in limits.budgets
    ]
    rates = (
        (Kind.REQUESTS, "rpm", limits.requests_per_minute),
        (Kind.TOKENS, "tpm", limits.tokens_per_minute),
    )
    out += [
        LimitCounter(scope, f"{base}:{name}", kind, value, "1m", RATE_WINDOW_S)
        for kind, name, value in rates
        if value
    ]
    return out


def _model_counters(
    scope: str, ident: str, limits: pb.ClientLimits
) -> dict[str, list[LimitCounter]]:
    out: dict[str, list[LimitCounter]] = {}
    for model, rates in limits.per_model.items():
        base = f"sy:l:{ident}:m:{quote(model, safe='')}"
        for kind, name, value in (
            (Kind.REQUESTS, "rpm", rates.requests_per_minute),
            (Kind.TOKENS, "tpm", rates.tokens_per_minute),
        ):
            if value:
                out.setdefault(model, []).append(
                    LimitCounter(scope, f"{base}:{name}", kind, value, "1m", RATE_WINDOW_S, model)
                )
    return out


def key_limits(key: pb.ClientKey, tenants: Mapping[str, pb.ClientLimits]) -> KeyLimits | None:
    """The limits of ``key``: its own and every tenant's up its chain; None when it has none
    (such requests never touch the store)."""
    scopes = [(f"key '{key.name}'", f"k:{quote(key.name, safe='')}", key.limits)]
    scopes += [(f"tenant '{t}'", _tenant_ident(t), tenants[t]) for t in key.tenants if t in tenants]
    counters: list[LimitCounter] = []
    per_model: dict[str, list[LimitCounter]] = {}
    for scope, ident, limits in scopes:
        counters += _scope_counters(scope, ident, limits)
        for model, found in _model_counters(scope, ident, limits).items():
            per_model.setdefault(model, []).extend(found)
    if not counters and not per_model:
        return None
    return KeyLimits(tuple(counters), {m: tuple(c) for m, c in per_model.items()})


def _tenant_ident(tenant: str) -> str:
    return f"t:{quote(tenant, safe='')}"


@dataclass(frozen=True, slots=True)
class BudgetWindow:
    """One tenant budget's store keys now (their values add up to its spend) and, for a
    calendar period, when it resets (seconds since the epoch; 0 for a rolling window)."""

    tenant: str
    period: str
    usd: float
    keys: tuple[str, ...]
    resets_at: float


def tenant_budget_windows(tenant: str, limits: pb.ClientLimits, now: float) -> list[BudgetWindow]:
    """``tenant``'s budgets as the admissions count them (the operator reads them, never
    writes: ``switchyard.operator.spend``)."""
    out = []
    for counter in _scope_counters(f"tenant '{tenant}'", _tenant_ident(tenant), limits):
        if counter.budget:
            keys, _, ends = _window(counter, now)
            resets = 0.0 if counter.window_s else ends
            out.append(BudgetWindow(tenant, counter.period, counter.limit, keys, resets))
    return out


def tenant_table(config: pb.RoutingConfig) -> dict[str, pb.ClientLimits]:
    """Tenant name → its limits (only tenants with limits)."""
    return {t.tenant: t.limits for t in config.tenant_limits}


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """Where this config's counters live ("" url: each worker's memory)."""

    url: str
    fail_closed: bool
    timeout_s: float


def store_settings(config: pb.RoutingConfig) -> StoreSettings:
    """The config's ``limit_store``, its URL read from the environment where it says so."""
    store = config.limit_store
    env = store.redis_url_env or REDIS_URL_ENV
    url = store.redis_url or os.environ.get(env, "")
    return StoreSettings(url, store.fail_closed, (store.timeout_ms or 50) / 1000)


def output_estimate(request: ParsedRequest) -> int:
    """Output tokens reserved for ``request``."""
    wanted = request.max_output_tokens
    return min(wanted, MAX_OUTPUT_ESTIMATE) if wanted else DEFAULT_OUTPUT_TOKENS


def _window(counter: LimitCounter, now: float) -> tuple[tuple[str, ...], int, float]:
    """The counter's keys now (oldest first), their expiry (ms since the epoch), and when
    the oldest key leaves the window (sliding: per bucket, see ``retry_after``; calendar: the
    period's end). Cached per bucket (per second for calendar periods): the same for every
    request until the window moves."""
    if counter.window_s:
        buckets = ROLLING_BUCKETS if counter.kind is Kind.USD else RATE_BUCKETS
        return _sliding(counter, int(now // (counter.window_s // buckets)), buckets)
    return _calendar(counter, int(now))


@functools.lru_cache(maxsize=4096)
def _sliding(
    counter: LimitCounter, current: int, buckets: int
) -> tuple[tuple[str, ...], int, float]:
    size = counter.window_s // buckets
    keys = tuple(f"{counter.prefix}:{i}" for i in range(current - buckets + 1, current + 1))
    return keys, (current + 1) * size * 1000 + counter.window_s * 1000, float((current + 1) * size)


@functools.lru_cache(maxsize=4096)
def _calendar(counter: LimitCounter, now: int) -> tuple[tuple[str, ...], int, float]:
    day = time.gmtime(now)
    if counter.period == "day":
        end = calendar.timegm((day.tm_year, day.tm_mon, day.tm_mday, 0, 0, 0)) + 86_400
        ident = time.strftime("%Y%m%d", day)
    else:
        year, month = (day.tm_year + 1, 1) if day.tm_mon == 12 else (day.tm_year, day.tm_mon + 1)
        end = calendar.timegm((year, month, 1, 0, 0, 0))
        ident = time.strftime("%Y%m", day)
    return (f"{counter.prefix}:{ident}",), (end + 86_400) * 1000, float(end)


def retry_after(counter: LimitCounter, refusal: Refusal, now: float) -> int:
    """Seconds until the refused counter can have room: the calendar period's end, or when
    its oldest bucket with a use leaves the window (the window's length when none has one:
    the request alone exceeds the limit)."""
    keys, _, leaves = _window(counter, now)
    if counter.window_s:
        if refusal.oldest < 0:
            return counter.window_s
        leaves += refusal.oldest * (counter.window_s // len(keys))
    return max(1, int(leaves - now + 0.999))


class LimitExceeded(GatewayError):
    """429 for a spent budget or a rate limit; ``retry_after`` seconds go in ``Retry-After``."""

    def __init__(self, counter: LimitCounter, refusal: Refusal, amount: float, now: float) -> None:
        self.retry_after = retry_after(counter, refusal, now)
        if refusal.oldest < 0:
            need = f"${amount:.6g}" if counter.kind is Kind.USD else f"{amount:g}"
            why = f"this request needs {need}, more than the {counter.describe()} allows"
        elif counter.kind is Kind.USD:
            why = (
                f"the {counter.describe()} is spent (${refusal.used:.6g} used or reserved by "
                f"requests in flight; this one may cost up to ${amount:.6g})"
            )
        else:
            why = f"the {counter.describe()} is reached"
        super().__init__(
            429,
            f"{why}; retry in {self.retry_after} s",
            code="budget_exceeded" if counter.kind is Kind.USD else "rate_limit_exceeded",
            type_="insufficient_quota" if counter.kind is Kind.USD else "requests",
        )


def limits_unavailable() -> GatewayError:
    """503 in closed mode while the store does not answer."""
    return GatewayError(
        503,
        "the gateway cannot check this API key's budgets and rate limits right now; retry",
        code="limits_unavailable",
        type_="server_error",
    )


@dataclass(slots=True)
class _Planned:
    counter: LimitCounter
    check: Check


class _StillDown(StoreUnavailable):
    """The store was not called: a call failed less than ``DOWN_FOR_S`` ago."""


class Reservation:
    """What one admitted request reserved; ``settle`` once its response ended."""

    __slots__ = ("_limiter", "_planned", "_reserved", "done")

    def __init__(self, limiter: Limiter, planned: list[_Planned], reserved: bool) -> None:
        self._limiter = limiter
        self._planned = planned
        self._reserved = reserved  # False: admitted with the store down (charge it all)
        self.done = False

    def settle(self, input_tokens: int, output_tokens: int, cost: float) -> None:
        """Replace the estimate with what the request used (never blocks: a task settles)."""
        if self.done:
            return
        self.done = True
        used = {Kind.USD: cost, Kind.REQUESTS: 1.0, Kind.TOKENS: input_tokens + output_tokens}
        deltas = []
        for planned in self._planned:
            check = planned.check
            amount = used[planned.counter.kind] - (check.amount if self._reserved else 0.0)
            if amount:
                deltas.append(Delta(check.keys[-1], amount, check.expire_at_ms))
        if deltas:
            self._limiter.settle(deltas)

    def release(self) -> None:
        """The request was not sent after all: give the reservation back."""
        if self.done:
            return
        self.done = True
        if self._reserved:
            deltas = [
                Delta(p.check.keys[-1], -p.check.amount, p.check.expire_at_ms)
                for p in self._planned
                if p.check.amount
            ]
            self._limiter.settle(deltas)


Redecide = Callable[[frozenset[str]], "Decision"]
"""Route the request again, among these models only."""


class Limiter:
    """One worker's admission and settlement against its current store."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._settings: StoreSettings | None = None
        self.store: CounterStore = MemoryStore()
        self._down_until = 0.0
        self._logged = 0.0
        # (ident, deltas, settlements summed in them), oldest first
        self._pending: deque[tuple[str, list[Delta], int]] = deque(maxlen=MAX_PENDING)
        self._tasks: set[asyncio.Task[None]] = set()
        self._flushing = False
        self._batch: dict[str, Delta] = {}
        self._batch_settlements = 0
        self._batching = False

    def use(self, settings: StoreSettings) -> None:
        """Count in the store ``settings`` name (kept while they stay the same)."""
        if settings is self._settings:
            return
        if settings == self._settings:  # a new config version, the same store
            self._settings = settings
            return
        old, self._settings = self.store, settings
        self.store = RedisStore(settings.url, settings.timeout_s) if settings.url else MemoryStore()
        self._down_until = 0.0
        self._spawn(old.close())
        self._spawn(self.store.warm())

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            task = asyncio.get_running_loop().create_task(work)
        except RuntimeError:  # no loop (a synchronous caller): nothing to run it on
            work.close()
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _unavailable(self, error: Exception, mode: str, request: bool = True) -> None:
        """The store did not answer a request's admission (``request``) or a settlement."""
        now = time.monotonic()
        if not isinstance(error, _StillDown):  # a call that failed: do not try for a while
            self._down_until = now + DOWN_FOR_S
        if request:
            STORE_UNAVAILABLE.labels(mode).inc()
        if now - self._logged >= LOG_EVERY_S:
            self._logged = now
            log.warning(
                "limits store unavailable (%s); failing %s: %s",
                error,
                mode,
                "requests are admitted and charged once it is back"
                if mode == "open"
                else "requests get 503 limits_unavailable",
            )

    async def _admit_checks(self, checks: list[Check]) -> Refusal | None:
        if time.monotonic() < self._down_until:
            raise _StillDown("not tried: it failed moments ago")
        return await self.store.admit(checks)

    def _plan(
        self,
        limits: KeyLimits,
        model: ModelRoute,
        request: ParsedRequest,
        now: float,
        budgets: bool,
    ) -> list[_Planned]:
        output = output_estimate(request)
        amounts = {
            Kind.USD: model.estimated_cost(request.prompt_tokens, output),
            Kind.REQUESTS: 1.0,
            Kind.TOKENS: float(request.prompt_tokens + output),
        }
        counters = limits.counters + limits.per_model.get(model.name, ())
        planned = []
        for counter in counters:
            keys, expire, _ = _window(counter, now)
            check = Check(
                keys, counter.limit, amounts[counter.kind], expire, budgets or not counter.budget
            )
            planned.append(_Planned(counter, check))
        return planned

    async def admit(
        self,
        settings: StoreSettings,
        limits: KeyLimits,
        decision: Decision,
        request: ParsedRequest,
        downgrade: frozenset[str] | None,
        redecide: Redecide,
    ) -> tuple[Decision, Reservation]:
        """Check and reserve; the decision (downgraded when a budget is spent and ``downgrade``
        names models), or LimitExceeded / a 503 in closed mode."""
        self.use(settings)
        now = self.clock()
        planned = self._plan(limits, decision.model, request, now, budgets=True)
        try:
            refusal = await self._admit_checks([p.check for p in planned])
            if refusal is not None and planned[refusal.index].counter.budget and downgrade:
                spent = planned[refusal.index].counter
                try:
                    lower: Decision | None = redecide(downgrade)
                except GatewayError:  # no downgrade model may take it: the budget's 429
                    lower = None
                if lower is not None:
                    planned2 = self._plan(limits, lower.model, request, now, budgets=False)
                    refusal2 = await self._admit_checks([p.check for p in planned2])
                    if refusal2 is None:
                        BUDGET_DOWNGRADES.labels(lower.policy).inc()
                        reason = f"{lower.reason}, downgraded: {spent.describe()} is spent"
                        return replace(lower, reason=reason), Reservation(self, planned2, True)
                    planned, refusal = planned2, refusal2
        except StoreUnavailable as error:
            if settings.fail_closed:
                self._unavailable(error, "closed")
                raise limits_unavailable() from None
            self._unavailable(error, "open")
            return decision, Reservation(self, planned, reserved=False)
        if refusal is None:
            return decision, Reservation(self, planned, reserved=True)
        refused = planned[refusal.index]
        raise LimitExceeded(refused.counter, refusal, refused.check.amount, now)

    def settle(self, deltas: list[Delta]) -> None:
        """Queue settlements; a task sends those of the next ``SETTLE_EVERY_S`` as one call,
        summed per key (under load, one store call settles many requests)."""
        batch = self._batch
        for delta in deltas:
            prior = batch.get(delta.key)
            if prior is not None:
                expire = max(prior.expire_at_ms, delta.expire_at_ms)
                delta = Delta(delta.key, prior.amount + delta.amount, expire)
            batch[delta.key] = delta
        self._batch_settlements += 1
        SETTLEMENTS_UNSENT.inc()
        if not self._batching:
            self._batching = True
            self._spawn(self._send_batch())

    async def _send_batch(self) -> None:
        await asyncio.sleep(SETTLE_EVERY_S)
        batch, self._batch, self._batching = list(self._batch.values()), {}, False
        settlements, self._batch_settlements = self._batch_settlements, 0
        await self._settle(batch, settlements)

    async def _settle(self, deltas: list[Delta], settlements: int) -> None:
        ident = os.urandom(12).hex()  # the same on every retry: Redis applies it once
        if self._pending or time.monotonic() < self._down_until:
            self._keep(ident, deltas, settlements)
            return
        try:
            await self.store.settle(deltas, ident)
        except StoreUnavailable as error:
            self._keep(ident, deltas, settlements)
            mode = "closed" if self._settings and self._settings.fail_closed else "open"
            self._unavailable(error, mode, request=False)
            return
        SETTLEMENTS_UNSENT.dec(settlements)

    def _keep(self, ident: str, deltas: list[Delta], settlements: int) -> None:
        """Keep a settlement the store did not take; a task retries it until it does."""
        if len(self._pending) == self._pending.maxlen:  # the oldest is dropped: never counted
            SETTLEMENTS_UNSENT.dec(self._pending[0][2])
        self._pending.append((ident, deltas, settlements))
        if not self._flushing:
            self._flushing = True
            self._spawn(self._flush())

    async def _flush(self) -> None:
        """Send the kept settlements, oldest first, once the store answers again."""
        try:
            while self._pending:
                await asyncio.sleep(max(DOWN_FOR_S, self._down_until - time.monotonic()))
                while self._pending:
                    ident, deltas, settlements = self._pending[0]  # queued until it is taken
                    try:
                        await self.store.settle(deltas, ident)
                    except StoreUnavailable:
                        self._down_until = time.monotonic() + DOWN_FOR_S
                        break
                    self._pending.popleft()
                    SETTLEMENTS_UNSENT.dec(settlements)
        finally:
            self._flushing = False

    @property
    def pending(self) -> int:
        """Settlement deltas waiting for the store."""
        return sum(len(deltas) for _, deltas, _ in self._pending)

    async def drain(self) -> None:
        """Wait for the settlements in flight (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
