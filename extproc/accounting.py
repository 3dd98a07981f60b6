"""Where a routed request's tokens and dollars went: its response read through the ext_proc,
priced at the policy's rates for the model that answered, recorded in the metrics and handed
to Envoy as dynamic metadata (the request's span tags and the access log read it).

The model that answered comes from the ``x-switchyard-model`` response header the route (or,
after a fallback, the aggregate cluster's member) adds, sent as a response attribute; when it
differs from the model the ext_proc chose, the request fell back, and is counted as such.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from prometheus_client import Counter, Histogram

from switchyard.extproc.config import CompiledConfig, CompiledPolicy, ModelRoute
from switchyard.extproc.engine import Decision
from switchyard.extproc.limits import Reservation
from switchyard.extproc.metrics import (
    CLASSIFIER_SECONDS,
    COST,
    DECISION_SECONDS,
    FALLBACKS,
    RESPONSES,
    TOKENS,
)
from switchyard.extproc.request import ParsedRequest
from switchyard.extproc.tally import TALLY
from switchyard.extproc.usage import Usage, UsageMeter
from switchyard.headers import (
    EXTPROC_FILTER,
    METADATA_NAMESPACE,
    SERVED_MODEL_ATTRIBUTE,
    STATUS_ATTRIBUTE,
)

BODY_CONTINUE = ep.ProcessingResponse(response_body=ep.BodyResponse())
"""The answer to a response chunk that passes unchanged (shared: never mutate it)."""
BODY_CONTINUE_BYTES = BODY_CONTINUE.SerializeToString()


def stream_options_for_usage(options: Any) -> dict[str, Any] | None:
    """The ``stream_options`` that make a provider report a stream's usage, or None when the
    request already asks for it."""
    if isinstance(options, dict):
        if options.get("include_usage") is True:
            return None
        return {**options, "include_usage": True}
    return {"include_usage": True}


class Ledger:
    """One worker's metric series for requests and responses, cached per label set (a
    ``labels()`` lookup costs more than the update), updated through the worker's tally."""

    def __init__(self) -> None:
        self._series: dict[tuple[Counter | Histogram, tuple[str, ...]], Any] = {}

    def _child(self, metric: Counter | Histogram, labels: tuple[str, ...]) -> Any:
        key = (metric, labels)
        child = self._series.get(key)
        if child is None:
            child = self._series[key] = metric.labels(*labels)
        return child

    def decided(self, policy: str, seconds: float) -> None:
        """Time from a request's body to its decision."""
        TALLY.observe(self._child(DECISION_SECONDS, (policy,)), seconds)

    def scored(self, bundle: str, seconds: float) -> None:
        """Time the router model took for one request."""
        TALLY.observe(self._child(CLASSIFIER_SECONDS, (bundle,)), seconds)

    def record(
        self, policy: str, chosen: str, served: str, outcome: str, usage: Usage, cost: float
    ) -> None:
        """Count one finished response."""
        TALLY.add(self._child(RESPONSES, (policy, served, outcome)))
        if usage.input_tokens:
            TALLY.add(self._child(TOKENS, (policy, served, "input")), usage.input_tokens)
        if usage.output_tokens:
            TALLY.add(self._child(TOKENS, (policy, served, "output")), usage.output_tokens)
        if cost:
            TALLY.add(self._child(COST, (policy, served)), cost)
        if served != chosen:
            TALLY.add(self._child(FALLBACKS, (policy, chosen, served)))


def _attribute(message: ep.ProcessingRequest, name: str) -> str:
    attributes = message.attributes.get(EXTPROC_FILTER)
    if attributes is None:
        return ""
    value = attributes.fields.get(name)
    if value is None:
        return ""
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        return str(int(value.number_value))
    return value.string_value if kind == "string_value" else ""


class ResponseAccount:
    """The response side of one routed request."""

    __slots__ = (
        "chosen",
        "done",
        "ledger",
        "meter",
        "models",
        "policy",
        "reservation",
        "served",
        "status",
    )

    def __init__(
        self,
        ledger: Ledger,
        config: CompiledConfig,
        target: CompiledPolicy | ModelRoute,
        decision: Decision,
        request: ParsedRequest,
        strip: bool,
        reservation: Reservation | None = None,
    ) -> None:
        self.ledger = ledger
        self.reservation = reservation  # the key's budgets and rate limits (limits.py)
        self.policy = decision.policy
        self.chosen = decision.model
        self.models: Mapping[str, ModelRoute] = (
            target.models if isinstance(target, CompiledPolicy) else config.models_by_name
        )
        self.meter = UsageMeter(request.stream, strip, request.prompt_tokens)
        self.served: ModelRoute | None = None
        self.status = 0
        self.done = False

    def body(self, message: ep.ProcessingRequest) -> ep.ProcessingResponse:
        """Answer one response body chunk: unchanged, or without what the client did not ask
        for; the last one carries the usage as dynamic metadata."""
        if self.served is None:
            name = _attribute(message, SERVED_MODEL_ATTRIBUTE)
            self.served = self.models.get(name, self.chosen) if name else self.chosen
            status = _attribute(message, STATUS_ATTRIBUTE)
            self.status = int(status) if status.isdigit() else 0
        chunk = message.response_body
        replacement = self.meter.feed(chunk.body, chunk.end_of_stream)
        last = chunk.end_of_stream or self.meter.complete
        if replacement is None and not last:
            return BODY_CONTINUE
        response = ep.ProcessingResponse()
        common = response.response_body.response
        if replacement is not None:
            if replacement:
                common.body_mutation.body = replacement
            else:
                common.body_mutation.clear_body = True
        else:
            response.response_body.SetInParent()
        if last:
            usage, cost = self.finish(complete=True)
            meta = response.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value.fields
            served = self.served or self.chosen
            meta["served_model"].string_value = served.name
            meta["served_upstream_model"].string_value = served.upstream_model
            meta["input_tokens"].number_value = usage.input_tokens
            meta["output_tokens"].number_value = usage.output_tokens
            meta["cost_usd"].number_value = cost
            if usage.estimated:
                meta["usage_estimated"].bool_value = True
        return response

    def finish(self, complete: bool) -> tuple[Usage, float]:
        """Record the response once: ``complete`` when its body ended normally."""
        self.done = True
        served = self.served or self.chosen
        if self.status >= 400:
            outcome = "error"
            usage = self.meter.result()
            if usage.estimated:  # an error body reports no usage: nothing was generated
                usage = Usage(0, 0, estimated=False)
        else:
            outcome = "complete" if complete else "incomplete"
            usage = self.meter.result()
        cost = served.estimated_cost(usage.input_tokens, usage.output_tokens)
        self.ledger.record(self.policy, self.chosen.name, served.name, outcome, usage, cost)
        if self.reservation is not None:
            self.reservation.settle(usage.input_tokens, usage.output_tokens, cost)
        return usage, cost
