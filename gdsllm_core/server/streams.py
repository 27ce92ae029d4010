"""The bridge between the routes and the engine: submit off the event loop, iterate a generation's events, and
cancel the generation as soon as nobody is listening any more (client gone, server shutting down)."""

import time
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

import anyio
from litestar.types import Receive

from gdsllm_core.errors import ModelNotFoundError
from gdsllm_core.layout.store import ModelEntry, ModelStore, is_valid_name
from gdsllm_core.limits import check_generate
from gdsllm_core.types import GenerateRequest, TokenEvent


@runtime_checkable
class Generation(Protocol):
    def __aiter__(self) -> AsyncIterator[TokenEvent]: ...

    def cancel(self) -> None: ...


@runtime_checkable
class Engine(Protocol):
    """The surface of `gdsllm_core.engine.engine.Engine` the server uses."""

    def submit(self, request: GenerateRequest) -> Generation: ...

    def load(self, model: str) -> None: ...

    def unload(self, model: str | None = None) -> None: ...

    def running(self) -> list[Any]: ...

    def close(self) -> None: ...


def resolve_model(store: ModelStore, name: str, default: str | None) -> str:
    """The store's name for a requested model: "" is the served default (or the engine's loaded model), and
    ollama's implicit ":latest" tag is dropped when the store has the bare name."""
    if not name:
        return default or ""
    bare = name.removesuffix(":latest")
    if bare != name and is_valid_name(name) and not store.exists(name) and store.exists(bare):
        return bare
    return name


def find_model(store: ModelStore, name: str) -> ModelEntry:
    """The stored model, or ModelNotFoundError (404), also for names no model can have."""
    if not is_valid_name(name):
        raise ModelNotFoundError(f"model {name!r} not found", "see the local models at /api/tags or /v1/models")
    return store.get(name)


def check_model(store: ModelStore, name: str) -> None:
    """404 before any generation work when a named model is not in the store ("" is the engine's business). Only a
    stat: the manifest is decoded by the engine, off the event loop."""
    if name and not (is_valid_name(name) and store.exists(name)):
        raise ModelNotFoundError(f"model {name!r} not found", "see the local models at /api/tags or /v1/models")


async def submit(engine: Engine, request: GenerateRequest, field_names: Mapping[str, str] = {}) -> Generation:
    """Check every numeric option's range (a 400 names the field as `field_names` spells it in the dialect), then
    `Engine.submit`, which may load a model and tokenize, on a worker thread."""
    check_generate(request, field_names)
    return await anyio.to_thread.run_sync(engine.submit, request)


OPEN_GENERATIONS: set[Generation] = set()  # being answered now: a shutdown ends them so their streams close cleanly


def cancel_open_generations() -> None:
    """End every generation being answered: each stops at its next token with a last event ("cancelled"), so every
    open stream still sends its final chunk. Called when the server is asked to stop."""
    for generation in list(OPEN_GENERATIONS):
        generation.cancel()


async def events(generation: Generation) -> AsyncIterator[TokenEvent]:
    """The generation's events up to the done one; if the consumer stops early, the generation is cancelled."""
    finished = False
    OPEN_GENERATIONS.add(generation)
    try:
        async for event in generation:
            finished = event.done
            yield event
            if finished:
                return
    finally:
        OPEN_GENERATIONS.discard(generation)
        if not finished:
            generation.cancel()


async def collect(generation: Generation, receive: Receive) -> tuple[str, TokenEvent | None]:
    """The whole text and the last event of a non-streamed generation; the generation is cancelled (and None
    returned as the last event) if the client disconnects while it runs. The engine's errors are re-raised as
    they are (not wrapped in an exception group)."""
    parts: list[str] = []
    last: TokenEvent | None = None
    failure: Exception | None = None
    async with anyio.create_task_group() as group:
        async def watch_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            group.cancel_scope.cancel()

        group.start_soon(watch_disconnect)
        try:
            async for event in events(generation):
                parts.append(event.text)
                last = event
        except Exception as exc:
            failure = exc
        group.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return "".join(parts), last if last is not None and last.done else None


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def unix_to_rfc3339(seconds: float | None) -> str | None:
    """RFC 3339 of a unix time; None for none, and for one no calendar can hold."""
    try:
        return None if seconds is None else datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")
    except (OverflowError, ValueError, OSError):
        return None


def unix_now() -> int:
    return int(time.time())
