from google.protobuf import struct_pb2 as _struct_pb2
from lvlm_attribution.api.v1 import explain_pb2 as _explain_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MethodInfo(_message.Message):
    __slots__ = ("name", "summary", "is_default", "default_settings", "cost_limits")
    class CostLimitsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_SETTINGS_FIELD_NUMBER: _ClassVar[int]
    COST_LIMITS_FIELD_NUMBER: _ClassVar[int]
    name: str
    summary: str
    is_default: bool
    default_settings: _struct_pb2.Struct
    cost_limits: _containers.ScalarMap[str, float]
    def __init__(self, name: _Optional[str] = ..., summary: _Optional[str] = ..., is_default: _Optional[bool] = ..., default_settings: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., cost_limits: _Optional[_Mapping[str, float]] = ...) -> None: ...

class RequestLimits(_message.Message):
    __slots__ = ("max_image_bytes", "max_image_pixels", "max_aspect_ratio", "max_question_chars", "max_answer_chars", "max_answer_tokens", "max_new_tokens_cap", "default_max_new_tokens", "max_overlay_side", "request_deadline_s", "max_response_bytes", "max_request_bytes")
    MAX_IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_ASPECT_RATIO_FIELD_NUMBER: _ClassVar[int]
    MAX_QUESTION_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_ANSWER_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_ANSWER_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_CAP_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_OVERLAY_SIDE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    MAX_RESPONSE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_image_bytes: int
    max_image_pixels: int
    max_aspect_ratio: float
    max_question_chars: int
    max_answer_chars: int
    max_answer_tokens: int
    max_new_tokens_cap: int
    default_max_new_tokens: int
    max_overlay_side: int
    request_deadline_s: float
    max_response_bytes: int
    max_request_bytes: int
    def __init__(self, max_image_bytes: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., max_aspect_ratio: _Optional[float] = ..., max_question_chars: _Optional[int] = ..., max_answer_chars: _Optional[int] = ..., max_answer_tokens: _Optional[int] = ..., max_new_tokens_cap: _Optional[int] = ..., default_max_new_tokens: _Optional[int] = ..., max_overlay_side: _Optional[int] = ..., request_deadline_s: _Optional[float] = ..., max_response_bytes: _Optional[int] = ..., max_request_bytes: _Optional[int] = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("model", "methods", "default_methods", "limits")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_METHODS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    model: _explain_pb2.ModelInfo
    methods: _containers.RepeatedCompositeFieldContainer[MethodInfo]
    default_methods: _containers.RepeatedScalarFieldContainer[str]
    limits: RequestLimits
    def __init__(self, model: _Optional[_Union[_explain_pb2.ModelInfo, _Mapping]] = ..., methods: _Optional[_Iterable[_Union[MethodInfo, _Mapping]]] = ..., default_methods: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[RequestLimits, _Mapping]] = ...) -> None: ...
