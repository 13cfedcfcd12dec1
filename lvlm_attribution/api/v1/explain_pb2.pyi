from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HeatmapEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HEATMAP_ENCODING_UNSPECIFIED: _ClassVar[HeatmapEncoding]
    HEATMAP_ENCODING_PNG_U8: _ClassVar[HeatmapEncoding]
    HEATMAP_ENCODING_F16_ZLIB: _ClassVar[HeatmapEncoding]
HEATMAP_ENCODING_UNSPECIFIED: HeatmapEncoding
HEATMAP_ENCODING_PNG_U8: HeatmapEncoding
HEATMAP_ENCODING_F16_ZLIB: HeatmapEncoding

class GenerationOptions(_message.Message):
    __slots__ = ("max_new_tokens",)
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    def __init__(self, max_new_tokens: _Optional[int] = ...) -> None: ...

class HeatmapOptions(_message.Message):
    __slots__ = ("per_token_maps", "encoding", "overlay", "faithfulness")
    PER_TOKEN_MAPS_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_FIELD_NUMBER: _ClassVar[int]
    FAITHFULNESS_FIELD_NUMBER: _ClassVar[int]
    per_token_maps: bool
    encoding: HeatmapEncoding
    overlay: bool
    faithfulness: bool
    def __init__(self, per_token_maps: _Optional[bool] = ..., encoding: _Optional[_Union[HeatmapEncoding, str]] = ..., overlay: _Optional[bool] = ..., faithfulness: _Optional[bool] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("image", "question", "answer", "methods", "generation", "heatmaps", "request_id", "method_settings", "stream", "timeout_ms")
    class MethodSettingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _struct_pb2.Struct
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    HEATMAPS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_SETTINGS_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    question: str
    answer: str
    methods: _containers.RepeatedScalarFieldContainer[str]
    generation: GenerationOptions
    heatmaps: HeatmapOptions
    request_id: str
    method_settings: _containers.MessageMap[str, _struct_pb2.Struct]
    stream: bool
    timeout_ms: int
    def __init__(self, image: _Optional[bytes] = ..., question: _Optional[str] = ..., answer: _Optional[str] = ..., methods: _Optional[_Iterable[str]] = ..., generation: _Optional[_Union[GenerationOptions, _Mapping]] = ..., heatmaps: _Optional[_Union[HeatmapOptions, _Mapping]] = ..., request_id: _Optional[str] = ..., method_settings: _Optional[_Mapping[str, _struct_pb2.Struct]] = ..., stream: _Optional[bool] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class Token(_message.Message):
    __slots__ = ("index", "id", "text", "probability", "llr", "weights", "grounded")
    class WeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    LLR_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    GROUNDED_FIELD_NUMBER: _ClassVar[int]
    index: int
    id: int
    text: str
    probability: float
    llr: float
    weights: _containers.ScalarMap[str, float]
    grounded: bool
    def __init__(self, index: _Optional[int] = ..., id: _Optional[int] = ..., text: _Optional[str] = ..., probability: _Optional[float] = ..., llr: _Optional[float] = ..., weights: _Optional[_Mapping[str, float]] = ..., grounded: _Optional[bool] = ...) -> None: ...

class EncodedMap(_message.Message):
    __slots__ = ("data", "min_value", "max_value")
    DATA_FIELD_NUMBER: _ClassVar[int]
    MIN_VALUE_FIELD_NUMBER: _ClassVar[int]
    MAX_VALUE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    min_value: float
    max_value: float
    def __init__(self, data: _Optional[bytes] = ..., min_value: _Optional[float] = ..., max_value: _Optional[float] = ...) -> None: ...

class Heatmap(_message.Message):
    __slots__ = ("method", "height", "width", "encoding", "min_value", "max_value", "data", "per_token", "overlay_png", "deletion_auc", "insertion_auc")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    MIN_VALUE_FIELD_NUMBER: _ClassVar[int]
    MAX_VALUE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_PNG_FIELD_NUMBER: _ClassVar[int]
    DELETION_AUC_FIELD_NUMBER: _ClassVar[int]
    INSERTION_AUC_FIELD_NUMBER: _ClassVar[int]
    method: str
    height: int
    width: int
    encoding: HeatmapEncoding
    min_value: float
    max_value: float
    data: bytes
    per_token: _containers.RepeatedCompositeFieldContainer[EncodedMap]
    overlay_png: bytes
    deletion_auc: float
    insertion_auc: float
    def __init__(self, method: _Optional[str] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., encoding: _Optional[_Union[HeatmapEncoding, str]] = ..., min_value: _Optional[float] = ..., max_value: _Optional[float] = ..., data: _Optional[bytes] = ..., per_token: _Optional[_Iterable[_Union[EncodedMap, _Mapping]]] = ..., overlay_png: _Optional[bytes] = ..., deletion_auc: _Optional[float] = ..., insertion_auc: _Optional[float] = ...) -> None: ...

class PromptSaliency(_message.Message):
    __slots__ = ("method", "tokens", "weights")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    method: str
    tokens: _containers.RepeatedScalarFieldContainer[str]
    weights: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, method: _Optional[str] = ..., tokens: _Optional[_Iterable[str]] = ..., weights: _Optional[_Iterable[float]] = ...) -> None: ...

class Grounding(_message.Message):
    __slots__ = ("score", "flagged_tokens", "rule")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    score: float
    flagged_tokens: _containers.RepeatedScalarFieldContainer[int]
    rule: str
    def __init__(self, score: _Optional[float] = ..., flagged_tokens: _Optional[_Iterable[int]] = ..., rule: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class ImageSize(_message.Message):
    __slots__ = ("width", "height")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class ImageBox(_message.Message):
    __slots__ = ("left", "top", "right", "bottom")
    LEFT_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    RIGHT_FIELD_NUMBER: _ClassVar[int]
    BOTTOM_FIELD_NUMBER: _ClassVar[int]
    left: float
    top: float
    right: float
    bottom: float
    def __init__(self, left: _Optional[float] = ..., top: _Optional[float] = ..., right: _Optional[float] = ..., bottom: _Optional[float] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("request_id", "answer", "audit_mode", "tokens", "heatmaps", "prompt_saliency", "grounding", "timings", "model", "method_settings", "image_size", "part", "warnings", "visual_box", "error")
    class Part(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        PART_UNSPECIFIED: _ClassVar[ExplainResponse.Part]
        PART_ANSWER: _ClassVar[ExplainResponse.Part]
        PART_COMPLETE: _ClassVar[ExplainResponse.Part]
        PART_ERROR: _ClassVar[ExplainResponse.Part]
    PART_UNSPECIFIED: ExplainResponse.Part
    PART_ANSWER: ExplainResponse.Part
    PART_COMPLETE: ExplainResponse.Part
    PART_ERROR: ExplainResponse.Part
    class TimingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class MethodSettingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _struct_pb2.Struct
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    AUDIT_MODE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    HEATMAPS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_SALIENCY_FIELD_NUMBER: _ClassVar[int]
    GROUNDING_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    METHOD_SETTINGS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    VISUAL_BOX_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    answer: str
    audit_mode: bool
    tokens: _containers.RepeatedCompositeFieldContainer[Token]
    heatmaps: _containers.RepeatedCompositeFieldContainer[Heatmap]
    prompt_saliency: PromptSaliency
    grounding: Grounding
    timings: _containers.ScalarMap[str, float]
    model: ModelInfo
    method_settings: _containers.MessageMap[str, _struct_pb2.Struct]
    image_size: ImageSize
    part: ExplainResponse.Part
    warnings: _containers.RepeatedScalarFieldContainer[str]
    visual_box: ImageBox
    error: Error
    def __init__(self, request_id: _Optional[str] = ..., answer: _Optional[str] = ..., audit_mode: _Optional[bool] = ..., tokens: _Optional[_Iterable[_Union[Token, _Mapping]]] = ..., heatmaps: _Optional[_Iterable[_Union[Heatmap, _Mapping]]] = ..., prompt_saliency: _Optional[_Union[PromptSaliency, _Mapping]] = ..., grounding: _Optional[_Union[Grounding, _Mapping]] = ..., timings: _Optional[_Mapping[str, float]] = ..., model: _Optional[_Union[ModelInfo, _Mapping]] = ..., method_settings: _Optional[_Mapping[str, _struct_pb2.Struct]] = ..., image_size: _Optional[_Union[ImageSize, _Mapping]] = ..., part: _Optional[_Union[ExplainResponse.Part, str]] = ..., warnings: _Optional[_Iterable[str]] = ..., visual_box: _Optional[_Union[ImageBox, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("http_status", "grpc_code", "field", "message")
    HTTP_STATUS_FIELD_NUMBER: _ClassVar[int]
    GRPC_CODE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    http_status: int
    grpc_code: str
    field: str
    message: str
    def __init__(self, http_status: _Optional[int] = ..., grpc_code: _Optional[str] = ..., field: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...
