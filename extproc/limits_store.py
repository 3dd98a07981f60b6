"""Where the counters of budgets and rate limits live: Redis (shared by every replica, updated
by Lua scripts, so a check and its reservation are one atomic step) or one worker's memory
(the same semantics, for a gateway without Redis).

A counter is a list of keys whose values add up to its use: one key for a calendar period
(``day``, ``month``), the window's buckets, oldest first, for a sliding window. ``admit``
checks every counter of a request and, only when all of them have room, adds each counter's
amount to its last key; ``settle`` adds the differences between what was reserved and what the
request really used. Keys expire at an absolute time (``PEXPIREAT``), after their period.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

# Imported with the module, never on the event loop when the first request needs Redis.
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

EPSILON = 1e-9
"""Tolerance of float sums (USD): a use within this of the limit fits."""


@dataclass(frozen=True, slots=True)
class Check:
    """One counter of one request: its keys (oldest first; the amount goes into the last), its
    limit, the amount to reserve, and whether it is enforced (False: counted, never refused)."""

    keys: tuple[str, ...]
    limit: float
    amount: float
    expire_at_ms: int
    enforce: bool = True


@dataclass(frozen=True, slots=True)
class Refusal:
    """The first counter without room: its index among the checks, its use, and the position
    (0-based) of its oldest key with a use (-1: none, the request alone exceeds the limit)."""

    index: int
    used: float
    oldest: int


@dataclass(frozen=True, slots=True)
class Delta:
    """An amount to add to one key (a settlement)."""

    key: str
    amount: float
    expire_at_ms: int


class StoreUnavailable(Exception):
    """The store did not answer in time (Redis down, slow or unreachable)."""


class CounterStore(Protocol):
    async def admit(self, checks: Sequence[Check]) -> Refusal | None:
        """Reserve every check's amount if all have room; else the first refusal."""

    async def settle(self, deltas: Sequence[Delta], ident: str) -> None:
        """Add each delta (reservations replaced by what was used), once per ``ident``."""

    async def close(self) -> None: ...

    async def warm(self) -> None: ...


# Several requests' admissions in one call, each all-or-nothing, in order (a request sees the
# reservations of those before it). KEYS: every request's checks' keys in order. ARGV[1]: the
# number of requests; then per request its number of checks, and per check its number of
# keys, limit, amount, expiry (ms since the epoch), enforced (1/0). Returns per request {-1}
# (admitted) or {refused check's index, its use, its oldest key with a use (-1: none)}.
ADMIT_LUA = """
local requests = tonumber(ARGV[1])
local at, a = 1, 2
local results = {}
for q = 1, requests do
  local n = tonumber(ARGV[a])
  a = a + 1
  local reserve, refused = {}, nil
  for c = 1, n do
    local nk = tonumber(ARGV[a])
    local limit = tonumber(ARGV[a + 1])
    local amount = tonumber(ARGV[a + 2])
    local expire = ARGV[a + 3]
    local enforce = ARGV[a + 4] == '1'
    a = a + 5
    if refused == nil then
      if enforce then
        local used, oldest = 0, -1
        for k = at, at + nk - 1 do
          local v = tonumber(redis.call('GET', KEYS[k]) or '0')
          if v > 1e-9 and oldest < 0 then oldest = k - at end
          used = used + v
        end
        if used + amount > limit + 1e-9 then refused = {c - 1, tostring(used), oldest} end
      end
      if refused == nil and amount ~= 0 then
        reserve[#reserve + 1] = {KEYS[at + nk - 1], amount, expire}
      end
    end
    at = at + nk
  end
  if refused == nil then
    for _, r in ipairs(reserve) do
      redis.call('INCRBYFLOAT', r[1], r[2])
      redis.call('PEXPIREAT', r[1], r[3])
    end
    results[q] = {-1}
  else
    results[q] = refused
  end
end
return results
"""

# KEYS[1]: the settlement's marker; KEYS[2..]: the keys. ARGV[1]: the marker's lifetime (ms);
# then per key its delta and expiry (ms since the epoch). A settlement retried after an answer
# that was lost (Redis applied it, then died or was too slow) finds its marker: applied once.
SETTLE_LUA = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then return 0 end
for i = 2, #KEYS do
  local d = tonumber(ARGV[2 * i - 2])
  if d ~= 0 then
    redis.call('INCRBYFLOAT', KEYS[i], d)
    redis.call('PEXPIREAT', KEYS[i], ARGV[2 * i - 1])
  end
end
return 1
"""
SETTLED_TTL_MS = 15 * 60_000
"""How long a settlement's marker is kept (its retries come within that)."""


MAX_BATCH = 64
"""Admissions sent in one call at most."""


def _admit_args(checks: Sequence[Check], keys: list[str], args: list[Any]) -> None:
    """Append one request's checks to a call's keys and arguments."""
    args.append(len(checks))
    for check in checks:
        keys.extend(check.keys)
        args += [
            len(check.keys),
            repr(check.limit),
            repr(check.amount),
            check.expire_at_ms,
            1 if check.enforce else 0,
        ]


def bounded_client(url: str, timeout_s: float, max_connections: int) -> Redis:
    """A Redis client whose every call fails within ``timeout_s`` and is never retried (the
    caller's fail mode decides what happens next)."""
    return Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        max_connections=max_connections,
    )


def redacted_url(url: str) -> str:
    """``url`` without its credentials (for logs)."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"


class RedisStore:
    """Counters in Redis, every call bounded by ``timeout_s`` (then ``StoreUnavailable``)."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._redis = bounded_client(url, timeout_s, max_connections=64)
        self._admit = self._redis.register_script(ADMIT_LUA)
        self._settle = self._redis.register_script(SETTLE_LUA)
        self._queue: list[tuple[Sequence[Check], asyncio.Future[Refusal | None]]] = []
        self._sending = False
        self._sender: asyncio.Future[None] | None = None

    async def _timed(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await script(keys=keys, args=args)
        except Exception as error:  # RedisError, OSError, TimeoutError, or a client bug
            # The pool's idle connections went to the same server: after a restart each would
            # fail once. Drop them (connections in use by other calls fail on their own).
            await self._redis.connection_pool.disconnect(inuse_connections=False)
            raise StoreUnavailable(type(error).__name__) from error

    async def warm(self, timeout_s: float = 2.0) -> None:
        """Connect and load the scripts ahead of the first request (best effort)."""
        try:
            async with asyncio.timeout(timeout_s):
                for script in (self._admit, self._settle):
                    await self._redis.script_load(script.script)
        except (RedisError, OSError, TimeoutError) as error:
            log.info("limits store %s not reachable yet: %s", self.safe_url, type(error).__name__)

    @property
    def safe_url(self) -> str:
        """The URL without its credentials (for logs)."""
        return redacted_url(self.url)

    async def admit(self, checks: Sequence[Check]) -> Refusal | None:
        """Queued: while a call is in flight, the admissions that arrive go together in the
        next one (one round trip for many requests under load)."""
        future: asyncio.Future[Refusal | None] = asyncio.get_running_loop().create_future()
        self._queue.append((checks, future))
        if not self._sending:
            self._sending = True
            self._sender = asyncio.ensure_future(self._send())
        return await future

    async def _send(self) -> None:
        try:
            while self._queue:
                batch = self._queue[:MAX_BATCH]
                del self._queue[:MAX_BATCH]
                keys: list[str] = []
                args: list[Any] = [len(batch)]
                for checks, _ in batch:
                    _admit_args(checks, keys, args)
                try:
                    results = await self._timed(self._admit, keys, args)
                except StoreUnavailable as error:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(StoreUnavailable(str(error)))
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        refused = int(result[0]) >= 0
                        future.set_result(
                            Refusal(int(result[0]), float(result[1]), int(result[2]))
                            if refused
                            else None
                        )
        finally:
            self._sending = False

    async def settle(self, deltas: Sequence[Delta], ident: str) -> None:
        if not deltas:
            return
        args: list[Any] = [SETTLED_TTL_MS]
        for delta in deltas:
            args += [repr(delta.amount), delta.expire_at_ms]
        await self._timed(self._settle, [f"sy:s:{ident}", *(d.key for d in deltas)], args)

    async def close(self) -> None:
        await self._redis.aclose()


class MemoryStore:
    """Counters in this worker's memory: the Lua scripts' semantics, for one worker."""

    def __init__(self, clock_ms: Any = None) -> None:
        import time

        self._now_ms = clock_ms or (lambda: int(time.time() * 1000))
        self._values: dict[str, float] = {}
        self._expiry: dict[str, int] = {}
        self._heap: list[tuple[int, str]] = []

    def _prune(self) -> None:
        now = self._now_ms()
        heap = self._heap
        while heap and heap[0][0] <= now:
            at, key = heapq.heappop(heap)
            if self._expiry.get(key) == at:
                del self._expiry[key]
                self._values.pop(key, None)

    def _add(self, key: str, amount: float, expire_at_ms: int) -> None:
        self._values[key] = self._values.get(key, 0.0) + amount
        if self._expiry.get(key) != expire_at_ms:
            self._expiry[key] = expire_at_ms
            heapq.heappush(self._heap, (expire_at_ms, key))

    async def admit(self, checks: Sequence[Check]) -> Refusal | None:
        self._prune()
        values = self._values
        for index, check in enumerate(checks):
            if not check.enforce:
                continue
            used, oldest = 0.0, -1
            for position, key in enumerate(check.keys):
                value = values.get(key, 0.0)
                if value > EPSILON and oldest < 0:
                    oldest = position
                used += value
            if used + check.amount > check.limit + EPSILON:
                return Refusal(index, used, oldest)
        for check in checks:
            if check.amount:
                self._add(check.keys[-1], check.amount, check.expire_at_ms)
        return None

    async def settle(self, deltas: Sequence[Delta], ident: str) -> None:
        self._prune()  # (a call here never fails half-way: ``ident`` needs no marker)
        for delta in deltas:
            if delta.amount:
                self._add(delta.key, delta.amount, delta.expire_at_ms)

    def value(self, key: str) -> float:
        """A key's value (tests)."""
        self._prune()
        return self._values.get(key, 0.0)

    async def close(self) -> None:
        return None

    async def warm(self) -> None:
        return None
