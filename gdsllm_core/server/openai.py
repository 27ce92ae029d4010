"""The OpenAI routes: /v1/chat/completions and /v1/completions (SSE streams ending in `[DONE]`), /v1/models."""

import logging
import uuid
from collections.abc import AsyncIterator, Callable

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, JSONBody
from litestar.response import ServerSentEvent

from gdsllm_core.errors import GdsllmError
from gdsllm_core.server import urls
from gdsllm_core.server.deps import DefaultModelDep, EngineDep, StoreDep
from gdsllm_core.server.errors import OPENAI_ERRORS, InvalidFieldError, error_body, openai_code
from gdsllm_core.server.schemas import (
    OpenAIChatChoice,
    OpenAIChatChunk,
    OpenAIChatCompletion,
    OpenAIChatRequest,
    OpenAIChunkChoice,
    OpenAICompletion,
    OpenAICompletionChoice,
    OpenAICompletionRequest,
    OpenAIDelta,
    OpenAIMessage,
    OpenAIModel,
    OpenAIModelList,
    OpenAIResponseMessage,
    OpenAISampling,
    OpenAIUsage,
)
from gdsllm_core.server.streams import (
    Generation,
    check_model,
    collect,
    events,
    find_model,
    resolve_model,
    stop_list,
    submit,
    unix_now,
)
from gdsllm_core.types import ChatMessage, GenerateRequest, SamplingParams, TokenEvent

log = logging.getLogger("gdsllm.server")

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
DONE = "[DONE]"


def check_n(n: int | None) -> None:
    if n not in (None, 1):
        raise InvalidFieldError("n", f"n={n} is not supported: gdsllm returns one choice per request",
                                "leave `n` out or set it to 1, and send several requests for several answers")


def sampling_of(data: OpenAISampling) -> SamplingParams:
    """OpenAI's sampling: temperature and top_p (defaults 1), no top-k, min-p or repeat penalty."""
    return SamplingParams(temperature=1.0 if data.temperature is None else data.temperature,
                          top_p=1.0 if data.top_p is None else data.top_p, top_k=0, min_p=0.0,
                          repeat_penalty=1.0, seed=data.seed)


def message_text(message: OpenAIMessage) -> str:
    """A message's content: a string, or its text parts joined."""
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    return "".join(part.text for part in message.content)


def chat_messages(data: OpenAIChatRequest) -> list[ChatMessage]:
    if not data.messages:
        raise InvalidFieldError("messages", "messages is empty", "send at least one message")
    return [ChatMessage(role=ROLES[message.role], content=message_text(message)) for message in data.messages]


def finish_reason(event: TokenEvent | None) -> str:
    return "length" if event is not None and event.done_reason == "length" else "stop"


def usage_of(event: TokenEvent | None) -> OpenAIUsage:
    prompt, completion = (event.prompt_tokens, event.completion_tokens) if event else (0, 0)
    return OpenAIUsage(prompt, completion, prompt + completion)


def include_usage(data: OpenAISampling) -> bool:
    return data.stream_options is not None and data.stream_options.include_usage


async def sse(generation: Generation, first: list[msgspec.Struct], delta: Callable[[str], msgspec.Struct],
              finish: Callable[[TokenEvent], list[msgspec.Struct]], path: str) -> AsyncIterator[bytes]:
    """`first` chunks, a chunk per event with text, the `finish` chunks, then `[DONE]`; an error mid-stream is
    sent as OpenAI's error object (the openai client raises it)."""
    for chunk in first:
        yield msgspec.json.encode(chunk)
    try:
        async for event in events(generation):
            if event.text:
                yield msgspec.json.encode(delta(event.text))
            if event.done:
                for chunk in finish(event):
                    yield msgspec.json.encode(chunk)
    except GdsllmError as exc:
        param, code = openai_code(exc)
        yield error_body(path, exc.http_status, str(exc), param, code)
    except Exception as exc:  # the status line is sent: report in-band, keep the server up
        log.exception("generation failed mid-stream")
        yield error_body(path, 500, f"internal server error: {type(exc).__name__}: {exc}")
    yield DONE.encode()


class OpenAIController(Controller):
    tags = ["openai"]

    @post(urls.OPENAI_CHAT, status_code=200, responses={**OPENAI_ERRORS, 200: ResponseSpec(
        OpenAIChatCompletion, description="a chat completion, or SSE of chat.completion.chunk when `stream`")})
    async def chat_completions(self, data: JSONBody[OpenAIChatRequest], request: Request, engine: EngineDep,
                               store: StoreDep, default_model: DefaultModelDep) -> Response:
        """Answer a conversation (OpenAI's chat completions)."""
        check_n(data.n)
        model = resolve_model(store, data.model, default_model)
        messages = chat_messages(data)
        check_model(store, model)
        generation = await submit(engine, GenerateRequest(
            model=model, messages=messages, max_tokens=data.max_completion_tokens or data.max_tokens,
            stop=stop_list(data.stop), sampling=sampling_of(data)))
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", unix_now()

        def chunk(delta: OpenAIDelta | None, reason: str | None = None,
                  usage: OpenAIUsage | None = None) -> OpenAIChatChunk:
            choices = [] if delta is None else [OpenAIChunkChoice(0, delta, reason)]
            return OpenAIChatChunk(id=completion_id, created=created, model=data.model, choices=choices,
                                   usage=usage)

        def finish(event: TokenEvent) -> list[OpenAIChatChunk]:
            chunks = [chunk(OpenAIDelta(), finish_reason(event))]
            return chunks + [chunk(None, usage=usage_of(event))] if include_usage(data) else chunks

        if data.stream:
            first = [chunk(OpenAIDelta(role="assistant", content=""))]
            return ServerSentEvent(sse(generation, first, lambda text: chunk(OpenAIDelta(content=text)), finish,
                                       request.url.path))
        text, last = await collect(generation, request.receive)
        return Response(OpenAIChatCompletion(
            id=completion_id, created=created, model=data.model, usage=usage_of(last),
            choices=[OpenAIChatChoice(0, OpenAIResponseMessage("assistant", text), finish_reason(last))]))

    @post(urls.OPENAI_COMPLETIONS, status_code=200, responses={**OPENAI_ERRORS, 200: ResponseSpec(
        OpenAICompletion, description="a text completion, or SSE of text_completion chunks when `stream`")})
    async def completions(self, data: JSONBody[OpenAICompletionRequest], request: Request, engine: EngineDep,
                          store: StoreDep, default_model: DefaultModelDep) -> Response:
        """Continue a raw prompt, no chat template (OpenAI's legacy completions)."""
        check_n(data.n)
        if isinstance(data.prompt, list) and len(data.prompt) != 1:
            raise InvalidFieldError("prompt", f"a list of {len(data.prompt)} prompts is not supported",
                                    "send one prompt per request")
        prompt = data.prompt if isinstance(data.prompt, str) else data.prompt[0]
        model = resolve_model(store, data.model, default_model)
        check_model(store, model)
        generation = await submit(engine, GenerateRequest(
            model=model, prompt=prompt, raw=True, max_tokens=data.max_tokens, stop=stop_list(data.stop),
            sampling=sampling_of(data)))
        completion_id, created = f"cmpl-{uuid.uuid4().hex}", unix_now()

        def chunk(text: str | None, reason: str | None = None,
                  usage: OpenAIUsage | None = None) -> OpenAICompletion:
            choices = [] if text is None else [OpenAICompletionChoice(0, text, reason)]
            return OpenAICompletion(id=completion_id, created=created, model=data.model, choices=choices,
                                    usage=usage)

        def finish(event: TokenEvent) -> list[OpenAICompletion]:
            chunks = [chunk("", finish_reason(event))]
            return chunks + [chunk(None, usage=usage_of(event))] if include_usage(data) else chunks

        if data.stream:
            first = [chunk(prompt)] if data.echo else []
            return ServerSentEvent(sse(generation, first, chunk, finish, request.url.path))
        text, last = await collect(generation, request.receive)
        return Response(chunk((prompt if data.echo else "") + text, finish_reason(last), usage_of(last)))

    @get(urls.OPENAI_MODELS, sync_to_thread=True, responses=OPENAI_ERRORS)
    def models(self, store: StoreDep) -> OpenAIModelList:
        """The local models."""
        return OpenAIModelList(data=[OpenAIModel(id=entry.name, created=int(entry.modified))
                                     for entry in store.list()])

    @get(urls.OPENAI_MODEL, sync_to_thread=True, responses=OPENAI_ERRORS)
    def model(self, model_id: FromPath[str], store: StoreDep) -> OpenAIModel:
        """One local model."""
        entry = find_model(store, resolve_model(store, model_id, None))
        return OpenAIModel(id=model_id, created=int(entry.modified))
