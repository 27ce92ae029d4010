"""Embedding routes of both dialects: ollama's /api/embed (normalised vectors, several inputs, `truncate`), the legacy
/api/embeddings (one unnormalised vector) and OpenAI's /v1/embeddings (normalised; `encoding_format` float or
base64)."""

import base64

import anyio
import numpy as np
from litestar import Controller, post
from litestar.params import JSONBody

from gdsllm_core.server import urls
from gdsllm_core.server.deps import DefaultModelDep, EngineDep, StoreDep
from gdsllm_core.server.errors import OLLAMA_ERRORS, OPENAI_ERRORS, InvalidFieldError
from gdsllm_core.server.ollama import apply_keep_alive, parse_keep_alive
from gdsllm_core.server.schemas import (
    OllamaEmbeddingsRequest,
    OllamaEmbeddingsResponse,
    OllamaEmbedRequest,
    OllamaEmbedResponse,
    OllamaOptions,
    OpenAIEmbedding,
    OpenAIEmbeddingList,
    OpenAIEmbeddingRequest,
    OpenAIEmbeddingUsage,
)
from gdsllm_core.server.streams import Engine, check_model, resolve_model


def embed_num_ctx(options: OllamaOptions | None) -> int | None:
    """The one option that applies to embeddings is `num_ctx`; sampling options set to a value are refused."""
    if options is None:
        return None
    for name in options.__struct_fields__:
        if name != "num_ctx" and getattr(options, name) is not None:
            raise InvalidFieldError(f"options.{name}", f"options.{name} does not apply to embeddings",
                                    "leave it out (only num_ctx applies)")
    return options.num_ctx


def openai_inputs(value: str | list) -> list[str | list[int]]:
    """OpenAI's `input` as a list of texts or token-id lists (one kind per request, none empty)."""
    if isinstance(value, str) or (value and all(isinstance(item, int) for item in value)):
        inputs = [value]
    elif all(isinstance(item, str) for item in value) or all(isinstance(item, list) for item in value):
        inputs = list(value)
    else:
        raise InvalidFieldError("input", "`input` mixes texts, token ids and token-id lists",
                                "send a text, a list of texts, a list of token ids or a list of such lists")
    if not inputs or any(len(item) == 0 for item in inputs):
        raise InvalidFieldError("input", "`input` must not be empty", "send a text, or a list of texts")
    return inputs


async def embed(engine: Engine, model: str, inputs: list, truncate: bool, num_ctx: int | None, normalize: bool,
                dimensions: int | None):
    return await anyio.to_thread.run_sync(lambda: engine.embed(model, inputs, truncate=truncate, num_ctx=num_ctx,
                                                               normalize=normalize, dimensions=dimensions))


class EmbeddingsController(Controller):
    tags = ["embeddings"]

    @post(urls.OLLAMA_EMBED, status_code=200, responses=OLLAMA_ERRORS)
    async def ollama_embed(self, data: JSONBody[OllamaEmbedRequest], engine: EngineDep, store: StoreDep,
                           default_model: DefaultModelDep) -> OllamaEmbedResponse:
        """One L2-normalised vector per input (ollama's /api/embed); an input longer than the context loses its end
        unless `truncate` is false (then 400)."""
        model = resolve_model(store, data.model, default_model)
        check_model(store, model)
        num_ctx = embed_num_ctx(data.options)
        keep_alive = parse_keep_alive(data.keep_alive)
        inputs = [data.input] if isinstance(data.input, str) else list(data.input)
        if data.input in ("", []):  # ollama: an empty input only loads the model
            await anyio.to_thread.run_sync(engine.load, model)
            apply_keep_alive(engine, model, keep_alive)
            return OllamaEmbedResponse(model=data.model, embeddings=[])
        result = await embed(engine, model, inputs, data.truncate, num_ctx, True, data.dimensions)
        after = apply_keep_alive(engine, model, keep_alive)
        if after is not None:
            await anyio.to_thread.run_sync(after)
        return OllamaEmbedResponse(model=data.model, embeddings=result.vectors, total_duration=result.total_ns,
                                   load_duration=result.load_ns, prompt_eval_count=result.prompt_tokens)

    @post(urls.OLLAMA_EMBEDDINGS, status_code=200, responses=OLLAMA_ERRORS)
    async def ollama_embeddings(self, data: JSONBody[OllamaEmbeddingsRequest], engine: EngineDep, store: StoreDep,
                                default_model: DefaultModelDep) -> OllamaEmbeddingsResponse:
        """The legacy route: one vector, not normalised (as ollama's), the prompt truncated to the context."""
        model = resolve_model(store, data.model, default_model)
        check_model(store, model)
        num_ctx = embed_num_ctx(data.options)
        keep_alive = parse_keep_alive(data.keep_alive)
        if not data.prompt:
            await anyio.to_thread.run_sync(engine.load, model)
            apply_keep_alive(engine, model, keep_alive)
            return OllamaEmbeddingsResponse([])
        result = await embed(engine, model, [data.prompt], True, num_ctx, False, None)
        after = apply_keep_alive(engine, model, keep_alive)
        if after is not None:
            await anyio.to_thread.run_sync(after)
        return OllamaEmbeddingsResponse(result.vectors[0])

    @post(urls.OPENAI_EMBEDDINGS, status_code=200, responses=OPENAI_ERRORS)
    async def openai_embeddings(self, data: JSONBody[OpenAIEmbeddingRequest], engine: EngineDep, store: StoreDep,
                                default_model: DefaultModelDep) -> OpenAIEmbeddingList:
        """OpenAI's embeddings: texts or token-id lists, L2-normalised; an input longer than the context is a 400
        (as OpenAI's API); base64 is little-endian float32, as the openai client decodes it."""
        model = resolve_model(store, data.model, default_model)
        check_model(store, model)
        inputs = openai_inputs(data.input)
        result = await embed(engine, model, inputs, False, None, True, data.dimensions)
        data_items = [OpenAIEmbedding(index=index, embedding=(
            base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
            if data.encoding_format == "base64" else vector)) for index, vector in enumerate(result.vectors)]
        return OpenAIEmbeddingList(data=data_items, model=data.model,
                                   usage=OpenAIEmbeddingUsage(result.prompt_tokens, result.prompt_tokens))
