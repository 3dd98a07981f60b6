"""spec.personalData end to end in one process: the schema and compiler, the engine's
raise-only data class, and the processor's route and redact actions."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest
from conftest import compile_docs
from test_processor import body_msg, error_of, headers_msg, run, state_for
from test_tracing_config import _route, _spans, _tracer, traceparent

from switchyard.api.v1 import routing_pb2 as pb
from switchyard.extproc.config import CompiledConfig, CompiledPolicy
from switchyard.extproc.engine import decide, exclusions, select_target
from switchyard.extproc.errors import GatewayError
from switchyard.extproc.request import Endpoint, ParsedRequest, parse_request, screen
from switchyard.extproc.scoring import RouterScores
from switchyard.operator.compiler import compile_policy
from switchyard.operator.policy import PolicyError, parse_policy

EMAIL = "maria.lopez@example.com"
PROMPT = f"Summarise the contract and send it to {EMAIL}"
HARD = RouterScores(difficulty=0.99, category="reasoning", categories={"reasoning": 1.0})


def with_personal_data(doc: dict[str, Any], **spec: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    doc["spec"]["personalData"] = spec
    return doc


def screened(config: CompiledConfig, prompt: str, model: str = "auto") -> ParsedRequest:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    request = parse_request(Endpoint.CHAT, orjson.dumps(body))
    target = select_target(config, request, {})
    assert target.personal_data is not None
    screen(request, target.personal_data.scanner, target.personal_data.redact)
    return request


def policy(config: CompiledConfig) -> CompiledPolicy:
    request = parse_request(Endpoint.COMPLETIONS, b'{"model": "auto", "prompt": ""}')
    target = select_target(config, request, {})
    assert isinstance(target, CompiledPolicy)
    return target


# ---- schema and compiler ----------------------------------------------------------------------


def test_detection_is_on_by_default_with_every_detector(policy_doc: dict[str, Any]) -> None:
    compiled = compile_policy(parse_policy(policy_doc)).personal_data
    assert list(compiled.detectors) == [
        "email", "phone", "payment-card", "iban", "us-ssn", "uk-nino", "de-tax-id", "es-dni"
    ]  # fmt: skip
    assert compiled.action == pb.PersonalData.ROUTE
    assert compiled.data_class == "pii"
    assert list(compiled.raise_from) == ["internal", "public"]


def test_detection_off_compiles_to_no_rule(policy_doc: dict[str, Any]) -> None:
    config = compile_docs(with_personal_data(policy_doc, detect=False))
    assert policy(config).personal_data is None
    assert all(m.personal_data is None for m in policy(config).models.values())


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"detectors": ["email", "passport"]}, "spec.personalData.detectors.1"),
        ({"detectors": []}, "spec.personalData.detectors"),
        ({"detectors": ["email", "email"]}, "detectors must not repeat"),
        ({"action": "drop"}, "spec.personalData.action"),
        ({"raiseFrom": ["public", "pii"]}, "raiseFrom must not contain dataClass"),
        ({"dataClass": "Not A Label"}, "spec.personalData.dataClass"),
    ],
)
def test_invalid_personal_data_names_the_field(
    policy_doc: dict[str, Any], spec: dict[str, Any], message: str
) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_policy(with_personal_data(policy_doc, **spec))


# ---- the engine: raise only ------------------------------------------------------------------


def test_pii_without_the_header_goes_only_to_a_model_allowing_pii(
    policy_doc: dict[str, Any],
) -> None:
    config = compile_docs(policy_doc)
    request = screened(config, PROMPT)
    assert request.personal_data == "email" and not request.redacted
    decision = decide(policy(config), request, {}, HARD)
    assert decision.model.name == "light"  # the hard prompt would go to capable otherwise
    assert decision.reason.endswith(", constrained, pii: email")
    assert EMAIL not in decision.reason
    why = exclusions(policy(config), request, {})
    assert why["capable"] == "data class pii not allowed"
    assert why["light"] == ""


def test_a_prompt_without_personal_data_is_routed_as_before(policy_doc: dict[str, Any]) -> None:
    config = compile_docs(policy_doc)
    request = screened(config, "Summarise the contract")
    assert request.personal_data == ""
    decision = decide(policy(config), request, {}, HARD)
    assert decision.model.name == "capable"
    assert "pii" not in decision.reason


@pytest.mark.parametrize(
    ("declared", "model"),
    [
        ("public", "light"),
        ("internal", "light"),  # raised too (the default raiseFrom)
        ("pii", "light"),  # already pii: stays
    ],
)
def test_declared_classes_are_raised_never_lowered(
    policy_doc: dict[str, Any], declared: str, model: str
) -> None:
    config = compile_docs(policy_doc)
    headers = {"x-switchyard-data-class": declared}
    assert decide(policy(config), screened(config, PROMPT), headers, HARD).model.name == model


def test_a_stricter_declared_class_is_kept(policy_doc: dict[str, Any]) -> None:
    doc = copy.deepcopy(policy_doc)
    doc["spec"]["models"][2]["dataClasses"] = ["public", "secret"]  # capable takes secret
    config = compile_docs(doc)
    headers = {"x-switchyard-data-class": "secret"}
    decision = decide(policy(config), screened(config, PROMPT), headers, HARD)
    assert decision.model.name == "capable"  # not lowered (or moved) to pii
    assert decision.reason.endswith("pii: email")


def test_no_model_allowing_the_raised_class_is_403_naming_the_detector(
    policy_doc: dict[str, Any],
) -> None:
    config = compile_docs(with_personal_data(policy_doc, dataClass="restricted"))
    with pytest.raises(GatewayError) as info:
        decide(policy(config), screened(config, PROMPT), {}, HARD)
    assert info.value.status == 403
    assert info.value.code == "data_class_not_allowed"
    assert "personal data detected: email" in str(info.value.body())
    assert EMAIL.encode() not in info.value.body()


def test_a_model_named_directly_is_checked_too(policy_doc: dict[str, Any]) -> None:
    config = compile_docs(policy_doc)
    capable = screened(config, PROMPT, model="capable")
    with pytest.raises(GatewayError) as info:
        decide(select_target(config, capable, {}), capable, {}, None)
    assert info.value.code == "data_class_not_allowed"
    light = screened(config, PROMPT, model="light")
    decision = decide(select_target(config, light, {}), light, {}, None)
    assert decision.reason == "direct: model named in request, pii: email"


def test_a_custom_raise_list(policy_doc: dict[str, Any]) -> None:
    config = compile_docs(with_personal_data(policy_doc, raiseFrom=["public"]))
    headers = {"x-switchyard-data-class": "internal"}
    assert decide(policy(config), screened(config, PROMPT), headers, HARD).model.name == "capable"


# ---- redact ---------------------------------------------------------------------------------


def test_redact_rewrites_every_text_and_keeps_the_class(policy_doc: dict[str, Any]) -> None:
    config = compile_docs(with_personal_data(policy_doc, action="redact"))
    body = {
        "model": "auto",
        "messages": [
            {"role": "system", "content": "Customer card: 4111 1111 1111 1111."},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "mail", "arguments": f'{{"to": "{EMAIL}"}}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "sent"},
            {"role": "user", "content": [{"type": "text", "text": f"Reply to {EMAIL}"}]},
        ],
    }
    request = parse_request(Endpoint.CHAT, orjson.dumps(body))
    rule = policy(config).personal_data
    assert rule is not None
    screen(request, rule.scanner, rule.redact)
    assert request.redacted and request.personal_data == "payment-card"
    messages = request.payload["messages"]
    assert messages[0]["content"] == "Customer card: [REDACTED:payment-card]."
    arguments = messages[1]["tool_calls"][0]["function"]["arguments"]
    assert orjson.loads(arguments) == {"to": "[REDACTED:email]"}
    assert messages[3]["content"][0]["text"] == "Reply to [REDACTED:email]"
    decision = decide(policy(config), request, {}, HARD)
    assert decision.model.name == "capable"  # the class stays public
    assert decision.reason.endswith(", pii redacted: payment-card")


def test_redact_covers_completion_prompts(policy_doc: dict[str, Any]) -> None:
    config = compile_docs(with_personal_data(policy_doc, action="redact"))
    body = {"model": "auto", "prompt": ["no pii here", f"mail {EMAIL}"]}
    request = parse_request(Endpoint.COMPLETIONS, orjson.dumps(body))
    rule = policy(config).personal_data
    assert rule is not None
    screen(request, rule.scanner, rule.redact)
    assert request.payload["prompt"] == ["no pii here", "mail [REDACTED:email]"]


# ---- the processor ---------------------------------------------------------------------------


def _meta(response: Any) -> dict[str, Any]:
    fields = response.dynamic_metadata.fields["switchyard"].struct_value.fields
    return {k: v.string_value for k, v in fields.items()}


async def test_processor_routes_pii_to_the_pii_model(policy_doc: dict[str, Any]) -> None:
    hard = (
        "Prove rigorously, step by step, that the integral of a polynomial is a polynomial, "
        f"then implement the algorithm in python; mail the result to {EMAIL}."
    )
    body = orjson.dumps({"model": "auto", "messages": [{"role": "user", "content": hard}]})
    responses = await run(state_for(policy_doc), headers_msg(), body_msg(body))
    meta = _meta(responses[1])
    assert meta["model"] == "light"
    assert meta["reason"].endswith("pii: email")
    assert all(EMAIL not in value for value in meta.values())
    sent = orjson.loads(responses[1].request_body.response.body_mutation.body)
    assert EMAIL in sent["messages"][0]["content"]  # routed, not altered


async def test_processor_redacts_the_body_sent_upstream(policy_doc: dict[str, Any]) -> None:
    doc = with_personal_data(policy_doc, action="redact")
    body = orjson.dumps({"model": "light", "messages": [{"role": "user", "content": PROMPT}]})
    responses = await run(state_for(doc), headers_msg(), body_msg(body))
    mutation = responses[1].request_body.response.body_mutation.body
    assert EMAIL.encode() not in mutation
    sent = orjson.loads(mutation)
    assert (
        sent["messages"][0]["content"] == "Summarise the contract and send it to [REDACTED:email]"
    )
    assert _meta(responses[1])["reason"].endswith("pii redacted: email")


async def test_processor_403_when_no_model_may_see_it(policy_doc: dict[str, Any]) -> None:
    body = orjson.dumps({"model": "capable", "messages": [{"role": "user", "content": PROMPT}]})
    responses = await run(state_for(policy_doc), headers_msg(), body_msg(body))
    status, error = error_of(responses[1])
    assert (status, error["code"]) == (403, "data_class_not_allowed")
    assert "email" in error["message"] and EMAIL not in error["message"]


async def test_the_route_span_names_the_detector_never_the_text() -> None:
    tracer, exporter = _tracer()
    body = {"model": "auto", "messages": [{"role": "user", "content": PROMPT}]}
    await _route(tracer, traceparent(), body)
    (span,) = _spans(tracer, exporter)
    attrs = dict(span.attributes or {})
    assert str(attrs["switchyard.reason"]).endswith("pii: email")
    assert attrs["switchyard.model"] == "light"
    assert "capable: data class pii not allowed" in list(attrs["switchyard.excluded"])  # type: ignore[arg-type]
    assert not any(EMAIL in str(v) for v in attrs.values())
