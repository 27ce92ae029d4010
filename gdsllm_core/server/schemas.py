"""Request and response bodies of both dialects, as msgspec Structs.

Field names and meanings follow ollama's `api/types.go` and OpenAI's API reference. Unknown request fields are
ignored (msgspec's default); a field of the wrong type or out of range is a 400 in the dialect's error shape."""

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

Probability = Annotated[float, Meta(ge=0.0, le=1.0)]
NonNegativeFloat = Annotated[float, Meta(ge=0.0)]
PositiveInt = Annotated[int, Meta(ge=1)]


# ---- Ollama ------------------------------------------------------------------------------------------------------

class OllamaOptions(msgspec.Struct, kw_only=True):
    """The `options` map: the sampling and context knobs gdsllm honours (others are ignored)."""

    temperature: NonNegativeFloat | None = None
    top_k: Annotated[int, Meta(ge=0)] | None = None
    top_p: Probability | None = None
    min_p: Probability | None = None
    seed: int | None = None
    num_predict: Annotated[int, Meta(ge=-2)] | None = None
    stop: str | list[str] | None = None
    num_ctx: PositiveInt | None = None
    repeat_penalty: NonNegativeFloat | None = None
    repeat_last_n: Annotated[int, Meta(ge=-1)] | None = None


class OllamaGenerateRequest(msgspec.Struct, kw_only=True):
    model: str
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    stream: bool = True
    format: str | dict[str, Any] | None = None
    options: OllamaOptions | None = None
    keep_alive: float | str | None = None
    images: list[str] | None = None
    truncate: bool = False


class OllamaMessage(msgspec.Struct, kw_only=True):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None


class OllamaChatRequest(msgspec.Struct, kw_only=True):
    model: str
    messages: list[OllamaMessage] = []
    stream: bool = True
    format: str | dict[str, Any] | None = None
    options: OllamaOptions | None = None
    keep_alive: float | str | None = None
    tools: list[dict[str, Any]] | None = None
    truncate: bool = False


class OllamaModelRequest(msgspec.Struct, kw_only=True):
    """Body of /api/show and /api/delete: `model` (older clients send `name`)."""

    model: str = ""
    name: str = ""

    @property
    def model_name(self) -> str:
        return self.model or self.name


class OllamaResponseMessage(msgspec.Struct):
    role: str
    content: str


class OllamaGenerateResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    model: str
    created_at: str
    response: str
    done: bool
    done_reason: str | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None
    prompt_truncated: bool | None = None


class OllamaChatResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    model: str
    created_at: str
    message: OllamaResponseMessage
    done: bool
    done_reason: str | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None
    prompt_truncated: bool | None = None


class OllamaModelDetails(msgspec.Struct, kw_only=True):
    parent_model: str = ""
    format: str = "gdsllm"
    family: str
    families: list[str]
    parameter_size: str
    quantization_level: str


class OllamaListedModel(msgspec.Struct, kw_only=True):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: OllamaModelDetails


class OllamaTagsResponse(msgspec.Struct):
    models: list[OllamaListedModel]


class OllamaShowResponse(msgspec.Struct, kw_only=True):
    modelfile: str
    parameters: str
    template: str
    details: OllamaModelDetails
    model_info: dict[str, Any]
    modified_at: str
    capabilities: list[str]


class OllamaRunningModel(msgspec.Struct, kw_only=True):
    name: str
    model: str
    size: int
    size_vram: int
    digest: str
    details: OllamaModelDetails
    expires_at: str | None
    context_length: int | None = None
    stats: dict[str, Any] = {}


class OllamaPsResponse(msgspec.Struct):
    models: list[OllamaRunningModel]


class OllamaVersionResponse(msgspec.Struct):
    version: str


class OllamaError(msgspec.Struct):
    error: str


# ---- OpenAI ------------------------------------------------------------------------------------------------------

class OpenAIContentPart(msgspec.Struct, kw_only=True):
    """One part of a message's content list; only `{"type": "text", "text": ...}` is supported."""

    type: Literal["text"]
    text: str


class OpenAIMessage(msgspec.Struct, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[OpenAIContentPart] | None = None


class OpenAIStreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class OpenAISampling(msgspec.Struct, kw_only=True):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str
    stream: bool = False
    stream_options: OpenAIStreamOptions | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Probability | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None


class OpenAIChatRequest(OpenAISampling, kw_only=True):
    messages: list[OpenAIMessage]
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None


class OpenAICompletionRequest(OpenAISampling, kw_only=True):
    prompt: str | list[str]
    max_tokens: PositiveInt | None = 16
    echo: bool = False


class OpenAIUsage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class OpenAIResponseMessage(msgspec.Struct):
    role: str
    content: str


class OpenAIChatChoice(msgspec.Struct):
    index: int
    message: OpenAIResponseMessage
    finish_reason: str | None
    logprobs: None = None


class OpenAIChatCompletion(msgspec.Struct, kw_only=True):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[OpenAIChatChoice]
    usage: OpenAIUsage


class OpenAIDelta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class OpenAIChunkChoice(msgspec.Struct):
    index: int
    delta: OpenAIDelta
    finish_reason: str | None = None
    logprobs: None = None


class OpenAIChatChunk(msgspec.Struct, kw_only=True):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[OpenAIChunkChoice]
    usage: OpenAIUsage | None = None


class OpenAICompletionChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class OpenAICompletion(msgspec.Struct, kw_only=True):
    """A whole completion, or one streamed chunk of it (same object type, as OpenAI does)."""

    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[OpenAICompletionChoice]
    usage: OpenAIUsage | None = None


class OpenAIModel(msgspec.Struct, kw_only=True):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "gdsllm"


class OpenAIModelList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[OpenAIModel]


class OpenAIErrorBody(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(msgspec.Struct):
    error: OpenAIErrorBody


class HealthResponse(msgspec.Struct):
    status: str
