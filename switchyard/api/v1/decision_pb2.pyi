from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class DecisionRecord(_message.Message):
    __slots__ = ("policy", "model", "backend_key", "upstream_model", "reason", "difficulty", "category", "prompt_tokens", "estimated_cost_usd", "config_version")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_KEY_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_MODEL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DIFFICULTY_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_COST_USD_FIELD_NUMBER: _ClassVar[int]
    CONFIG_VERSION_FIELD_NUMBER: _ClassVar[int]
    policy: str
    model: str
    backend_key: str
    upstream_model: str
    reason: str
    difficulty: float
    category: str
    prompt_tokens: int
    estimated_cost_usd: float
    config_version: str
    def __init__(self, policy: _Optional[str] = ..., model: _Optional[str] = ..., backend_key: _Optional[str] = ..., upstream_model: _Optional[str] = ..., reason: _Optional[str] = ..., difficulty: _Optional[float] = ..., category: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., estimated_cost_usd: _Optional[float] = ..., config_version: _Optional[str] = ...) -> None: ...
