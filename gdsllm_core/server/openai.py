"""The OpenAI routes: /v1/chat/completions and /v1/completions (SSE streams ending in `[DONE]`), /v1/models.

`n` choices (and the prompts of a list) are submitted together, so they decode in the same batches; tool calls are
parsed from the text in the model's own format; log-probabilities come from the engine's events."""

import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, JSONBody
from litestar.response import ServerSentEvent

from gdsllm_core.engine.grammar import ANY_JSON_OBJECT, json_schema_grammar
from gdsllm_core.engine.tools import ToolCallStream, parse_tool_calls
from gdsllm_core.errors import GdsllmError
from gdsllm_core.server import urls
from gdsllm_core.server.deps import DefaultModelDep, EngineDep, StoreDep
from gdsllm_core.server.errors import OPENAI_ERRORS, InvalidFieldError, error_body, openai_code
from gdsllm_core.server.schemas import (
    OpenAIChatChoice,
    OpenAIChatChunk,
    OpenAIChatCompletion,
    OpenAIChatRequest,
    OpenAIChoiceLogprobs,
    OpenAIChunkChoice,
    OpenAICompletion,
    OpenAICompletionChoice,
    OpenAICompletionLogprobs,
    OpenAICompletionRequest,
    OpenAIDelta,
    OpenAIFunctionCall,
    OpenAIMessage,
    OpenAIModel,
    OpenAIModelList,
    OpenAIResponseFormat,
    OpenAIResponseMessage,
    OpenAISampling,
    OpenAITokenLogprob,
    OpenAIToolCall,
    OpenAIToolCallDelta,
    OpenAITopLogprob,
    OpenAIUsage,
)
from gdsllm_core.server.streams import (
    Generation,
    check_model,
    collect_all,
    find_model,
    merged,
    resolve_model,
    stop_list,
    submit_all,
    unix_now,
)
from gdsllm_core.types import ChatMessage, GenerateRequest, Grammar, SamplingParams, TokenEvent, ToolCall

log = logging.getLogger("gdsllm.server")

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
DONE = "[DONE]"


def sampling_of(data: OpenAISampling, index: int = 0) -> SamplingParams:
    """OpenAI's sampling: temperature and top_p (defaults 1), penalties and logit bias; no top-k, min-p or repeat
    penalty. Choice `index` of a seeded request draws with seed + index, so the choices differ."""
    bias = {}
    for key, value in (data.logit_bias or {}).items():
        if not key.isdigit():
            raise InvalidFieldError("logit_bias", f"logit_bias key {key!r} is not a token id",
                                    "key the biases by token id, e.g. {\"1234\": -100}")
        bias[int(key)] = value
    return SamplingParams(temperature=1.0 if data.temperature is None else data.temperature,
                          top_p=1.0 if data.top_p is None else data.top_p, top_k=0, min_p=0.0,
                          repeat_penalty=1.0, seed=None if data.seed is None else data.seed + index,
                          presence_penalty=data.presence_penalty or 0.0,
                          frequency_penalty=data.frequency_penalty or 0.0, logit_bias=bias)


def grammar_of(response_format: OpenAIResponseFormat | None) -> Grammar | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return ANY_JSON_OBJECT
    if response_format.json_schema is None or response_format.json_schema.schema_ is None:
        raise InvalidFieldError("response_format", "response_format json_schema needs `json_schema.schema`",
                                "send {\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}")
    return json_schema_grammar(response_format.json_schema.schema_)


def tool_choice_of(data: OpenAIChatRequest) -> str:
    choice = data.tool_choice
    if choice is None:
        return "auto"
    return choice if isinstance(choice, str) else choice.function.name


def message_text(message: OpenAIMessage) -> str:
    """A message's content: a string, or its text parts joined."""
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    return "".join(part.text for part in message.content)


def tool_calls_of(message: OpenAIMessage, index: int) -> list[ToolCall] | None:
    if not message.tool_calls:
        return None
    calls = []
    for call in message.tool_calls:
        try:
            arguments = json.loads(call.function.arguments or "{}")
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            raise InvalidFieldError(f"messages[{index}].tool_calls", "a tool call's arguments are not a JSON object",
                                    "send the arguments as the JSON text of an object")
        calls.append(ToolCall(call.function.name, arguments, call.id))
    return calls


def chat_messages(data: OpenAIChatRequest) -> list[ChatMessage]:
    if not data.messages:
        raise InvalidFieldError("messages", "messages is empty", "send at least one message")
    return [ChatMessage(role=ROLES[message.role], content=message_text(message),
                        tool_calls=tool_calls_of(message, index), name=message.name,
                        tool_call_id=message.tool_call_id)
            for index, message in enumerate(data.messages)]


def finish_reason(event: TokenEvent | None, calls: list | None = None) -> str:
    if calls:
        return "tool_calls"
    return "length" if event is not None and event.done_reason == "length" else "stop"


def usage_of(finals: list[TokenEvent | None], prompts: int = 1) -> OpenAIUsage:
    """Usage of a request's choices: each of its `prompts` counted once, every completion token."""
    done = [event for event in finals if event is not None]
    per_prompt = len(done) // prompts if done and len(done) % prompts == 0 else 1
    prompt = sum(event.prompt_tokens for event in done[::per_prompt]) if done else 0
    completion = sum(event.completion_tokens for event in done)
    return OpenAIUsage(prompt, completion, prompt + completion)


def include_usage(data: OpenAISampling) -> bool:
    return data.stream_options is not None and data.stream_options.include_usage


def token_bytes(text: str) -> list[int]:
    return list(text.encode())


def chat_logprobs(events: list[TokenEvent]) -> OpenAIChoiceLogprobs:
    return OpenAIChoiceLogprobs([
        OpenAITokenLogprob(e.logprob.token, e.logprob.logprob, token_bytes(e.logprob.token),
                           [OpenAITopLogprob(t.token, t.logprob, token_bytes(t.token)) for t in e.logprob.top])
        for e in events if e.logprob is not None])


def completion_logprobs(events: list[TokenEvent], offset: int) -> OpenAICompletionLogprobs:
    """The legacy shape; `offset` is where the completion starts in the returned text (after an echoed prompt)."""
    scored = [e.logprob for e in events if e.logprob is not None]
    offsets = []
    for logprob in scored:
        offsets.append(offset)
        offset += len(logprob.token)
    return OpenAICompletionLogprobs(
        tokens=[lp.token for lp in scored], token_logprobs=[lp.logprob for lp in scored],
        top_logprobs=[{t.token: t.logprob for t in lp.top} for lp in scored], text_offset=offsets)


def wire_calls(calls: list[ToolCall]) -> list[OpenAIToolCall]:
    return [OpenAIToolCall(id=f"call_{uuid.uuid4().hex[:24]}",
                           function=OpenAIFunctionCall(name=call.name, arguments=json.dumps(call.arguments)))
            for call in calls]


def text_and_calls(events: list[TokenEvent], generation: Generation,
                   parallel: bool) -> tuple[str, list[ToolCall]]:
    text = "".join(event.text for event in events)
    fmt = getattr(generation, "tool_format", None)
    if fmt is None:
        return text, []
    content, calls = parse_tool_calls(text, fmt)
    return content, calls if parallel else calls[:1]


async def sse(generations: list[Generation], first: list[msgspec.Struct],
              on_event: Callable[[int, TokenEvent], list[msgspec.Struct]],
              finish: Callable[[], list[msgspec.Struct]], path: str) -> AsyncIterator[bytes]:
    """`first` chunks, the chunks `on_event` makes of each choice's events, the `finish` chunks once all are
    done, then `[DONE]`; an error mid-stream is sent as OpenAI's error object (the openai client raises it)."""
    for chunk in first:
        yield msgspec.json.encode(chunk)
    try:
        async for index, event in merged(generations):
            for chunk in on_event(index, event):
                yield msgspec.json.encode(chunk)
        for chunk in finish():
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
        model = resolve_model(store, data.model, default_model)
        messages = chat_messages(data)
        if data.top_logprobs is not None and not data.logprobs:
            raise InvalidFieldError("top_logprobs", "top_logprobs needs logprobs: true", "set logprobs to true")
        check_model(store, model)
        n = data.n or 1
        parallel = data.parallel_tool_calls is not False
        generations = await submit_all(engine, [GenerateRequest(
            model=model, messages=messages, max_tokens=data.max_completion_tokens or data.max_tokens,
            stop=stop_list(data.stop), sampling=sampling_of(data, index), tools=data.tools,
            tool_choice=tool_choice_of(data), parallel_tool_calls=parallel, grammar=grammar_of(data.response_format),
            logprobs=(data.top_logprobs or 0) if data.logprobs else None) for index in range(n)])
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", unix_now()
        if data.stream:
            return ServerSentEvent(self._chat_stream(data, generations, completion_id, created, parallel,
                                                     request.url.path))
        collected = await collect_all(generations, request.receive)
        choices = []
        for index, (generation, events) in enumerate(zip(generations, collected, strict=True)):
            last = events[-1] if events else None
            content, calls = text_and_calls(events, generation, parallel)
            message = OpenAIResponseMessage("assistant", None if calls and not content else content,
                                            wire_calls(calls) if calls else None)
            choices.append(OpenAIChatChoice(index, message, finish_reason(last, calls),
                                            chat_logprobs(events) if data.logprobs else None))
        return Response(OpenAIChatCompletion(
            id=completion_id, created=created, model=data.model, choices=choices,
            usage=usage_of([events[-1] if events else None for events in collected])))

    @staticmethod
    def _chat_stream(data: OpenAIChatRequest, generations: list[Generation], completion_id: str, created: int,
                     parallel: bool, path: str) -> AsyncIterator[bytes]:
        """SSE of chat.completion.chunk: a role chunk per choice, content (and logprobs) deltas, tool calls as one
        delta once parsed, a finish chunk per choice, and usage last when asked for."""
        tool_streams = [ToolCallStream(g.tool_format) if getattr(g, "tool_format", None) else None
                        for g in generations]
        finals: list[TokenEvent | None] = [None] * len(generations)

        def chunk(index: int | None, delta: OpenAIDelta | None = None, reason: str | None = None,
                  logprobs: OpenAIChoiceLogprobs | None = None, usage: OpenAIUsage | None = None) -> OpenAIChatChunk:
            choices = [] if index is None else [OpenAIChunkChoice(index, delta, reason, logprobs)]
            return OpenAIChatChunk(id=completion_id, created=created, model=data.model, choices=choices,
                                   usage=usage)

        def on_event(index: int, event: TokenEvent) -> list[OpenAIChatChunk]:
            tools = tool_streams[index]
            text = tools.feed(event.text) if tools else event.text
            logprobs = chat_logprobs([event]) if data.logprobs and event.logprob is not None else None
            chunks = [chunk(index, OpenAIDelta(content=text), logprobs=logprobs)] if text or logprobs else []
            if not event.done:
                return chunks
            finals[index] = event
            calls = []
            if tools:
                rest, calls = tools.finish()
                calls = calls if parallel else calls[:1]
                if rest:
                    chunks.append(chunk(index, OpenAIDelta(content=rest)))
                if calls:
                    deltas = [OpenAIToolCallDelta(index=i, id=call.id, function=call.function)
                              for i, call in enumerate(wire_calls(calls))]
                    chunks.append(chunk(index, OpenAIDelta(tool_calls=deltas)))
            return chunks + [chunk(index, OpenAIDelta(), finish_reason(event, calls))]

        def finish() -> list[OpenAIChatChunk]:
            return [chunk(None, usage=usage_of(finals))] if include_usage(data) else []

        first = [chunk(index, OpenAIDelta(role="assistant", content="")) for index in range(len(generations))]
        return sse(generations, first, on_event, finish, path)

    @post(urls.OPENAI_COMPLETIONS, status_code=200, responses={**OPENAI_ERRORS, 200: ResponseSpec(
        OpenAICompletion, description="a text completion, or SSE of text_completion chunks when `stream`")})
    async def completions(self, data: JSONBody[OpenAICompletionRequest], request: Request, engine: EngineDep,
                          store: StoreDep, default_model: DefaultModelDep) -> Response:
        """Continue raw prompts, no chat template (OpenAI's legacy completions); choice i * n + j is prompt i's
        j-th completion."""
        prompts = prompt_list(data.prompt)
        if data.echo and (data.logprobs is not None or any(isinstance(p, list) for p in prompts)):
            raise InvalidFieldError("echo", "echo works only with text prompts and without logprobs",
                                    "leave `echo` out, or send text prompts without logprobs")
        model = resolve_model(store, data.model, default_model)
        check_model(store, model)
        n = data.n or 1
        generations = await submit_all(engine, [GenerateRequest(
            model=model, prompt=prompt, raw=True, max_tokens=data.max_tokens, stop=stop_list(data.stop),
            sampling=sampling_of(data, index), logprobs=data.logprobs)
            for prompt in prompts for index in range(n)])
        echoes = [prompt if data.echo else "" for prompt in prompts for _ in range(n)]
        completion_id, created = f"cmpl-{uuid.uuid4().hex}", unix_now()

        def chunk(index: int | None, text: str = "", reason: str | None = None,
                  logprobs: OpenAICompletionLogprobs | None = None,
                  usage: OpenAIUsage | None = None) -> OpenAICompletion:
            choices = [] if index is None else [OpenAICompletionChoice(index, text, reason, logprobs)]
            return OpenAICompletion(id=completion_id, created=created, model=data.model, choices=choices,
                                    usage=usage)

        if data.stream:
            finals: list[TokenEvent | None] = [None] * len(generations)
            offsets = [len(echo) for echo in echoes]

            def on_event(index: int, event: TokenEvent) -> list[OpenAICompletion]:
                logprobs = None
                if data.logprobs is not None and event.logprob is not None:
                    logprobs = completion_logprobs([event], offsets[index])
                    offsets[index] += len(event.logprob.token)
                chunks = [chunk(index, event.text, logprobs=logprobs)] if event.text or logprobs else []
                if event.done:
                    finals[index] = event
                    chunks.append(chunk(index, "", finish_reason(event)))
                return chunks

            def finish() -> list[OpenAICompletion]:
                return [chunk(None, usage=usage_of(finals, len(prompts)))] if include_usage(data) else []

            first = [chunk(index, echo) for index, echo in enumerate(echoes) if echo]
            return ServerSentEvent(sse(generations, first, on_event, finish, request.url.path))
        collected = await collect_all(generations, request.receive)
        choices = [OpenAICompletionChoice(
            index, echo + "".join(event.text for event in events), finish_reason(events[-1] if events else None),
            completion_logprobs(events, len(echo)) if data.logprobs is not None else None)
            for index, (echo, events) in enumerate(zip(echoes, collected, strict=True))]
        return Response(OpenAICompletion(
            id=completion_id, created=created, model=data.model, choices=choices,
            usage=usage_of([events[-1] if events else None for events in collected], len(prompts))))

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


def prompt_list(prompt: str | list) -> list[str | list[int]]:
    """The prompts of a completions request: a text, texts, token ids (one prompt) or lists of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise InvalidFieldError("prompt", "prompt is an empty list", "send a text or token ids")
    if all(isinstance(item, int) for item in prompt):
        return [list(prompt)]
    if all(isinstance(item, str) for item in prompt) or all(isinstance(item, list) for item in prompt):
        return list(prompt)
    raise InvalidFieldError("prompt", "prompt mixes texts, token ids and lists of token ids",
                            "send one kind: texts, token ids, or lists of token ids")
