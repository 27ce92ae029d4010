"""Request and response bodies of both dialects, as msgspec Structs.

Field names and meanings follow ollama's `api/types.go` and OpenAI's API reference. Request bodies list only the
fields gdsllm honours: any other field is a 400 naming it (`forbid_unknown_fields`), as is a field of the wrong type
or out of range, in the dialect's error shape. None is ever accepted and ignored."""

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

Probability = Annotated[float, Meta(ge=0.0, le=1.0)]
NonNegativeFloat = Annotated[float, Meta(ge=0.0)]
PositiveInt = Annotated[int, Meta(ge=1)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
TopLogprobs = Annotated[int, Meta(ge=0, le=20)]
ChoiceCount = Annotated[int, Meta(ge=1, le=16)]  # n: the choices of one request, sampled together


# ---- Ollama ------------------------------------------------------------------------------------------------------

class OllamaOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The `options` map: the sampling and context knobs gdsllm honours (any other is refused)."""

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
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None


class OllamaGenerateRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
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
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None


class OllamaFunctionCall(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str
    arguments: dict[str, Any] = {}
    index: int | None = None


class OllamaToolCall(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    function: OllamaFunctionCall


class OllamaMessage(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None
    thinking: str | None = None


class OllamaChatRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str
    messages: list[OllamaMessage] = []
    stream: bool = True
    format: str | dict[str, Any] | None = None
    options: OllamaOptions | None = None
    keep_alive: float | str | None = None
    tools: list[dict[str, Any]] | None = None
    truncate: bool = False
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None


class OllamaModelRequest(msgspec.Struct, kw_only=True):
    """Body of /api/show and /api/delete: `model` (older clients send `name`)."""

    model: str = ""
    name: str = ""

    @property
    def model_name(self) -> str:
        return self.model or self.name


class OllamaResponseMessage(msgspec.Struct, omit_defaults=True):
    role: str
    content: str
    tool_calls: list[OllamaToolCall] | None = None


class OllamaTokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]


class OllamaLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[OllamaTokenLogprob]


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
    logprobs: list[OllamaLogprob] | None = None


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
    logprobs: list[OllamaLogprob] | None = None


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

class OpenAIContentPart(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One part of a message's content list; only `{"type": "text", "text": ...}` is supported."""

    type: Literal["text"]
    text: str


class OpenAIFunctionCall(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A called function: `arguments` is a JSON object as text."""

    name: str
    arguments: str


class OpenAIToolCall(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    id: str
    type: Literal["function"] = "function"
    function: OpenAIFunctionCall


class OpenAIMessage(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[OpenAIContentPart] | None = None
    name: str | None = None
    tool_calls: list[OpenAIToolCall] | None = None
    tool_call_id: str | None = None


class OpenAIStreamOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    include_usage: bool = False


class OpenAISampling(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str
    stream: bool = False
    stream_options: OpenAIStreamOptions | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Probability | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: ChoiceCount | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Meta(ge=-100.0, le=100.0)]] | None = None


class OpenAIJsonSchema(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str
    schema_: dict[str, Any] | None = msgspec.field(default=None, name="schema")
    strict: bool | None = None
    description: str | None = None


class OpenAIResponseFormat(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`text` (free), `json_object` (any JSON object) or `json_schema` (an object valid against the schema; with
    or without `strict`, the schema is enforced while sampling)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: OpenAIJsonSchema | None = None


class OpenAINamedFunction(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str


class OpenAINamedToolChoice(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    type: Literal["function"] = "function"
    function: OpenAINamedFunction


class OpenAIChatRequest(OpenAISampling, kw_only=True, forbid_unknown_fields=True):
    messages: list[OpenAIMessage]
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    response_format: OpenAIResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["auto", "none", "required"] | OpenAINamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None


class OpenAICompletionRequest(OpenAISampling, kw_only=True, forbid_unknown_fields=True):
    """`prompt`: a text, a list of texts, a list of token ids, or a list of lists of token ids (one choice each)."""

    prompt: str | list[str | int | list[int]]
    max_tokens: PositiveInt | None = 16
    echo: bool = False
    logprobs: TopLogprobs | None = None


class OpenAIUsage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class OpenAITopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]


class OpenAITokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[OpenAITopLogprob]


class OpenAIChoiceLogprobs(msgspec.Struct):
    content: list[OpenAITokenLogprob]


class OpenAIResponseMessage(msgspec.Struct, omit_defaults=True):
    role: str
    content: str | None
    tool_calls: list[OpenAIToolCall] | None = None


class OpenAIChatChoice(msgspec.Struct):
    index: int
    message: OpenAIResponseMessage
    finish_reason: str | None
    logprobs: OpenAIChoiceLogprobs | None = None


class OpenAIChatCompletion(msgspec.Struct, kw_only=True):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[OpenAIChatChoice]
    usage: OpenAIUsage


class OpenAIToolCallDelta(msgspec.Struct, kw_only=True):
    index: int
    id: str
    type: str = "function"
    function: OpenAIFunctionCall


class OpenAIDelta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    tool_calls: list[OpenAIToolCallDelta] | None = None


class OpenAIChunkChoice(msgspec.Struct):
    index: int
    delta: OpenAIDelta
    finish_reason: str | None = None
    logprobs: OpenAIChoiceLogprobs | None = None


class OpenAIChatChunk(msgspec.Struct, kw_only=True):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[OpenAIChunkChoice]
    usage: OpenAIUsage | None = None


class OpenAICompletionLogprobs(msgspec.Struct):
    """The legacy completions shape: per token its text, log-probability, top alternatives and text offset."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class OpenAICompletionChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: OpenAICompletionLogprobs | None = None


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
