"""The bridge between the routes and the engine: submit off the event loop, iterate a generation's events, and
cancel the generation as soon as nobody is listening any more (client gone, server shutting down)."""

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

import anyio
from litestar.types import Receive

from gdsllm_core.errors import GdsllmError, ModelNotFoundError
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
    if not is_valid_name(name):  # a hub source as /api/pull got it ("hf.co/user/repo:Q4_K_M"): its store name
        pulled = pulled_name(name)
        if pulled is not None and store.exists(pulled):
            return pulled
    bare = name.removesuffix(":latest")
    if bare != name and is_valid_name(name) and not store.exists(name) and store.exists(bare):
        return bare
    return name


def pulled_name(source: str) -> str | None:
    """The store name `gdsllm pull SOURCE` gives a hub source, or None for other text."""
    from gdsllm_core.pull import default_model_name, parse_source

    try:
        parsed = parse_source(source)
    except (GdsllmError, ValueError, OSError):  # ValueError: text no file name can hold (e.g. lone surrogates)
        return None
    return default_model_name(parsed.repo_id, parsed.quant) if parsed.repo_id else None


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


async def collect_all(generations: list[Generation], receive: Receive) -> list[list[TokenEvent]]:
    """Every event of each non-streamed generation, run together; all are cancelled (and an empty list returned
    for each unfinished one) if the client disconnects while they run. The engine's errors are re-raised as they
    are (not wrapped in an exception group)."""
    collected: list[list[TokenEvent]] = [[] for _ in generations]
    failures: list[Exception] = []
    async with anyio.create_task_group() as group:
        async def watch_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            group.cancel_scope.cancel()

        async def consume(index: int, generation: Generation) -> None:
            try:
                async for event in events(generation):
                    collected[index].append(event)
            except Exception as exc:
                failures.append(exc)
                group.cancel_scope.cancel()

        async with anyio.create_task_group() as consumers:
            for index, generation in enumerate(generations):
                consumers.start_soon(consume, index, generation)
            group.start_soon(watch_disconnect)
        group.cancel_scope.cancel()
    if failures:
        raise failures[0]
    return [events_ if events_ and events_[-1].done else [] for events_ in collected]


async def merged(generations: list[Generation]) -> AsyncIterator[tuple[int, TokenEvent]]:
    """(index, event) of several generations as their events come; all are cancelled if the consumer stops."""
    queue: asyncio.Queue = asyncio.Queue()

    async def forward(index: int, generation: Generation) -> None:
        try:
            async for event in events(generation):
                queue.put_nowait((index, event))
        except Exception as exc:
            queue.put_nowait((index, exc))

    tasks = [asyncio.ensure_future(forward(index, generation)) for index, generation in enumerate(generations)]
    try:
        finished = 0
        while finished < len(generations):
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            finished += item.done
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        for generation in generations:
            generation.cancel()


async def submit_all(engine: Engine, requests: list[GenerateRequest],
                     field_names: Mapping[str, str] = {}) -> list[Generation]:
    """Submit several requests (they decode in the same batches); if one is refused, those submitted are cancelled."""
    generations: list[Generation] = []
    try:
        for request in requests:
            generations.append(await submit(engine, request, field_names))
    except BaseException:
        for generation in generations:
            generation.cancel()
        raise
    return generations


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
