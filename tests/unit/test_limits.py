"""Budgets and rate limits: the schema's errors, the counter stores' semantics (the Lua scripts
on a real redis-server, and the in-memory store, which must behave the same), windows and
Retry-After, and the ext_proc's admission (429, downgrade, settlement, fail modes)."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from conftest import EXAMPLE
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2
from test_processor import error_of

from switchyard.extproc import limits as limits_module
from switchyard.extproc.config import build_config
from switchyard.extproc.limits import REDIS_URL_ENV, Kind, LimitCounter, StoreSettings, retry_after
from switchyard.extproc.limits_store import (
    Check,
    CounterStore,
    Delta,
    MemoryStore,
    RedisStore,
    Refusal,
    StoreUnavailable,
)
from switchyard.extproc.processor import Processor
from switchyard.extproc.scoring import HeuristicScorer
from switchyard.extproc.state import RuntimeState
from switchyard.headers import EXTPROC_FILTER
from switchyard.local.ports import free_port_block
from switchyard.local.redis import LocalRedis
from switchyard.operator.clientkeys import (
    LOCAL_REDIS_ENV,
    compile_client_keys,
    compile_store,
    compile_tenant_limits,
    hash_key,
    parse_client_keys,
)
from switchyard.operator.compiler import compile_config
from switchyard.operator.policy import PolicyError, parse_policy

KEY = "sk-switchyard-limits-0123456789"
FAR = 4_000_000_000_000  # an expiry far ahead (ms)


@pytest.fixture(params=["redis", "memory"])
async def store(
    request: pytest.FixtureRequest, redis_server: LocalRedis
) -> AsyncIterator[CounterStore]:
    if request.param == "memory":
        yield MemoryStore()
        return
    redis = RedisStore(redis_server.url, 0.5)
    await redis._redis.flushall()
    yield redis
    await redis.close()


async def value(store: CounterStore, key: str) -> float:
    if isinstance(store, MemoryStore):
        return store.value(key)
    assert isinstance(store, RedisStore)
    raw = await store._redis.get(key)
    return float(raw or 0)


# -- the stores' semantics (the same for both) --------------------------------------------


async def test_admit_reserves_in_the_last_key_until_the_limit(store: CounterStore) -> None:
    check = Check(("a:1", "a:2"), limit=3, amount=1, expire_at_ms=FAR)
    assert [await store.admit([check]) for _ in range(3)] == [None, None, None]
    assert (await value(store, "a:2"), await value(store, "a:1")) == (3, 0)
    refusal = await store.admit([check])
    assert refusal == Refusal(index=0, used=3.0, oldest=1)
    assert await value(store, "a:2") == 3  # a refusal reserves nothing


async def test_every_key_of_a_window_counts(store: CounterStore) -> None:
    await store.settle([Delta("w:1", 2.0, FAR), Delta("w:3", 1.0, FAR)], "w")
    refusal = await store.admit([Check(("w:1", "w:2", "w:3"), 3, 1, FAR)])
    assert refusal == Refusal(0, 3.0, 0)  # the oldest key with a use is the first
    assert await store.admit([Check(("w:2", "w:3", "w:4"), 3, 1, FAR)]) is None


async def test_all_or_nothing_across_counters(store: CounterStore) -> None:
    roomy = Check(("r",), 10, 1, FAR)
    full = Check(("f",), 0.5, 1, FAR)
    refusal = await store.admit([roomy, full])
    assert refusal is not None and refusal.index == 1 and refusal.oldest == -1
    assert await value(store, "r") == 0  # the first counter had room but nothing was reserved


async def test_unenforced_counters_are_counted_never_refused(store: CounterStore) -> None:
    counted = Check(("u",), 1, 5, FAR, enforce=False)
    assert await store.admit([counted]) is None
    assert await store.admit([counted]) is None
    assert await value(store, "u") == 10


async def test_float_amounts_fit_exactly(store: CounterStore) -> None:
    check = Check(("usd",), 0.3, 0.1, FAR)
    assert [await store.admit([check]) for _ in range(3)] == [None, None, None]
    assert await store.admit([check]) is not None  # 0.1 * 3 == 0.30000000000000004 fits


async def test_settle_replaces_the_estimate(store: CounterStore) -> None:
    check = Check(("s",), 100, 40, FAR)
    assert await store.admit([check]) is None
    await store.settle([Delta("s", -40 + 12, FAR)], "s")
    assert await value(store, "s") == 12
    assert await store.admit([Check(("s",), 100, 88, FAR)]) is None
    assert await store.admit([Check(("s",), 100, 1, FAR)]) is not None


async def test_keys_expire_at_their_time(store: CounterStore) -> None:
    soon = int(time.time() * 1000) + 300
    assert await store.admit([Check(("e",), 1, 1, soon)]) is None
    assert await store.admit([Check(("e",), 1, 1, soon)]) is not None
    deadline = time.monotonic() + 5
    while await store.admit([Check(("e",), 1, 1, soon + 60_000)]) is not None:
        assert time.monotonic() < deadline, "the key never expired"
        await asyncio.sleep(0.05)


async def test_a_retried_settlement_is_applied_once(redis_server: LocalRedis) -> None:
    store = RedisStore(redis_server.url, 5.0)
    await store._redis.flushall()
    for _ in range(3):  # a retry after an answer that was lost carries the same ident
        await store.settle([Delta("once", 2.5, FAR)], "settlement-1")
    await store.settle([Delta("once", 1.0, FAR)], "settlement-2")
    assert float(await store._redis.get("once")) == 3.5
    assert 0 < await store._redis.pttl("sy:s:settlement-1") <= 15 * 60_000
    await store.close()


async def test_redis_admission_is_atomic_under_concurrency(redis_server: LocalRedis) -> None:
    stores = [RedisStore(redis_server.url, 5.0) for _ in range(4)]
    await stores[0]._redis.flushall()
    check = Check(("burst",), 25, 1, FAR)
    results = await asyncio.gather(*(stores[i % 4].admit([check]) for i in range(100)))
    assert sum(r is None for r in results) == 25
    assert float(await stores[0]._redis.get("burst")) == 25
    for s in stores:
        await s.close()


async def test_queued_admissions_go_in_one_call_in_order(redis_server: LocalRedis) -> None:
    store = RedisStore(redis_server.url, 5.0)
    await store._redis.flushall()
    await store._redis.config_resetstat()
    small = Check(("q",), 5, 2, FAR)
    one = Check(("q",), 5, 1, FAR)
    # Queued while the first call is in flight: 2, then 2 (4), 2 refused (6 > 5), then 1 (5).
    results = await asyncio.gather(*(store.admit([c]) for c in (small, small, small, one, one)))
    assert [r is None for r in results] == [True, True, False, True, False]
    assert float(await store._redis.get("q")) == 5
    calls = (await store._redis.info("commandstats"))["cmdstat_evalsha"]["calls"]
    assert calls < 5  # batched: fewer calls than admissions
    await store.close()


async def test_redis_down_is_unavailable_within_the_deadline(tmp_path: Path) -> None:
    server = LocalRedis(tmp_path / "r", port=free_port_block())
    server.start()
    store = RedisStore(server.url, 0.05)
    await store.warm()
    assert await store.admit([Check(("d",), 1, 1, FAR)]) is None
    server.stop()
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await store.admit([Check(("d",), 1, 1, FAR)])
    assert time.monotonic() - started < 0.5
    server.start()  # its AOF brings the acknowledged reservation back
    assert await store.admit([Check(("d",), 1, 1, FAR)]) == Refusal(0, 1.0, 0)
    await store.close()
    server.stop()


# -- windows and Retry-After ----------------------------------------------------------------


def test_windows_and_retry_after() -> None:
    rpm = LimitCounter("tenant 't'", "p", Kind.REQUESTS, 2, "1m", 60)
    now = 1_000_005.0  # 5 s into a 10 s bucket (1_000_000 is a multiple of 10)
    keys, expire, _ = limits_module._window(rpm, now)
    assert len(keys) == 6 and keys[-1] == "p:100000" and keys[0] == "p:99995"
    assert expire == (1_000_010 + 60) * 1000
    # The oldest bucket with a use is the last: it leaves the window in 55 s.
    assert retry_after(rpm, Refusal(0, 2, 5), now) == 55
    # The first (oldest) one leaves in 5 s.
    assert retry_after(rpm, Refusal(0, 2, 0), now) == 5
    day = LimitCounter("tenant 't'", "d", Kind.USD, 1, "day", 0)
    noon = 1_700_006_400.0 + 43_200  # 2023-11-15 00:00 UTC + 12 h
    assert limits_module._window(day, noon)[0] == ("d:20231115",)
    assert retry_after(day, Refusal(0, 1, 0), noon) == 43_200
    month = LimitCounter("tenant 't'", "m", Kind.USD, 1, "month", 0)
    assert limits_module._window(month, noon)[0] == ("m:202311",)
    assert retry_after(month, Refusal(0, 1, 0), noon) == 15 * 86_400 + 43_200
    rolling = LimitCounter("tenant 't'", "r", Kind.USD, 1, "24h", 86_400)
    keys, _, _ = limits_module._window(rolling, noon)
    assert len(keys) == 24 and keys[-1] == f"r:{int(noon // 3600)}"


# -- schema ---------------------------------------------------------------------------------


def keys_doc(
    tenant_limits: Any = None, key_limits: Any = None, store: Any = None
) -> dict[str, Any]:
    tenant: dict[str, Any] = {"name": "team"}
    if tenant_limits is not None:
        tenant["limits"] = tenant_limits
    key: dict[str, Any] = {"name": "k", "tenant": "team", "sha256": hash_key(KEY)}
    if key_limits is not None:
        key["limits"] = key_limits
    spec: dict[str, Any] = {"tenants": [tenant], "keys": [key]}
    if store is not None:
        spec["store"] = store
    return {"apiVersion": "switchyard.dev/v1alpha1", "kind": "ClientKeys", "spec": spec}


@pytest.mark.parametrize(
    ("doc", "pattern"),
    [
        (
            keys_doc({"budgets": [{"usd": 1, "period": "week"}]}),
            r"tenants\.0\.limits\.budgets\.0\.period",
        ),
        (
            keys_doc({"budgets": [{"usd": 0, "period": "day"}]}),
            r"tenants\.0\.limits\.budgets\.0\.usd",
        ),
        (keys_doc({"budgets": [{"usd": 1, "period": "400d"}]}), r"budgets\.0\.period.*366d"),
        (
            keys_doc({"budgets": [{"usd": 1, "period": "day"}, {"usd": 2, "period": "day"}]}),
            r"tenants\.0\.limits\.budgets.*\[1\]\.period: 'day' appears twice",
        ),
        (keys_doc(key_limits={"requestsPerMinute": 0}), r"keys\.0\.limits\.requestsPerMinute"),
        (
            keys_doc(key_limits={"perModel": {"light": {"tokensPerMinut": 5}}}),
            r"keys\.0\.limits\.perModel\.light\.tokensPerMinut",
        ),
        (keys_doc(store={"redis": "remote"}), r"store\.redis"),
        (keys_doc(store={"redisUrl": "http://x"}), r"store\.redisUrl"),
        (keys_doc(store={"redis": "local", "redisUrl": "redis://x:1"}), r"store.*at most one"),
        (keys_doc(store={"onUnavailable": "maybe"}), r"store\.onUnavailable"),
    ],
)
def test_schema_errors_name_the_field(doc: dict[str, Any], pattern: str) -> None:
    with pytest.raises(PolicyError, match=f"(?s){pattern}"):
        parse_client_keys(doc, "keys.yaml")


def test_policy_budget_errors_name_the_field() -> None:
    policy = yaml.safe_load(EXAMPLE.read_text())
    policy["spec"]["budget"] = {"onExhausted": "downgrade"}
    with pytest.raises(PolicyError, match=r"spec\.budget: .*downgradeTo: required"):
        parse_policy(policy)
    policy["spec"]["budget"] = {"onExhausted": "downgrade", "downgradeTo": ["tiny"]}
    with pytest.raises(PolicyError, match=r"budget\.downgradeTo\[0\]: unknown model 'tiny'"):
        parse_policy(policy)
    policy["spec"]["budget"] = {"downgradeTo": ["light"]}
    with pytest.raises(PolicyError, match=r"downgradeTo: only onExhausted: downgrade"):
        parse_policy(policy)


def test_two_stores_are_an_error_and_the_env_names_agree() -> None:
    one = parse_client_keys(keys_doc(store={"redis": "local"}), "a.yaml")
    store = compile_store([one])
    assert store is not None and store.redis_url_env == REDIS_URL_ENV
    with pytest.raises(PolicyError, match=r"spec\.store is set in more than one"):
        compile_store([one, one])
    assert LOCAL_REDIS_ENV == REDIS_URL_ENV


# -- the ext_proc's admission ---------------------------------------------------------------


def state_for(doc: dict[str, Any], budget: dict[str, Any] | None = None) -> RuntimeState:
    policy = yaml.safe_load(EXAMPLE.read_text())
    if budget is not None:
        policy["spec"]["budget"] = budget
    spec = parse_client_keys(doc, "keys.yaml")
    config = build_config(
        compile_config(
            [parse_policy(policy)],
            client_keys=compile_client_keys([spec]),
            tenant_limits=compile_tenant_limits([spec]),
            limit_store=compile_store([spec]),
        )
    )
    state = RuntimeState(scorer_loader=lambda _bundle: HeuristicScorer())
    state.swap((config, {b: HeuristicScorer() for b in config.router_bundles}))
    return state


HARD = (
    "Prove step by step that every odd-degree real polynomial has a real root, then implement "
    "a root finder in python and analyze its edge cases."
)


async def send(
    processor: Processor, content: str = "hi", **extra: Any
) -> tuple[ep.ProcessingResponse, Any]:
    body = orjson.dumps(
        {"model": "auto", "messages": [{"role": "user", "content": content}], **extra}
    )
    attributes = struct_pb2.Struct()
    attributes.update({"request.path": "/v1/chat/completions", "request.headers['x-api-key']": KEY})
    message = ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=True))
    message.attributes[EXTPROC_FILTER].CopyFrom(attributes)
    stream = processor.open()
    raw, _ = await processor.message(stream, message.SerializeToString())
    return ep.ProcessingResponse.FromString(raw), stream


def answer(stream: Any, prompt: int, completion: int, model: str) -> None:
    """The response of a routed request, with its usage, through its account."""
    body = orjson.dumps(
        {"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion}}
    )
    message = ep.ProcessingRequest(response_body=ep.HttpBody(body=body, end_of_stream=True))
    attributes = struct_pb2.Struct()
    attributes.update({"response.code": 200.0})
    message.attributes[EXTPROC_FILTER].CopyFrom(attributes)
    stream.account.body(message)


def meta(response: ep.ProcessingResponse) -> Any:
    return response.dynamic_metadata.fields["switchyard"].struct_value.fields


async def test_keys_without_limits_never_reach_the_store() -> None:
    processor = Processor(state_for(keys_doc(store={"redisUrl": "redis://127.0.0.1:1"})))
    response, _ = await send(processor)
    assert meta(response)["model"].string_value == "light"
    assert processor.limiter._settings is None  # no store was ever configured or called


async def test_requests_per_minute_give_429_with_retry_after() -> None:
    processor = Processor(state_for(keys_doc({"requestsPerMinute": 2})))
    for _ in range(2):
        response, _ = await send(processor)
        assert meta(response)["model"].string_value == "light"
    response, _ = await send(processor)
    status, error = error_of(response)
    assert (status, error["code"]) == (429, "rate_limit_exceeded")
    assert "tenant 'team'" in error["message"] and "2 requests per minute" in error["message"]
    headers = {
        h.header.key: h.header.raw_value for h in response.immediate_response.headers.set_headers
    }
    assert 1 <= int(headers["retry-after"]) <= 60


async def test_budget_settles_to_the_real_cost_and_then_rejects() -> None:
    # light: $0.05 / $0.08 per 1M tokens. max_tokens=1000 reserves about $0.00008.
    processor = Processor(state_for(keys_doc({"budgets": [{"usd": 0.0002, "period": "day"}]})))
    response, stream = await send(processor, max_tokens=1000)
    assert meta(response)["model"].string_value == "light"
    answer(stream, 10, 100, "light")  # really cost 10 x 0.05e-6 + 100 x 0.08e-6 = $0.0000085
    await processor.limiter.drain()
    store = processor.limiter.store
    assert isinstance(store, MemoryStore)
    day = time.strftime("%Y%m%d", time.gmtime())
    assert store.value(f"sy:l:t:team:usd:day:{day}") == pytest.approx(0.0000085)
    admitted = 1
    while True:
        response, stream = await send(processor, max_tokens=1000)
        if response.WhichOneof("response") == "immediate_response":
            break
        admitted += 1  # never settled: each keeps its reservation
        assert admitted < 10
    status, error = error_of(response)
    assert (status, error["code"], error["type"]) == (429, "budget_exceeded", "insufficient_quota")
    assert "budget of tenant 'team' ($0.0002 per day) is spent" in error["message"]
    assert admitted == 3  # $0.0000085 + 2 x $0.00008 fits, a third reservation does not


async def test_spent_budget_downgrades_when_the_policy_says_so() -> None:
    doc = keys_doc({"budgets": [{"usd": 0.0001, "period": "24h"}]})
    processor = Processor(
        state_for(doc, budget={"onExhausted": "downgrade", "downgradeTo": ["light"]})
    )
    # The hard prompt goes to capable ($3 / $15): its estimate exceeds the budget.
    response, _ = await send(processor, HARD, max_tokens=100)
    fields = meta(response)
    assert fields["model"].string_value == "light"
    assert (
        "downgraded: budget of tenant 'team' ($0.0001 per rolling 24h)"
        in fields["reason"].string_value
    )


async def test_no_downgrade_model_fits_gives_the_budgets_429() -> None:
    doc = keys_doc({"budgets": [{"usd": 0.0001, "period": "day"}]})
    # The only downgrade model (light) does not allow images: no downgrade is possible.
    processor = Processor(
        state_for(doc, budget={"onExhausted": "downgrade", "downgradeTo": ["light"]})
    )
    image = [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]
    response, _ = await send(processor, image, max_tokens=100)  # type: ignore[arg-type]
    status, error = error_of(response)
    assert (status, error["code"]) == (429, "budget_exceeded")


def test_limits_of_the_key_and_every_tenant_up_its_chain_apply() -> None:
    doc = keys_doc({"requestsPerMinute": 5}, key_limits={"budgets": [{"usd": 1, "period": "7d"}]})
    doc["spec"]["tenants"] = [
        {"name": "org", "limits": {"perModel": {"capable": {"tokensPerMinute": 100}}}},
        {"name": "team", "parent": "org", "limits": {"requestsPerMinute": 5}},
    ]
    entry = next(iter(state_for(doc).config.client_keys.values()))  # type: ignore[union-attr]
    assert entry.limits is not None
    described = [c.describe() for c in entry.limits.counters]
    assert described == [
        "budget of key 'k' ($1 per rolling 7d)",
        "rate limit of tenant 'team': 5 requests per minute",
    ]
    (capable,) = entry.limits.per_model["capable"]
    assert capable.describe() == (
        "rate limit of tenant 'org': 100 tokens per minute on model 'capable'"
    )
    assert capable.prefix == "sy:l:t:org:m:capable:tpm"


async def test_fail_modes_when_redis_is_down(tmp_path: Path) -> None:
    server = LocalRedis(tmp_path / "r", port=free_port_block())
    url = server.url  # never started: nothing listens
    closed = Processor(
        state_for(
            keys_doc({"requestsPerMinute": 5}, store={"redisUrl": url, "onUnavailable": "closed"})
        )
    )
    before = limits_module.STORE_UNAVAILABLE.labels("closed")._value.get()
    response, _ = await send(closed)
    status, error = error_of(response)
    assert (status, error["code"]) == (503, "limits_unavailable")
    assert limits_module.STORE_UNAVAILABLE.labels("closed")._value.get() == before + 1
    rates = {"requestsPerMinute": 5, "tokensPerMinute": 10_000}
    opened = Processor(state_for(keys_doc(rates, store={"redisUrl": url})))
    unsent = limits_module.SETTLEMENTS_UNSENT._value
    base = unsent.get()
    response, stream = await send(opened)
    assert meta(response)["model"].string_value == "light"
    answer(stream, 10, 10, "light")
    assert unsent.get() == base + 1  # counted as unsent from the moment the response ended
    await until(lambda: opened.limiter.pending == 2)  # one request, 20 tokens: kept for later
    assert unsent.get() == base + 1
    server.start()
    await until(lambda: opened.limiter.pending == 0)  # retried until the store takes them
    assert unsent.get() == base
    store = opened.limiter.store
    assert isinstance(store, RedisStore)
    assert await counted(store, "sy:l:t:team:rpm:*") == 1
    assert await counted(store, "sy:l:t:team:tpm:*") == 20
    response, stream = await send(opened)
    assert meta(response)["model"].string_value == "light"
    assert await counted(store, "sy:l:t:team:rpm:*") == 2
    await store.close()
    server.stop()


def test_settlements_dropped_beyond_the_kept_limit_leave_the_unsent_gauge() -> None:
    limiter = limits_module.Limiter()
    limiter._pending = deque(maxlen=2)
    unsent = limits_module.SETTLEMENTS_UNSENT._value
    base = unsent.get()
    for settlements in (1, 2, 3):
        limits_module.SETTLEMENTS_UNSENT.inc(settlements)
        limiter._keep(f"id{settlements}", [], settlements)  # no loop here: nothing retries
    assert [kept[2] for kept in limiter._pending] == [2, 3]
    assert unsent.get() == base + 5  # the oldest (1) was dropped, never to be counted


async def until(condition: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def counted(store: RedisStore, pattern: str) -> float:
    keys = await store._redis.keys(pattern)
    return sum([float(await store._redis.get(k)) for k in keys])


def test_the_env_names_the_redis_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REDIS_URL_ENV, "redis://127.0.0.1:1")
    spec = parse_client_keys(keys_doc({"requestsPerMinute": 1}), "keys.yaml")
    config = compile_config([], client_keys=compile_client_keys([spec]))
    assert build_config(config).limit_store == StoreSettings("redis://127.0.0.1:1", False, 0.05)


def test_the_operator_serves_tenant_limits_under_qualified_names() -> None:
    from switchyard.operator.keyring import judge, served_store, served_tenant_limits

    doc = keys_doc({"requestsPerMinute": 7}, store={"onUnavailable": "closed"})
    doc["metadata"] = {"name": "clients", "namespace": "team-a"}
    verdict = judge(doc, {}, [])
    store = served_store([verdict])
    assert store is not None and store.fail_closed and not store.redis_url
    assert verdict.ready, verdict.message
    (limits,) = served_tenant_limits([verdict])
    assert limits.tenant == "team-a/team" and limits.limits.requests_per_minute == 7
    (key,) = verdict.served
    config = compile_config([], client_keys=verdict.served, tenant_limits=[limits])
    entry = build_config(config).client_keys[key.sha256]  # type: ignore[index]
    assert entry.limits is not None
    assert [c.describe() for c in entry.limits.counters] == [
        "rate limit of tenant 'team-a/team': 7 requests per minute"
    ]
