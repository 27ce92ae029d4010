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


class ChatMessage(msgspec.Struct):
    role: str
    content: str


class GenerateRequest(msgspec.Struct):
    """One generation. Either `messages` (chat: the model's template is applied) or `prompt` (completion;
    `raw=False` wraps it as a single user turn with `system`, like ollama's /api/generate)."""

    model: str = ""
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    system: str | None = None
    raw: bool = False
    max_tokens: int | None = None
    stop: list[str] = []
    sampling: SamplingParams = SamplingParams()
    num_ctx: int | None = None
    truncate: bool = False
    context: list[int] | None = None  # ollama's generate `context`: the tokens of an exchange this prompt continues


DoneReason = Literal["stop", "length", "cancelled"]


class TokenEvent(msgspec.Struct):
    """One step of a generation: `text` is the new, complete UTF-8 text (may be empty). The last event has
    `done=True`, `done_reason`, token counts and timings in nanoseconds."""

    text: str
    token_id: int | None = None
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
