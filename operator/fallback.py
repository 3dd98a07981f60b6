"""Per-attempt fallback across models: when a model's upstream fails (connect failure, reset,
5xx, 429), Envoy retries the request on its fallback models, each attempt rewritten for the
backend it reaches.

A model with usable fallbacks is routed to an aggregate cluster: its own cluster, then each
fallback's, in order, as successive priorities. Retries use ``previous_priorities``, so every
retry moves on to the next model. Each attempt passes through upstream filters on the aggregate
cluster: ``header_mutation`` copies the chosen endpoint's metadata (which model it serves) into
a header. On the routed model's own first attempt a Lua script returns at once (the route set
host, path and key already). Any other attempt gets that backend's host, path prefix and API
key, and its upstream model id in the body. The request's header map is shared by the
attempts, so every step is idempotent. The response names the model that answered.

Only fallbacks that accept everything the routed model accepts are chained here (allowed data
classes, capabilities and context window at least as wide): a failover must never break a hard
constraint such as where regulated data may go. Other fallbacks still serve decision-time
fallback in the engine.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2
from envoy.config.common.mutation_rules.v3 import mutation_rules_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.clusters.aggregate.v3 import cluster_pb2 as aggregate_pb2
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.http.upstream_codec.v3 import upstream_codec_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.extensions.retry.priority.previous_priorities.v3 import (
    previous_priorities_config_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as http_pb2

from switchyard.api.v1 import routing_pb2 as pb
from switchyard.operator.multicluster import service_dns_name
from switchyard.operator.xds_types import (
    header,
    inline,
    millis,
    packed,
    protocol_options,
    seconds,
    struct,
    u32,
)

METADATA = "switchyard"
"""Endpoint metadata namespace: which model (backend key, name, upstream id) a host serves."""
MEMBER_HEADER = "x-switchyard-member"
BODY_MODEL_HEADER = "x-switchyard-body-model"
SUFFIX = "~fallbacks"  # "~" cannot appear in a Kubernetes name, so no backend key collides


def aggregate_name(model: pb.Model) -> str:
    return model.backend_key + SUFFIX


def stats_name(cluster: str) -> str:
    """The name a model's cluster (or its aggregate) has in Envoy's stats:
    ``namespace/policy/model`` (``...~fallbacks``), the ext_proc's ``policy`` and ``model``
    labels joined by ``/``. Envoy's Prometheus output cuts the ``envoy_cluster_name`` tag at
    the first dot, so the backend key itself would put the policy and model into the metric
    name (``envoy_cluster_metered_light_upstream_rq_total{envoy_cluster_name="default"}``)."""
    return cluster.replace(".", "/")


def _covers(fallback: pb.Model, model: pb.Model) -> bool:
    return (
        set(model.data_classes) <= set(fallback.data_classes)
        and set(model.capabilities) <= set(fallback.capabilities)
        and fallback.context_window >= model.context_window
    )


def chain(policy: pb.Policy, model: pb.Model) -> list[pb.Model]:
    """The routed model, then its fallbacks (same policy) that accept all it accepts."""
    by_name = {m.name: m for m in policy.models}
    members = [model]
    for name in model.fallbacks:
        fallback = by_name.get(name)
        if fallback is not None and fallback not in members and _covers(fallback, model):
            members.append(fallback)
    return members


def endpoint_metadata(model: pb.Model) -> base_pb2.Metadata:
    """Metadata on every endpoint of a model's cluster."""
    fields = {
        "backend": model.backend_key,
        "model": model.name,
        "upstream_model": model.upstream_model,
    }
    return base_pb2.Metadata(filter_metadata={METADATA: struct(fields)})


def priority_levels(model: pb.Model) -> int:
    """Envoy priority levels in a model's own cluster."""
    if not model.backend.endpoints:
        return 1
    return int(max(e.priority for e in model.backend.endpoints)) + 1


def retry_elsewhere(policy: rc.RetryPolicy) -> rc.RetryPolicy:
    """Each retry goes to another host, and to the next priority level (the next cluster of a
    multi-cluster Service, or the next model of a fallback chain)."""
    policy.retry_host_predicate.add(
        name="envoy.retry_host_predicates.previous_hosts",
        typed_config=packed(previous_hosts_pb2.PreviousHostsPredicate()),
    )
    policy.host_selection_retry_max_attempts = 3
    policy.retry_priority.name = "envoy.retry_priorities.previous_priorities"
    policy.retry_priority.typed_config.CopyFrom(
        packed(previous_priorities_config_pb2.PreviousPrioritiesConfig(update_frequency=1))
    )
    return policy


def retry_policy(retries: pb.Retries, members: list[pb.Model]) -> rc.RetryPolicy:
    """The policy's retry conditions plus every failure a fallback should answer, with one retry
    per remaining priority level so the last fallback is reached."""
    conditions = [c for c in retries.retry_on.split(",") if c]
    for condition in ("connect-failure", "refused-stream", "reset", "5xx"):
        if condition not in conditions:
            conditions.append(condition)
    codes = sorted({429, *retries.retriable_status_codes})
    if "retriable-status-codes" not in conditions:
        conditions.append("retriable-status-codes")
    levels = sum(priority_levels(m) for m in members)
    policy = rc.RetryPolicy(
        retry_on=",".join(conditions),
        num_retries=u32(max(retries.attempts, levels - 1)),
        retriable_status_codes=codes,
    )
    retry_elsewhere(policy)
    if retries.per_try_timeout_ms:
        policy.per_try_timeout.CopyFrom(millis(retries.per_try_timeout_ms))
    return policy


def _lua_string(text: str) -> str:
    """A Lua 5.1 string literal for any text (non-printable bytes as decimal escapes)."""
    out = []
    for byte in text.encode():
        char = chr(byte)
        out.append(char if 32 <= byte < 127 and char not in '"\\' else f"\\{byte:03d}")
    return '"' + "".join(out) + '"'


_ATTEMPT_LUA = """
local ROUTED = %(routed)s
local MEMBERS = {
%(members)s
}
local BASES = {%(bases)s}

function envoy_on_request(handle)
  local headers = handle:headers()
  local key = headers:get("%(member_header)s")
  headers:remove("%(member_header)s")  -- header_mutation sets it again for every attempt
  local current = headers:get("%(body_header)s")
  -- The routed model's first attempt: the route already set everything.
  if key == ROUTED and current == nil then return end
  local member = MEMBERS[key or ""]
  if member == nil then return end
  if member.authority ~= "" then headers:replace(":authority", member.authority) end
  local path = headers:get(":path")
  for _, base in ipairs(BASES) do
    if string.sub(path, 1, #base + 4) == base .. "/v1/" then
      path = string.sub(path, #base + 1)
      break
    end
  end
  headers:replace(":path", member.base .. path)
  if member.auth ~= "" then
    headers:replace("authorization", member.auth)
  else
    headers:remove("authorization")
  end
  if current == member.model or (current == nil and key == ROUTED) then return end
  local body = handle:body()
  if body == nil then return end
  headers = handle:headers()  -- body() waits for the body: the old header object is stale
  local raw = body:getBytes(0, body:length())
  local replacement = '"model":' .. member.model_json
  local rewritten, count = string.gsub(
    raw, '"model"%%s*:%%s*"[^"]*"', function() return replacement end, 1)
  if count > 0 then
    body:setBytes(rewritten)
    headers:replace("content-length", tostring(#rewritten))
  end
  headers:replace("%(body_header)s", member.model)
end
"""


def _member_entry(model: pb.Model, api_key: str) -> str:
    authority, base = "", ""
    if model.backend.url:
        url = urlsplit(model.backend.url)
        authority, base = url.netloc, url.path.rstrip("/")
    elif model.backend.service.name:
        svc = model.backend.service
        authority = f"{service_dns_name(svc)}:{svc.port}"
    fields = {
        "key": model.backend_key,
        "model": model.upstream_model,
        "model_json": json.dumps(model.upstream_model),
        "authority": authority,
        "base": base,
        "auth": f"Bearer {api_key}" if api_key else "",
    }
    body = ", ".join(f"{k} = {_lua_string(v)}" for k, v in fields.items())
    return f"  [{_lua_string(model.backend_key)}] = {{{body}}},"


def _copy_metadata(key: str, field: str) -> mutation_rules_pb2.HeaderMutation:
    """Set header ``key`` from the chosen endpoint's ``field`` metadata."""
    value = f"%UPSTREAM_METADATA({METADATA}:{field})%"
    return mutation_rules_pb2.HeaderMutation(append=header(key, value))


def attempt_filters(members: list[pb.Model], api_keys: list[str]) -> list[hcm_pb2.HttpFilter]:
    """Upstream HTTP filters of an aggregate cluster: tag the attempt, rewrite it, send it."""
    bases = sorted(
        {urlsplit(m.backend.url).path.rstrip("/") for m in members if m.backend.url} - {""},
        key=len,
        reverse=True,
    )
    source = _ATTEMPT_LUA % {
        "routed": _lua_string(members[0].backend_key),
        "members": "\n".join(_member_entry(m, k) for m, k in zip(members, api_keys, strict=True)),
        "bases": ", ".join(_lua_string(b) for b in bases),
        "member_header": MEMBER_HEADER,
        "body_header": BODY_MODEL_HEADER,
    }
    mutations = header_mutation_pb2.Mutations(
        request_mutations=[_copy_metadata(MEMBER_HEADER, "backend")],
        response_mutations=[
            _copy_metadata("x-switchyard-model", "model"),
            _copy_metadata("x-switchyard-upstream-model", "upstream_model"),
        ],
    )
    return [
        hcm_pb2.HttpFilter(
            name="envoy.filters.http.header_mutation",
            typed_config=packed(header_mutation_pb2.HeaderMutation(mutations=mutations)),
        ),
        hcm_pb2.HttpFilter(
            name="envoy.filters.http.lua",
            typed_config=packed(lua_pb2.Lua(default_source_code=inline(source))),
        ),
        hcm_pb2.HttpFilter(
            name="envoy.filters.http.upstream_codec",
            typed_config=packed(upstream_codec_pb2.UpstreamCodec()),
        ),
    ]


def aggregate_cluster(members: list[pb.Model], api_keys: list[str]) -> cluster_pb2.Cluster:
    """The cluster a model with fallbacks is routed to."""
    options = http_pb2.HttpProtocolOptions(
        use_downstream_protocol_config=http_pb2.HttpProtocolOptions.UseDownstreamHttpConfig(),
        http_filters=attempt_filters(members, api_keys),
    )
    # Envoy allows 3 concurrent retries per cluster by default: under load, a failing model's
    # requests beyond that got its error instead of their fallback.
    unlimited = circuit_breaker_pb2.CircuitBreakers.Thresholds(max_retries=u32(100000))
    return cluster_pb2.Cluster(
        name=aggregate_name(members[0]),
        alt_stat_name=stats_name(aggregate_name(members[0])),
        circuit_breakers=circuit_breaker_pb2.CircuitBreakers(thresholds=[unlimited]),
        connect_timeout=seconds(5),
        lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
        cluster_type=cluster_pb2.Cluster.CustomClusterType(
            name="envoy.clusters.aggregate",
            typed_config=packed(
                aggregate_pb2.ClusterConfig(clusters=[m.backend_key for m in members])
            ),
        ),
        typed_extension_protocol_options=protocol_options(options),
    )
