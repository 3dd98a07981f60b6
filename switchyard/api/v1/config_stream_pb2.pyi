from switchyard.api.v1 import routing_pb2 as _routing_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PolicyError(_message.Message):
    __slots__ = ("policy", "message")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    policy: str
    message: str
    def __init__(self, policy: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ConfigAck(_message.Message):
    __slots__ = ("node", "version", "error", "policy_errors")
    NODE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    POLICY_ERRORS_FIELD_NUMBER: _ClassVar[int]
    node: str
    version: str
    error: str
    policy_errors: _containers.RepeatedCompositeFieldContainer[PolicyError]
    def __init__(self, node: _Optional[str] = ..., version: _Optional[str] = ..., error: _Optional[str] = ..., policy_errors: _Optional[_Iterable[_Union[PolicyError, _Mapping]]] = ...) -> None: ...
