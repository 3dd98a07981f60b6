"""``POST /v1/feedback``: a client scores a request the gateway recorded.

::

    {"request_id": "<x-request-id of the response>", "score": 0.8}
    {"request_id": "...", "score": 1, "model": "standard", "comment": "..."}

``score`` is a number in [0, 1] (1: the best outcome); ``model`` (optional) names the model the
score is for, by default the one the request was routed to; ``comment`` (optional, a string) is
accepted and not stored. Any other field is ignored. The gateway cannot know whether another
worker or replica recorded the id, so any well-formed id is accepted (an id nothing recorded
joins nothing). Bad input gets a 400 naming the field; the answer is
``200 {"status": "recorded"}``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import orjson

from switchyard.extproc.errors import GatewayError, invalid_request

MAX_BODY_BYTES = 16 * 1024
MAX_ID_CHARS = 128
MAX_MODEL_CHARS = 253
MAX_COMMENT_CHARS = 4096
_ID = re.compile(r"[\x21-\x7e]+")  # visible ASCII: what x-request-id values are
RECORDED_BODY = orjson.dumps({"status": "recorded"})


@dataclass(frozen=True, slots=True)
class Feedback:
    request_id: str
    score: float
    model: str | None


def parse_feedback(body: bytes) -> Feedback:
    """The feedback in ``body``, or a 4xx ``GatewayError`` naming what is wrong."""
    if len(body) > MAX_BODY_BYTES:
        raise GatewayError(
            413,
            f"the feedback body is {len(body)} bytes; at most {MAX_BODY_BYTES} are accepted",
            code="request_too_large",
        )
    if not body.strip():
        raise invalid_request("the request body is empty; send a JSON object", code="empty_body")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise invalid_request("the body is not valid JSON", code="invalid_json") from None
    if not isinstance(doc, dict):
        raise invalid_request("the body must be a JSON object", code="invalid_json")
    rid = doc.get("request_id")
    if not isinstance(rid, str) or not rid:
        raise invalid_request(
            "request_id is required: the x-request-id header of the response", param="request_id"
        )
    if len(rid) > MAX_ID_CHARS or not _ID.fullmatch(rid):
        raise invalid_request(
            f"request_id must be at most {MAX_ID_CHARS} visible ASCII characters",
            param="request_id",
        )
    score = doc.get("score")
    if (
        isinstance(score, bool)
        or not isinstance(score, int | float)
        or not math.isfinite(score)
        or not 0.0 <= score <= 1.0
    ):
        raise invalid_request("score is required: a number in [0, 1]", param="score")
    model = doc.get("model")
    if model is not None and (
        not isinstance(model, str) or not model.strip() or len(model) > MAX_MODEL_CHARS
    ):
        raise invalid_request(
            f"model must be a non-empty string of at most {MAX_MODEL_CHARS} characters",
            param="model",
        )
    comment = doc.get("comment")
    if comment is not None and (not isinstance(comment, str) or len(comment) > MAX_COMMENT_CHARS):
        raise invalid_request(
            f"comment must be a string of at most {MAX_COMMENT_CHARS} characters",
            param="comment",
        )
    return Feedback(rid, float(score), model)
