"""Request header lists (RFC 9113 §8.2, §8.3): the checks a server makes, and gRPC replies."""

from __future__ import annotations

from urllib.parse import quote

from switchyard.extproc.h2.hpack import literal

GRPC_OK, GRPC_RESOURCE_EXHAUSTED, GRPC_UNIMPLEMENTED, GRPC_INTERNAL = 0, 8, 12, 13

_PSEUDO = frozenset((":method", ":scheme", ":authority", ":path"))
_CONNECTION_SPECIFIC = frozenset(
    ("connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade")
)

# ":status: 200" is static entry 8; content-type is static name 31 (literal, not indexed).
RESPONSE_HEADERS = b"\x88\x0f\x10\x10application/grpc"
OK_TRAILERS = literal(b"grpc-status", b"0")


class Malformed(Exception):
    """A malformed request or trailer section: a stream error (PROTOCOL_ERROR)."""


def request_target(headers: list[tuple[str, str]]) -> tuple[str | None, int | None]:
    """The :path (None for CONNECT) and content-length of a request's header list."""
    pseudo: set[str] = set()
    regular = False
    path = method = scheme = None
    length: int | None = None
    for name, value in headers:
        if name[:1] == ":":
            if regular or name in pseudo or name not in _PSEUDO:
                raise Malformed(name)
            pseudo.add(name)
            if name == ":path":
                path = value
            elif name == ":method":
                method = value
            elif name == ":scheme":
                scheme = value
            continue
        regular = True
        _check_field(name, value)
        if name == "content-length":
            if not value.isdigit() or (length is not None and int(value) != length):
                raise Malformed(name)
            length = int(value)
    if method is None:
        raise Malformed(":method")
    if method == "CONNECT":
        return None, length
    if scheme is None or not path:
        raise Malformed(":path" if scheme else ":scheme")
    return path, length


def check_trailers(headers: list[tuple[str, str]]) -> None:
    """Trailers carry no pseudo-header fields (§8.1)."""
    for name, value in headers:
        if name[:1] == ":":
            raise Malformed(name)
        _check_field(name, value)


def _check_field(name: str, value: str) -> None:
    if name != name.lower() or name in _CONNECTION_SPECIFIC:
        raise Malformed(name)
    if name == "te" and value != "trailers":
        raise Malformed(name)


def error_headers(status: int, message: str) -> bytes:
    """A trailers-only gRPC error: :status 200, content-type, grpc-status and grpc-message."""
    text = quote(message, safe=" !#$&'()*+,-./:;=?@[]^_`{|}~")[:120].encode()
    return (
        RESPONSE_HEADERS
        + literal(b"grpc-status", str(status).encode())
        + literal(b"grpc-message", text)
    )
