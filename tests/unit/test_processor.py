"""The ext_proc stream logic, driven with real ext_proc protobuf messages."""

from __future__ import annotations

from typing import Any

import orjson
from conftest import compile_docs
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from switchyard.extproc.processor import Processor
from switchyard.extproc.scoring import HeuristicScorer
from switchyard.extproc.state import RuntimeState


def headers_msg(
    method: str = "POST", path: str = "/v1/chat/completions", eos: bool = False, **extra: str
) -> ep.ProcessingRequest:
    values = {":method": method, ":path": path, "content-type": "application/json", **extra}
    return ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(
            headers=HeaderMap(
                headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in values.items()]
            ),
            end_of_stream=eos,
        )
    )


def body_msg(body: bytes) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=True))


async def run(state: RuntimeState, *messages: ep.ProcessingRequest) -> list[ep.ProcessingResponse]:
    """One ext_proc stream through the wire-level handler, until it ends the call."""
    processor = Processor(state)
    stream = processor.open()
    responses = []
    for message in messages:
        raw, done = await processor.message(stream, message.SerializeToString())
        responses.append(ep.ProcessingResponse.FromString(raw))
        if done:
            break
    return responses


def state_for(policy_doc: dict[str, Any]) -> RuntimeState:
    state = RuntimeState(scorer_loader=lambda _bundle: HeuristicScorer())
    config = compile_docs(policy_doc)
    state.swap((config, {b: HeuristicScorer() for b in config.router_bundles}))
    return state


def error_of(response: ep.ProcessingResponse) -> tuple[int, dict[str, Any]]:
    assert response.WhichOneof("response") == "immediate_response"
    reply = response.immediate_response
    return reply.status.code, orjson.loads(reply.body)["error"]


async def test_routes_and_rewrites_body(policy_doc: dict[str, Any]) -> None:
    body = orjson.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi"}]})
    responses = await run(state_for(policy_doc), headers_msg(), body_msg(body))
    assert [r.WhichOneof("response") for r in responses] == ["request_headers", "request_body"]
    common = responses[1].request_body.response
    assert common.clear_route_cache
    new_body = orjson.loads(common.body_mutation.body)
    assert new_body["model"] == "demo-light-8b"
    assert new_body["messages"] == [{"role": "user", "content": "hi"}]
    meta = responses[1].dynamic_metadata.fields["switchyard"].struct_value.fields
    assert meta["backend"].string_value == "default.default.light"
    assert meta["model"].string_value == "light"
    assert meta["policy"].string_value == "default/default"
    assert meta["reason"].string_value.startswith("classifier")


async def test_hard_prompt_goes_to_a_stronger_model(policy_doc: dict[str, Any]) -> None:
    prompt = (
        "Prove rigorously, step by step, that the integral of a polynomial is a polynomial, "
        "then implement the algorithm in python and analyze its edge cases."
    )
    body = orjson.dumps({"model": "auto", "messages": [{"role": "user", "content": prompt}]})
    responses = await run(state_for(policy_doc), headers_msg(), body_msg(body))
    meta = responses[1].dynamic_metadata.fields["switchyard"].struct_value.fields
    assert meta["backend"].string_value == "default.default.capable"


async def test_bad_json_is_an_immediate_400(policy_doc: dict[str, Any]) -> None:
    responses = await run(state_for(policy_doc), headers_msg(), body_msg(b'{"model": '))
    status, error = error_of(responses[1])
    assert status == 400
    assert error["code"] == "invalid_json"


async def test_unknown_model_is_404(policy_doc: dict[str, Any]) -> None:
    body = orjson.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    status, error = error_of((await run(state_for(policy_doc), headers_msg(), body_msg(body)))[1])
    assert (status, error["code"]) == (404, "model_not_found")


async def test_method_path_and_empty_body_checked_on_headers(policy_doc: dict[str, Any]) -> None:
    state = state_for(policy_doc)
    assert error_of((await run(state, headers_msg(method="GET")))[0])[0] == 405
    assert error_of((await run(state, headers_msg(path="/v1/embeddings")))[0])[0] == 404
    status, error = error_of((await run(state, headers_msg(eos=True)))[0])
    assert (status, error["code"]) == (400, "empty_body")


async def test_engine_crash_becomes_500_not_a_dead_stream(policy_doc: dict[str, Any]) -> None:
    class Broken(HeuristicScorer):
        async def score(self, text: str) -> Any:
            raise RuntimeError("boom")

    state = state_for(policy_doc)
    state.swap((state.config, {b: Broken() for b in state.config.router_bundles}))
    body = orjson.dumps({"model": "auto", "messages": [{"role": "user", "content": "x"}]})
    status, error = error_of((await run(state, headers_msg(), body_msg(body)))[1])
    assert (status, error["type"]) == (500, "server_error")


def body_with_attributes(body: bytes, path: str, **headers: str) -> ep.ProcessingRequest:
    message = body_msg(body)
    fields = message.attributes["envoy.filters.http.ext_proc"]
    fields.update({"request.path": path})
    fields.update({f"request.headers['{k.replace('_', '-')}']": v for k, v in headers.items()})
    return message


async def test_single_message_with_header_attributes(policy_doc: dict[str, Any]) -> None:
    body = orjson.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi"}]})
    message = body_with_attributes(body, "/v1/chat/completions", x_priority="low")
    [response] = await run(state_for(policy_doc), message)
    meta = response.dynamic_metadata.fields["switchyard"].struct_value.fields
    assert meta["reason"].string_value == "rule: low-priority"
    message = body_with_attributes(body, "/v1/chat/completions", x_switchyard_data_class="secret")
    status, error = error_of((await run(state_for(policy_doc), message))[0])
    assert (status, error["code"]) == (403, "data_class_not_allowed")


async def test_completions_endpoint_from_path_attribute(policy_doc: dict[str, Any]) -> None:
    body = orjson.dumps({"model": "auto", "prompt": "Once upon a time"})
    [response] = await run(state_for(policy_doc), body_with_attributes(body, "/v1/completions"))
    assert (
        orjson.loads(response.request_body.response.body_mutation.body)["prompt"]
        == "Once upon a time"
    )
