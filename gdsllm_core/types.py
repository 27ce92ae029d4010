"""The engine's API types, shared by the CLI, the Ollama routes and the OpenAI routes."""

from typing import Literal

import msgspec


class SamplingParams(msgspec.Struct, frozen=True):
    """temperature 0 means greedy. Defaults are ollama's."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    seed: int | None = None
    presence_penalty: float = 0.0  # subtracted from the logit of every token already generated
    frequency_penalty: float = 0.0  # subtracted once per time a token was already generated
    logit_bias: dict[int, float] = {}  # token id -> added to its logit before anything else


class ToolCall(msgspec.Struct):
    """A function call the model asked for: `arguments` is the parsed JSON object."""

    name: str
    arguments: dict
    id: str | None = None


class ChatMessage(msgspec.Struct):
    """One turn. An assistant turn may carry `tool_calls`; a `tool` turn answers one (`name`, `tool_call_id`)."""

    role: str
    content: str
    tool_calls: list[ToolCall] | None = None
    name: str | None = None
    tool_call_id: str | None = None


class Grammar(msgspec.Struct, frozen=True):
    """A constraint on the generated text, enforced while sampling: `kind` "json_schema" (`source` is the schema as
    JSON text; `{}` means any JSON object) or "lark" (llguidance's Lark dialect)."""

    kind: Literal["json_schema", "lark"]
    source: str


class GenerateRequest(msgspec.Struct):
    """One generation. Either `messages` (chat: the model's template is applied) or `prompt` (completion;
    `raw=False` wraps it as a single user turn with `system`, like ollama's /api/generate; a list of token ids is
    used as it is). `tools` (OpenAI's function objects) go into the chat template; `grammar` constrains the output;
    `logprobs` asks for each token's log-probability and that many alternatives (None: none)."""

    model: str = ""
    messages: list[ChatMessage] | None = None
    prompt: str | list[int] | None = None
    system: str | None = None
    raw: bool = False
    max_tokens: int | None = None
    stop: list[str] = []
    sampling: SamplingParams = SamplingParams()
    num_ctx: int | None = None
    truncate: bool = False
    context: list[int] | None = None  # ollama's generate `context`: the tokens of an exchange this prompt continues
    tools: list[dict] | None = None
    tool_choice: str = "auto"  # "auto", "none", "required", or the name of the one tool to call
    parallel_tool_calls: bool = True
    grammar: Grammar | None = None
    logprobs: int | None = None


class TokenLogprob(msgspec.Struct):
    """A token's log-probability under the model (log-softmax of its logits, before any sampling transform)."""

    token_id: int
    token: str
    logprob: float


class SampledLogprob(msgspec.Struct):
    """The sampled token's log-probability, and the `top` most likely tokens at that step."""

    token_id: int
    token: str
    logprob: float
    top: list[TokenLogprob] = []


DoneReason = Literal["stop", "length", "cancelled"]


class TokenEvent(msgspec.Struct):
    """One step of a generation: `text` is the new, complete UTF-8 text (may be empty). The last event has
    `done=True`, `done_reason`, token counts and timings in nanoseconds."""

    text: str
    token_id: int | None = None
    logprob: SampledLogprob | None = None
    done: bool = False
    done_reason: DoneReason | None = None
    prompt_tokens: int = 0  # prompt tokens computed (those reused from the prefix cache are not counted)
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache
    completion_tokens: int = 0
    prompt_truncated: bool = False
    load_ns: int = 0
    prompt_eval_ns: int = 0
    eval_ns: int = 0
    total_ns: int = 0
    tokens: list[int] | None = None  # on the done event: the sequence's token ids, prompt then answer
