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
    context: list[int] | None = None


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
    context: list[int] | None = None


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


class OllamaShowResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    modelfile: str
    parameters: str
    template: str
    details: OllamaModelDetails
    model_info: dict[str, Any]
    modified_at: str
    capabilities: list[str]
    system: str | None = None
    license: str | None = None


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


# ---- Embeddings (both dialects) and ollama's model management --------------------------------------------------

class OllamaEmbedRequest(msgspec.Struct, kw_only=True):
    """/api/embed: `input` is one text or several; an empty one only loads the model."""

    model: str
    input: str | list[str] = ""
    truncate: bool = True
    dimensions: PositiveInt | None = None
    options: OllamaOptions | None = None
    keep_alive: float | str | None = None


class OllamaEmbedResponse(msgspec.Struct, kw_only=True):
    model: str
    embeddings: list[list[float]]
    total_duration: int = 0
    load_duration: int = 0
    prompt_eval_count: int = 0


class OllamaEmbeddingsRequest(msgspec.Struct, kw_only=True):
    """The legacy /api/embeddings: one `prompt`, an unnormalised vector."""

    model: str
    prompt: str = ""
    options: OllamaOptions | None = None
    keep_alive: float | str | None = None


class OllamaEmbeddingsResponse(msgspec.Struct):
    embedding: list[float]


class OpenAIEmbeddingRequest(msgspec.Struct, kw_only=True):
    """`input`: a text, a list of texts, a list of token ids, or a list of such lists (checked by the route)."""

    model: str
    input: str | list[str | int | list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: PositiveInt | None = None
    user: str | None = None


class OpenAIEmbedding(msgspec.Struct, kw_only=True):
    object: str = "embedding"
    embedding: list[float] | str
    index: int


class OpenAIEmbeddingUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class OpenAIEmbeddingList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: OpenAIEmbeddingUsage


class OllamaPullRequest(msgspec.Struct, kw_only=True):
    """/api/pull: `model` (older clients send `name`) is what `gdsllm pull` takes: a hub repo id with an optional
    `:QUANT`."""

    model: str = ""
    name: str = ""
    insecure: bool = False
    stream: bool = True


class OllamaProgress(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One line of /api/pull's (and /api/create's) progress stream, as ollama writes it."""

    status: str
    digest: str | None = None
    total: int | None = None
    completed: int | None = None


class OllamaCopyRequest(msgspec.Struct, kw_only=True):
    source: str
    destination: str


class OllamaCreateRequest(msgspec.Struct, kw_only=True):
    """/api/create (ollama 0.5's form): a new model `from` a stored model or a GGUF file or checkpoint folder on
    the server, or from uploaded blobs (`files`: file name -> "sha256:<hex>"), with a system prompt and
    parameters that later requests use."""

    model: str = ""
    name: str = ""
    from_: str | None = msgspec.field(default=None, name="from")
    files: dict[str, str] | None = None
    system: str | None = None
    parameters: dict[str, Any] | None = None
    license: str | list[str] | None = None
    quantize: str | None = None
    stream: bool = True
    template: str | None = None
    adapters: dict[str, str] | None = None
    messages: list[dict[str, Any]] | None = None
    modelfile: str | None = None


class OllamaVersionInfo(msgspec.Struct):
    """/api/version: the ollama API level gdsllm follows (clients gate features on it) and gdsllm's own."""

    version: str
    gdsllm_version: str
