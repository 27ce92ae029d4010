"""The ollama routes: /api/generate, /api/chat (NDJSON streams), /api/tags, /api/show, /api/ps, /api/version,
/api/delete."""

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
from gdsllm_core.errors import GdsllmError
from gdsllm_core.limits import check_keep_alive
from gdsllm_core.server import catalog, urls
from gdsllm_core.server.deps import DefaultModelDep, EngineDep, StoreDep
from gdsllm_core.server.errors import OLLAMA_ERRORS, InvalidFieldError, error_body
from gdsllm_core.server.schemas import (
    OllamaChatRequest,
    OllamaChatResponse,
    OllamaGenerateRequest,
    OllamaGenerateResponse,
    OllamaListedModel,
    OllamaModelDetails,
    OllamaModelRequest,
    OllamaOptions,
    OllamaPsResponse,
    OllamaResponseMessage,
    OllamaRunningModel,
    OllamaShowResponse,
    OllamaTagsResponse,
    OllamaVersionResponse,
)
from gdsllm_core.server.streams import (
    Engine,
    Generation,
    check_model,
    collect,
    events,
    find_model,
    now_rfc3339,
    resolve_model,
    stop_list,
    submit,
    unix_to_rfc3339,
)
from gdsllm_core.types import ChatMessage, GenerateRequest, SamplingParams, TokenEvent

log = logging.getLogger("gdsllm.server")

NDJSON = "application/x-ndjson"
Chunk = Callable[[str, dict | None], msgspec.Struct]  # (text, done fields or None) -> one response object
DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
# GenerateRequest's fields as ollama's requests spell them, for the 400s of limits.check_generate
OPTION_NAMES = {"max_tokens": "options.num_predict",
                **{field: f"options.{field}" for field in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty",
                                                           "repeat_last_n", "seed", "num_ctx")}}
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


def check_format(format_: str | dict | None) -> None:
    if format_ not in (None, ""):
        raise InvalidFieldError("format", "structured output (`format`) is not supported by gdsllm",
                                "leave `format` out and ask for JSON in the prompt")


def generation_fields(options: OllamaOptions | None) -> dict:
    """GenerateRequest keyword arguments (sampling, max_tokens, stop, num_ctx) from ollama's `options`."""
    options = options or OllamaOptions()
    defaults = SamplingParams()
    sampling = SamplingParams(
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
    return fields


async def ndjson(generation: Generation, chunk: Chunk, path: str,
                 after: Callable[[], None] | None) -> AsyncIterator[bytes]:
    """One JSON object per line: a text chunk per event with text, then the done object; an error mid-stream
    becomes ollama's `{"error": ...}` line (the ollama clients raise it)."""
    try:
        async for event in events(generation):
            if event.text:
                yield msgspec.json.encode(chunk(event.text, None)) + b"\n"
            if event.done:
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
        check_format(data.format)
        if data.images:
            raise InvalidFieldError("images", "images are not supported: gdsllm serves text-only models")
        keep_alive = parse_keep_alive(data.keep_alive)
        fields = generation_fields(data.options)
        check_model(store, model)

        def chunk(text: str, done: dict | None) -> OllamaGenerateResponse:
            return OllamaGenerateResponse(model=data.model, created_at=now_rfc3339(), response=text,
                                          done=done is not None, **(done or {}))

        if not data.prompt and not data.system:
            reason = await self._load_or_unload(engine, model, keep_alive)
            return Response(chunk("", {"done_reason": reason}))
        return await self._answer(request, engine, GenerateRequest(
            model=model, prompt=data.prompt, system=data.system, raw=data.raw, truncate=data.truncate, **fields),
            chunk, data.stream, keep_alive)

    @post(urls.OLLAMA_CHAT, status_code=200, responses={**OLLAMA_ERRORS, 200: ResponseSpec(
        OllamaChatResponse, description="one object, or NDJSON of them when `stream` is true (the default)")})
    async def chat(self, data: JSONBody[OllamaChatRequest], request: Request, engine: EngineDep, store: StoreDep,
                   default_model: DefaultModelDep) -> Response:
        """Answer a conversation (ollama's /api/chat)."""
        model = resolve_model(store, data.model, default_model)
        check_format(data.format)
        if data.tools:
            raise InvalidFieldError("tools", "tool calling is not supported by gdsllm", "leave `tools` out")
        for index, message in enumerate(data.messages):
            if message.images:
                raise InvalidFieldError(f"messages[{index}].images", "images are not supported: gdsllm serves "
                                        "text-only models")
        keep_alive = parse_keep_alive(data.keep_alive)
        fields = generation_fields(data.options)
        check_model(store, model)

        def chunk(text: str, done: dict | None) -> OllamaChatResponse:
            return OllamaChatResponse(model=data.model, created_at=now_rfc3339(),
                                      message=OllamaResponseMessage("assistant", text), done=done is not None,
                                      **(done or {}))

        if not data.messages:
            reason = await self._load_or_unload(engine, model, keep_alive)
            return Response(chunk("", {"done_reason": reason}))
        messages = [ChatMessage(role=message.role, content=message.content) for message in data.messages]
        return await self._answer(request, engine, GenerateRequest(
            model=model, messages=messages, truncate=data.truncate, **fields), chunk, data.stream, keep_alive)

    @staticmethod
    async def _answer(request: Request, engine: Engine, generate: GenerateRequest, chunk: Chunk, stream: bool,
                      keep_alive: float | None) -> Response:
        """Submit, then stream NDJSON or answer with one object (cancelled if the client leaves first)."""
        generation = await submit(engine, generate, OPTION_NAMES)
        after = apply_keep_alive(engine, generate.model, keep_alive)
        if stream:
            return Stream(ndjson(generation, chunk, request.url.path, after), media_type=NDJSON)
        text, last = await collect(generation, request.receive)
        if after is not None:
            await anyio.to_thread.run_sync(after)
        return Response(chunk(text, done_fields(last) if last else {"done_reason": "cancelled"}))

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
        manifest = entry.manifest
        model_info = {"general.architecture": manifest.architecture, "general.quantization": manifest.quant,
                      **{f"{manifest.architecture}.{key}": value for key, value in manifest.config.items()}}
        return OllamaShowResponse(modelfile="", parameters="", template=manifest.tokenizer.chat_template or "",
                                  details=catalog.details(entry), model_info=model_info,
                                  modified_at=catalog.modified_at(entry), capabilities=["completion"])

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
    async def version(self) -> OllamaVersionResponse:
        """gdsllm's version."""
        return OllamaVersionResponse(__version__)

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
