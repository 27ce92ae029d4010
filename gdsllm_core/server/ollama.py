"""The ollama routes: /api/generate, /api/chat (NDJSON streams), /api/tags, /api/show, /api/ps, /api/version,
/api/delete. (Embeddings: embeddings.py; pull, copy, create, blobs and `/`: ollama_models.py.)"""

import logging
import re
from collections.abc import AsyncIterator, Callable

import anyio
import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import JSONBody
from litestar.response import Stream

from gdsllm_core import __version__
from gdsllm_core.engine.grammar import ANY_JSON_OBJECT, json_schema_grammar
from gdsllm_core.engine.tools import ToolCallStream, parse_tool_calls
from gdsllm_core.errors import GdsllmError, InvalidFieldError
from gdsllm_core.layout.defaults import ModelDefaults, parameters_text, read_defaults
from gdsllm_core.limits import check_keep_alive
from gdsllm_core.server import catalog, urls
from gdsllm_core.server.deps import DefaultModelDep, EngineDep, StoreDep
from gdsllm_core.server.errors import OLLAMA_ERRORS, error_body
from gdsllm_core.server.schemas import (
    OllamaChatRequest,
    OllamaChatResponse,
    OllamaFunctionCall,
    OllamaGenerateRequest,
    OllamaGenerateResponse,
    OllamaListedModel,
    OllamaLogprob,
    OllamaMessage,
    OllamaModelDetails,
    OllamaModelRequest,
    OllamaOptions,
    OllamaPsResponse,
    OllamaResponseMessage,
    OllamaRunningModel,
    OllamaShowResponse,
    OllamaTagsResponse,
    OllamaTokenLogprob,
    OllamaToolCall,
    OllamaVersionInfo,
)
from gdsllm_core.server.streams import (
    Engine,
    Generation,
    check_model,
    collect_all,
    events,
    find_model,
    now_rfc3339,
    resolve_model,
    stop_list,
    submit,
    unix_to_rfc3339,
)
from gdsllm_core.types import ChatMessage, GenerateRequest, Grammar, SamplingParams, TokenEvent, ToolCall

log = logging.getLogger("gdsllm.server")

NDJSON = "application/x-ndjson"
Chunk = Callable[..., msgspec.Struct]  # (text, done fields or None, **extra fields) -> one response object
DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
OLLAMA_API_VERSION = "0.12.0"  # the ollama release whose API these routes follow (clients gate features on it)
# GenerateRequest's fields as ollama's requests spell them, for the 400s of limits.check_generate
OPTION_NAMES = {"max_tokens": "options.num_predict",
                **{field: f"options.{field}" for field in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty",
                                                           "repeat_last_n", "presence_penalty", "frequency_penalty",
                                                           "seed", "num_ctx")}}
DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: float | str | None) -> float | None:
    """Seconds from ollama's keep_alive: a number of seconds or a Go duration ("5m", "1h30m", "-1"); negative
    means forever (returned as -1)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip() if isinstance(value, str) else value)
    except ValueError:
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        parts = DURATION_PART.findall(body)
        if not body or "".join(number + unit for number, unit in parts) != body:
            raise InvalidFieldError("keep_alive", f"keep_alive {value!r} is not a duration",
                                    "use seconds (300) or a duration such as \"5m\", \"1h\", \"-1\"") from None
        seconds = sign * sum(float(number) * DURATION_UNITS[unit] for number, unit in parts)
    return -1.0 if seconds < 0 else check_keep_alive(seconds)


def grammar_of(format_: str | dict | None) -> Grammar | None:
    """ollama's `format`: "json" (any JSON object) or a JSON schema, enforced while sampling."""
    if format_ in (None, ""):
        return None
    if format_ == "json":
        return ANY_JSON_OBJECT
    if isinstance(format_, dict):
        return json_schema_grammar(format_)
    raise InvalidFieldError("format", f"format {format_!r} is neither \"json\" nor a JSON schema",
                            "send \"json\" or a JSON schema object")


def check_think(think: bool | str | None) -> None:
    if think not in (None, False):
        raise InvalidFieldError("think", "thinking is not supported by gdsllm", "leave `think` out or set it false")


def logprobs_of(logprobs: bool | None, top_logprobs: int | None) -> int | None:
    """The engine's logprobs count: None unless `logprobs` is true."""
    if top_logprobs and not logprobs:
        raise InvalidFieldError("top_logprobs", "top_logprobs needs logprobs: true", "set logprobs to true")
    return (top_logprobs or 0) if logprobs else None


def wire_logprobs(events: list[TokenEvent]) -> list[OllamaLogprob] | None:
    scored = [event.logprob for event in events if event.logprob is not None]
    if not scored:
        return None
    return [OllamaLogprob(lp.token, lp.logprob, list(lp.token.encode()),
                          [OllamaTokenLogprob(t.token, t.logprob, list(t.token.encode())) for t in lp.top])
            for lp in scored]


def wire_calls(calls: list[ToolCall]) -> list[OllamaToolCall]:
    return [OllamaToolCall(function=OllamaFunctionCall(name=call.name, arguments=call.arguments, index=index))
            for index, call in enumerate(calls)]


def chat_message(index: int, message: OllamaMessage) -> ChatMessage:
    if message.images:
        raise InvalidFieldError(f"messages[{index}].images", "images are not supported: gdsllm serves text-only "
                                "models")
    if message.thinking:
        raise InvalidFieldError(f"messages[{index}].thinking", "thinking is not supported by gdsllm",
                                "leave `thinking` out of the messages")
    calls = [ToolCall(call.function.name, call.function.arguments) for call in message.tool_calls or []]
    return ChatMessage(role=message.role, content=message.content, tool_calls=calls or None, name=message.tool_name)


def generation_fields(options: OllamaOptions | None) -> dict:
    """GenerateRequest keyword arguments (sampling, max_tokens, stop, num_ctx) from ollama's `options`."""
    options = options or OllamaOptions()
    defaults = SamplingParams()
    sampling = SamplingParams(
        presence_penalty=options.presence_penalty or 0.0, frequency_penalty=options.frequency_penalty or 0.0,
        temperature=defaults.temperature if options.temperature is None else options.temperature,
        top_k=defaults.top_k if options.top_k is None else options.top_k,
        top_p=defaults.top_p if options.top_p is None else options.top_p,
        min_p=defaults.min_p if options.min_p is None else options.min_p,
        repeat_penalty=defaults.repeat_penalty if options.repeat_penalty is None else options.repeat_penalty,
        repeat_last_n=defaults.repeat_last_n if options.repeat_last_n is None else options.repeat_last_n,
        seed=options.seed,
    )
    if options.num_predict == 0:
        raise InvalidFieldError("options.num_predict", "options.num_predict must not be 0",
                                "give a positive token count, or -1 for no limit")
    max_tokens = options.num_predict if options.num_predict and options.num_predict > 0 else None
    return {"sampling": sampling, "max_tokens": max_tokens, "stop": stop_list(options.stop),
            "num_ctx": options.num_ctx}


def model_defaults(store, model: str) -> ModelDefaults:
    """The system prompt and parameters /api/create stored for `model` (empty for other models)."""
    return read_defaults(store.get(model)) if model else ModelDefaults()


def with_defaults(options: OllamaOptions | None, defaults: ModelDefaults) -> OllamaOptions | None:
    """The request's options over the model's stored parameters (a field the request sets wins)."""
    if not defaults.parameters:
        return options
    merged = dict(defaults.parameters)
    if options is not None:
        merged.update({name: getattr(options, name) for name in options.__struct_fields__
                       if getattr(options, name) is not None})
    return msgspec.convert(merged, OllamaOptions)


def done_fields(event: TokenEvent) -> dict:
    """The counters ollama puts on a generation's last object (nanoseconds)."""
    fields = {
        "done_reason": event.done_reason or "stop",
        "total_duration": event.total_ns,
        "load_duration": event.load_ns,
        "prompt_eval_count": event.prompt_tokens,
        "prompt_eval_duration": event.prompt_eval_ns,
        "eval_count": event.completion_tokens,
        "eval_duration": event.eval_ns,
    }
    if event.prompt_truncated:
        fields["prompt_truncated"] = True
    if event.tokens is not None:
        fields["tokens"] = event.tokens  # the generate route returns them as `context`
    return fields


async def ndjson(generation: Generation, chunk: Chunk, path: str,
                 after: Callable[[], None] | None) -> AsyncIterator[bytes]:
    """One JSON object per line: a chunk per event with text (or log-probabilities), tool calls in one chunk once
    parsed, then the done object; an error mid-stream becomes ollama's `{"error": ...}` line (the ollama clients
    raise it)."""
    fmt = getattr(generation, "tool_format", None)
    tools = ToolCallStream(fmt) if fmt else None
    try:
        async for event in events(generation):
            text = tools.feed(event.text) if tools else event.text
            logprobs = wire_logprobs([event])
            if text or logprobs:
                yield msgspec.json.encode(chunk(text, None, logprobs=logprobs)) + b"\n"
            if event.done:
                if tools:
                    rest, calls = tools.finish()
                    if rest or calls:
                        yield msgspec.json.encode(chunk(rest, None, tool_calls=wire_calls(calls) or None)) + b"\n"
                yield msgspec.json.encode(chunk("", done_fields(event))) + b"\n"
    except GdsllmError as exc:
        yield error_body(path, exc.http_status, str(exc)) + b"\n"
    except Exception as exc:  # the status line is sent: report in-band, keep the server up
        log.exception("generation failed mid-stream")
        yield error_body(path, 500, f"internal server error: {type(exc).__name__}: {exc}") + b"\n"
    if after is not None:
        await anyio.to_thread.run_sync(after)


def apply_keep_alive(engine: Engine, model: str, keep_alive: float | None) -> Callable[[], None] | None:
    """ollama's keep_alive: 0 unloads the model once the answer is complete (returned as a callable to run then);
    a duration sets how long the model stays loaded after it, negative keeps it loaded; absent changes nothing."""
    if keep_alive == 0:
        return lambda: engine.unload(model or None)
    if keep_alive is not None:
        engine.set_keep_alive(None if keep_alive < 0 else keep_alive)
    return None


class OllamaController(Controller):
    tags = ["ollama"]

    @post(urls.OLLAMA_GENERATE, status_code=200, responses={**OLLAMA_ERRORS, 200: ResponseSpec(
        OllamaGenerateResponse, description="one object, or NDJSON of them when `stream` is true (the default)")})
    async def generate(self, data: JSONBody[OllamaGenerateRequest], request: Request, engine: EngineDep,
                       store: StoreDep, default_model: DefaultModelDep) -> Response:
        """Complete a prompt (ollama's /api/generate)."""
        model = resolve_model(store, data.model, default_model)
        grammar = grammar_of(data.format)
        check_think(data.think)
        logprobs = logprobs_of(data.logprobs, data.top_logprobs)
        if data.images:
            raise InvalidFieldError("images", "images are not supported: gdsllm serves text-only models")
        if data.raw and data.context:
            raise InvalidFieldError("context", "`context` continues a templated exchange: it cannot go with `raw`",
                                    "put the earlier text into the raw prompt instead")
        keep_alive = parse_keep_alive(data.keep_alive)
        check_model(store, model)
        defaults = model_defaults(store, model)
        fields = generation_fields(with_defaults(data.options, defaults))

        def chunk(text: str, done: dict | None, logprobs: list[OllamaLogprob] | None = None,
                  tool_calls: None = None) -> OllamaGenerateResponse:
            done = dict(done or {})
            tokens = done.pop("tokens", None)
            return OllamaGenerateResponse(model=data.model, created_at=now_rfc3339(), response=text,
                                          done=done.get("done_reason") is not None, logprobs=logprobs, **done,
                                          context=None if data.raw else tokens)

        if not data.prompt and not data.system:
            reason = await self._load_or_unload(engine, model, keep_alive)
            return Response(chunk("", {"done_reason": reason}))
        system = data.system if data.system is not None else defaults.system
        return await self._answer(request, engine, GenerateRequest(
            model=model, prompt=data.prompt, system=system, raw=data.raw, truncate=data.truncate,
            context=data.context or None, grammar=grammar, logprobs=logprobs, **fields), chunk, data.stream, keep_alive)

    @post(urls.OLLAMA_CHAT, status_code=200, responses={**OLLAMA_ERRORS, 200: ResponseSpec(
        OllamaChatResponse, description="one object, or NDJSON of them when `stream` is true (the default)")})
    async def chat(self, data: JSONBody[OllamaChatRequest], request: Request, engine: EngineDep, store: StoreDep,
                   default_model: DefaultModelDep) -> Response:
        """Answer a conversation (ollama's /api/chat)."""
        model = resolve_model(store, data.model, default_model)
        grammar = grammar_of(data.format)
        check_think(data.think)
        logprobs = logprobs_of(data.logprobs, data.top_logprobs)
        messages = [chat_message(index, message) for index, message in enumerate(data.messages)]
        keep_alive = parse_keep_alive(data.keep_alive)
        check_model(store, model)
        defaults = model_defaults(store, model)
        fields = generation_fields(with_defaults(data.options, defaults))

        def chunk(text: str, done: dict | None, logprobs: list[OllamaLogprob] | None = None,
                  tool_calls: list[OllamaToolCall] | None = None) -> OllamaChatResponse:
            done = {key: value for key, value in (done or {}).items() if key != "tokens"}
            return OllamaChatResponse(model=data.model, created_at=now_rfc3339(),
                                      message=OllamaResponseMessage("assistant", text, tool_calls),
                                      done=done.get("done_reason") is not None, logprobs=logprobs, **done)

        if not data.messages:
            reason = await self._load_or_unload(engine, model, keep_alive)
            return Response(chunk("", {"done_reason": reason}))
        return await self._answer(request, engine, GenerateRequest(
            model=model, messages=messages, system=defaults.system, truncate=data.truncate, tools=data.tools,
            grammar=grammar, logprobs=logprobs, **fields), chunk, data.stream, keep_alive)

    @staticmethod
    async def _answer(request: Request, engine: Engine, generate: GenerateRequest, chunk: Chunk, stream: bool,
                      keep_alive: float | None) -> Response:
        """Submit, then stream NDJSON or answer with one object (cancelled if the client leaves first)."""
        generation = await submit(engine, generate, OPTION_NAMES)
        after = apply_keep_alive(engine, generate.model, keep_alive)
        if stream:
            return Stream(ndjson(generation, chunk, request.url.path, after), media_type=NDJSON)
        (collected,) = await collect_all([generation], request.receive)
        if after is not None:
            await anyio.to_thread.run_sync(after)
        text = "".join(event.text for event in collected)
        fmt = getattr(generation, "tool_format", None)
        content, calls = parse_tool_calls(text, fmt) if fmt else (text, [])
        done = done_fields(collected[-1]) if collected else {"done_reason": "cancelled"}
        return Response(chunk(content, done, logprobs=wire_logprobs(collected),
                              tool_calls=wire_calls(calls) or None))

    @staticmethod
    async def _load_or_unload(engine: Engine, model: str, keep_alive: float | None) -> str:
        """ollama's empty request: load the model, or unload it when keep_alive is 0."""
        if keep_alive == 0:
            await anyio.to_thread.run_sync(engine.unload, model or None)
            return "unload"
        await anyio.to_thread.run_sync(engine.load, model)
        apply_keep_alive(engine, model, keep_alive)
        return "load"

    @get(urls.OLLAMA_TAGS, sync_to_thread=True, responses=OLLAMA_ERRORS)
    def tags_(self, store: StoreDep) -> OllamaTagsResponse:
        """The local models."""
        return OllamaTagsResponse([
            OllamaListedModel(name=entry.name, model=entry.name, modified_at=catalog.modified_at(entry),
                              size=entry.size_bytes, digest=catalog.digest(entry), details=catalog.details(entry))
            for entry in store.list()])

    @post(urls.OLLAMA_SHOW, status_code=200, sync_to_thread=True, responses=OLLAMA_ERRORS)
    def show(self, data: JSONBody[OllamaModelRequest], store: StoreDep,
             default_model: DefaultModelDep) -> OllamaShowResponse:
        """One model's details, configuration and chat template."""
        entry = find_model(store, resolve_model(store, data.model_name, default_model) or self._required(data))
        defaults = read_defaults(entry)
        template = entry.manifest.tokenizer.chat_template or ""
        return OllamaShowResponse(modelfile=catalog.modelfile(entry, defaults),
                                  parameters=parameters_text(defaults.parameters), template=template,
                                  details=catalog.details(entry), model_info=catalog.model_info(entry),
                                  modified_at=catalog.modified_at(entry), capabilities=catalog.capabilities(entry),
                                  system=defaults.system, license=defaults.license)

    @get(urls.OLLAMA_PS, sync_to_thread=True, responses=OLLAMA_ERRORS)
    def ps(self, engine: EngineDep, store: StoreDep) -> OllamaPsResponse:
        """The loaded models, with their residency statistics."""
        models = []
        for running in engine.running():
            try:
                entry = store.get(running.name)
                digest, details = catalog.digest(entry), catalog.details(entry)
            except GdsllmError:  # deleted or damaged by another process while loaded: still running here
                entry, digest = None, ""
                details = OllamaModelDetails(family="", families=[], parameter_size="", quantization_level="")
            models.append(OllamaRunningModel(
                name=running.name, model=running.name, size=running.size_bytes, size_vram=running.vram_bytes,
                digest=digest, details=details,
                expires_at=unix_to_rfc3339(running.expires_at),
                context_length=getattr(running, "context_length", None) or (entry and catalog.context_length(entry)),
                stats=running.stats))
        return OllamaPsResponse(models)

    @get(urls.OLLAMA_VERSION, responses=OLLAMA_ERRORS)
    async def version(self) -> OllamaVersionInfo:
        """The ollama API version these routes follow (what ollama clients check), and gdsllm's own."""
        return OllamaVersionInfo(OLLAMA_API_VERSION, __version__)

    @delete(urls.OLLAMA_DELETE, status_code=200, sync_to_thread=True, responses=OLLAMA_ERRORS)
    def delete_(self, data: JSONBody[OllamaModelRequest], engine: EngineDep, store: StoreDep) -> None:
        """Unload (if loaded) and delete a local model."""
        name = find_model(store, resolve_model(store, self._required(data), None)).name
        if any(running.name == name for running in engine.running()):
            engine.unload(name)
        store.remove(name)

    @staticmethod
    def _required(data: OllamaModelRequest) -> str:
        if not data.model_name:
            raise InvalidFieldError("model", "the request names no model", "send {\"model\": \"<name>\"}")
        return data.model_name
