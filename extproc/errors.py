"""OpenAI-style errors: ``{"error": {"message", "type", "code", "param"}}`` with an HTTP status."""

from __future__ import annotations

import orjson


class GatewayError(Exception):
    """A request the gateway answers itself with a 4xx (or 5xx) and an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.type = type_
        self.param = param

    def body(self) -> bytes:
        """The JSON body a client sees."""
        return error_body(self.message, code=self.code, type_=self.type, param=self.param)


def error_body(message: str, *, code: str, type_: str, param: str | None = None) -> bytes:
    """Serialise one OpenAI-style error."""
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "code": code, "param": param}}
    )


def invalid_request(
    message: str, *, param: str | None = None, code: str = "invalid_request"
) -> GatewayError:
    """400 for a request the client must fix."""
    return GatewayError(400, message, code=code, param=param)


def policy_unavailable(model: str, policy: str) -> GatewayError:
    """503 for a name only a policy this gateway could not load answers (not a 404: the name
    is right, the policy is broken; its status says why)."""
    return GatewayError(
        503,
        f"model '{model}' is served by RoutePolicy {policy}, which this gateway could not load; "
        "its status says why",
        code="policy_unavailable",
        type_="server_error",
        param="model",
    )
