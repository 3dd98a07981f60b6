"""Small constructors shared by the Envoy resource builders (typed xds-protos messages)."""

from __future__ import annotations

from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as http_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2, wrappers_pb2
from google.protobuf.message import Message

OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
ADD_IF_ABSENT = base_pb2.HeaderValueOption.ADD_IF_ABSENT


def packed(message: Message) -> any_pb2.Any:
    """``message`` as an Any, serialized deterministically (its maps in key order), so equal
    configs pack to equal bytes and version hashes do not churn."""
    result = any_pb2.Any()
    result.Pack(message, deterministic=True)
    return result


def millis(ms: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def seconds(value: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=value)


def u32(value: int) -> wrappers_pb2.UInt32Value:
    return wrappers_pb2.UInt32Value(value=value)


def struct(fields: dict[str, Any]) -> struct_pb2.Struct:
    result = struct_pb2.Struct()
    result.update(fields)
    return result


def header(key: str, value: str, action: int = OVERWRITE) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value), append_action=action
    )


def inline(text: str) -> base_pb2.DataSource:
    return base_pb2.DataSource(inline_string=text)


def protocol_options(options: http_pb2.HttpProtocolOptions) -> dict[str, any_pb2.Any]:
    """A cluster's ``typed_extension_protocol_options`` holding ``options``."""
    return {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": packed(options)}
