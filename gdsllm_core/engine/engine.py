"""The engine: one worker thread owns the device. Requests queue; the worker prefills each new one, then decodes
every active sequence together, one batched step per token (continuous batching); tokens leave as TokenEvents."""

import asyncio
import collections
import contextlib
import gc
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import msgspec
import torch

from gdsllm_core import registry, settings
from gdsllm_core.engine.chat_template import render_chat
from gdsllm_core.engine.detokenizer import IncrementalDetokenizer
from gdsllm_core.engine.embeddings import Embeddings, EmbedJob, finish, pooling_of
from gdsllm_core.engine.forward import LoadOptions
from gdsllm_core.engine.grammar import BatchMasks, GrammarCompiler, advance
from gdsllm_core.engine.prefix_cache import PrefixCache
from gdsllm_core.engine.sampling import Sampled, Sampler, sample_batch
from gdsllm_core.engine.stops import StopMatcher
from gdsllm_core.engine.tokenizer import Tokenizer
from gdsllm_core.engine.tools import (
    ToolFormat,
    auto_grammar,
    call_grammar,
    check_tools,
    template_tool_calls,
    tool_format,
)
from gdsllm_core.errors import BadRequestError, ContextOverflowError, GdsllmError, ModelNotFoundError
from gdsllm_core.layout.store import ModelStore
from gdsllm_core.limits import check_generate, check_keep_alive
from gdsllm_core.types import GenerateRequest, SampledLogprob, TokenEvent, TokenLogprob

DEFAULT_MAX_BATCH = 32
log = logging.getLogger("gdsllm.engine")


class RunningModel(msgspec.Struct):
    """A loaded model, for /api/ps: `expires_at` is when keep_alive unloads it (unix seconds; None: never)."""

    name: str
    size_bytes: int
    vram_bytes: int
    expires_at: float | None
    stats: dict = {}
    device: str = "cpu"
    context_length: int = 0


def default_device() -> str:
    """"cuda" when a GPU is there and GDSLLM_DEVICE is not "cpu", else "cpu"."""
    return "cuda" if settings.device() != "cpu" and torch.cuda.is_available() else "cpu"


class Generation:
    """One request's stream of TokenEvents; iterate it (sync or async) once. Leaving the loop early, or `cancel()`,
    stops the sequence at the next token (the last event then has done_reason "cancelled"). `tool_format` is the
    format to parse tool calls from the text in (None: the request offered no tools)."""

    def __init__(self, request: GenerateRequest, model: str, prompt_ids: list[int], prompt_truncated: bool,
                 n_ctx: int, max_new: int, matcher=None, tool_format: ToolFormat | None = None):
        self.request = request
        self.matcher = matcher
        self.tool_format = tool_format
        self.model = model
        self.prompt_ids = prompt_ids
        self.prompt_tokens = len(prompt_ids)  # lowered by what the prefix cache supplies when the worker starts it
        self.cached_tokens = 0
        self.prompt_truncated = prompt_truncated
        self.n_ctx = n_ctx
        self.max_new = max_new
        self.submitted_ns = time.perf_counter_ns()
        self.load_ns = 0
        self._cancel = threading.Event()
        self._finished = False
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async_events: asyncio.Queue | None = None

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        self._cancel.set()

    def _put(self, item: TokenEvent | BaseException) -> None:
        """Called by the worker: hand an event (or the error that ended the generation) to the consumer."""
        if isinstance(item, BaseException) or item.done:
            self._finished = True
        with self._lock:
            loop, events = self._loop, self._async_events
            if loop is None:
                self._events.put(item)
                return
        try:
            loop.call_soon_threadsafe(events.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is gone
            self.cancel()

    def __iter__(self) -> Iterator[TokenEvent]:
        try:
            while True:
                item = self._events.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.done:
                    return
        finally:
            if not self._finished:
                self.cancel()

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        with self._lock:
            self._loop = asyncio.get_running_loop()
            self._async_events = asyncio.Queue()
            while not self._events.empty():
                self._async_events.put_nowait(self._events.get_nowait())
        try:
            while True:
                item = await self._async_events.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.done:
                    return
        finally:
            if not self._finished:
                self.cancel()

    def collect(self) -> tuple[str, TokenEvent]:
        """Run to the end: (all text, the last event)."""
        parts, last = [], None
        for event in self:
            parts.append(event.text)
            last = event
        return "".join(parts), last


@dataclass
class _Loaded:
    name: str
    forward: Any
    tokenizer: Tokenizer
    size_bytes: int
    vram_bytes: int
    load_ns: int
    masks: BatchMasks


@dataclass
class _Command:
    kind: str  # "load" | "unload" | "close" | "wake" (nothing to do but look at the clock again)
    model: str | None
    future: Future = field(default_factory=Future)


@dataclass
class _Sequence:
    """The worker's state for one active generation."""

    generation: Generation
    cache: Any
    sampler: Sampler
    detokenizer: IncrementalDetokenizer
    stops: StopMatcher
    history: list[int]
    last_token: int = -1
    completion_tokens: int = 0
    prompt_eval_ns: int = 0
    eval_ns: int = 0


class Engine:
    """Generation for every front end. `submit()` validates, tokenizes and checks the context in the caller's thread
    (the first request for a model loads it, which blocks), then queues the request for the worker thread. A request
    for another model than the loaded one waits until the running generations end, then the worker switches."""

    def __init__(self, store: ModelStore | None = None, options: LoadOptions | None = None,
                 keep_alive: float | None = 300.0, max_batch: int = DEFAULT_MAX_BATCH,
                 prefix_cache_bytes: int | None = None):
        self.store = store or ModelStore()
        self.options = options or LoadOptions(device=default_device())
        self.keep_alive = None if keep_alive is None or keep_alive < 0 else check_keep_alive(keep_alive)
        self.max_batch = max_batch
        self.prefix_cache = PrefixCache(settings.prefix_cache_bytes() if prefix_cache_bytes is None
                                        else prefix_cache_bytes)
        self._tokenizers: dict[str, tuple[Tokenizer, int, GrammarCompiler]] = {}  # model -> (…, max context, …)
        self._model: _Loaded | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: collections.deque = collections.deque()
        self._active: list[_Sequence] = []
        self._last_used = time.time()
        self._submits = 0
        self._submits_lock = threading.Lock()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="gdsllm-engine", daemon=True)
        self._worker.start()

    # ---- API (any thread) ----

    def submit(self, request: GenerateRequest) -> Generation:
        if self._closed:
            raise GdsllmError("the engine is closed", "create a new Engine")
        name = request.model or (self._model.name if self._model else None)
        if not name:
            raise ModelNotFoundError("the request names no model and none is loaded",
                                     "give a model name (see `gdsllm list`)")
        _check_request(request)
        if not self.store.exists(name):
            self.store.get(name)  # raises ModelNotFoundError listing the local models
        started = time.perf_counter_ns()
        load_ns = 0
        with self._submitting():
            if name not in self._tokenizers:  # first use: load now, to know the tokenizer and the context size
                self.load(name)
                load_ns = time.perf_counter_ns() - started
            tokenizer, max_context, grammars = self._tokenizers[name]
            fmt = _tool_format(request, tokenizer)
            grammar = request.grammar
            if fmt is not None and request.tool_choice != "auto":
                grammar = call_grammar(fmt, _chosen_tools(request), request.parallel_tool_calls)
            elif fmt is not None and grammar is None:
                grammar = auto_grammar(fmt, request.tools)
            matcher = grammars.matcher(grammar) if grammar is not None else None
            prompt_ids = _prompt_ids(request, tokenizer, name, fmt is not None)
            n_ctx = min(request.num_ctx or settings.default_num_ctx(), max_context)
            prompt_ids, truncated = _fit_context(prompt_ids, n_ctx, request, max_context, tokenizer.bos_id)
            room = n_ctx - len(prompt_ids)
            max_new = room if request.max_tokens is None else min(request.max_tokens, room)
            generation = Generation(request, name, prompt_ids, truncated, n_ctx, max_new, matcher, fmt)
            generation.submitted_ns = started
            generation.load_ns = load_ns
            self._inbox.put(generation)
        return generation

    def embed(self, model: str, texts: list[str | list[int]], truncate: bool = True, num_ctx: int | None = None,
              normalize: bool = True, dimensions: int | None = None) -> Embeddings:
        """One vector per text (or list of token ids): the final hidden states pooled per the model's convention (`pooling_of`),
        L2-normalised unless `normalize` is False. A text longer than the context (`num_ctx` or GDSLLM_NUM_CTX,
        capped by the model) loses its end with `truncate`, else is a ContextOverflowError."""
        name = model or (self._model.name if self._model else None)
        if not name:
            raise ModelNotFoundError("the request names no model and none is loaded",
                                     "give a model name (see `gdsllm list`)")
        if dimensions is not None and dimensions < 1:
            raise BadRequestError(f"dimensions {dimensions} must be positive", "ask for at least 1 dimension")
        started = time.perf_counter_ns()
        load_ns = 0
        entry = self.store.get(name)
        with self._submitting():
            if name not in self._tokenizers:
                self.load(name)
                load_ns = time.perf_counter_ns() - started
            tokenizer, max_context = self._tokenizers[name]
            n_ctx = min(num_ctx or settings.default_num_ctx(), max_context)
            inputs = []
            for index, text in enumerate(texts):
                ids = (_check_token_ids(text, tokenizer, f"input {index}") if isinstance(text, list)
                       else tokenizer.encode(text, add_special=True))
                if not ids:
                    raise BadRequestError(f"input {index} is empty", "send some text to embed")
                if len(ids) > n_ctx:
                    if not truncate:
                        raise ContextOverflowError(
                            f"input {index} is {len(ids)} tokens but the context window is {n_ctx} tokens",
                            f"shorten it, raise num_ctx (up to {max_context}) or allow truncation")
                    ids = ids[:n_ctx]
                inputs.append(ids)
            job = EmbedJob(name, inputs, pooling_of(entry.manifest))
            self._inbox.put(job)
        vectors = job.future.result()
        return Embeddings([finish(vector, normalize, dimensions) for vector in vectors],
                          sum(len(ids) for ids in inputs), load_ns, time.perf_counter_ns() - started)

    @contextlib.contextmanager
    def _submitting(self) -> Iterator[None]:
        """While a submit is between loading its model and queueing its request, keep_alive unloads nothing."""
        with self._submits_lock:
            self._submits += 1
        try:
            yield
        finally:
            with self._submits_lock:
                self._submits -= 1
                idle = self._submits == 0
            if idle:
                self._inbox.put(_Command("wake", None))  # let the worker re-check keep_alive

    def set_keep_alive(self, seconds: float | None) -> None:
        """How long the loaded model stays after its last request (None or negative: forever); takes effect at
        once. A value beyond limits.KEEP_ALIVE_MAX_S is refused (InvalidFieldError)."""
        self.keep_alive = None if seconds is None or seconds < 0 else check_keep_alive(seconds)
        self._inbox.put(_Command("wake", None))

    def load(self, model: str) -> None:
        """Load `model` (unloading the previous one once its running generations end); blocks until done."""
        self._command("load", model)

    def unload(self, model: str | None = None) -> None:
        """Unload `model` (or whatever is loaded) once its running generations end; blocks until done."""
        self._command("unload", model)

    def running(self) -> list[RunningModel]:
        loaded = self._model
        if loaded is None:
            return []
        if self.keep_alive is None:
            expires_at = None
        else:
            busy = bool(self._active or self._waiting)
            expires_at = (time.time() if busy else self._last_used) + self.keep_alive
        stats = {**_safe_stats(loaded.forward), "load_ns": loaded.load_ns, "active_sequences": len(self._active),
                 "waiting_requests": len(self._waiting)}
        stats["prefix_cache"] = self.prefix_cache.stats()
        return [RunningModel(name=loaded.name, size_bytes=loaded.size_bytes, vram_bytes=loaded.vram_bytes,
                             expires_at=expires_at, stats=stats, device=str(loaded.forward.device),
                             context_length=int(loaded.forward.max_context))]

    def close(self) -> None:
        """Cancel what runs, unload, stop the worker."""
        if self._closed:
            return
        self._closed = True
        if self._worker.is_alive():
            self._command("close", None)
            self._worker.join()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _command(self, kind: str, model: str | None) -> None:
        if threading.current_thread() is self._worker:
            raise RuntimeError("engine commands cannot be issued from the engine's worker")
        if not self._worker.is_alive():
            raise GdsllmError("the engine is closed", "create a new Engine")
        command = _Command(kind, model)
        self._inbox.put(command)
        command.future.result()

    # ---- worker ----

    def _run(self) -> None:
        while True:
            try:
                self._receive(block=not self._active)
                if self._serve_waiting():
                    return
                if self._active:
                    self._decode_step()
                elif not self._waiting:
                    self._maybe_expire()
            except BaseException as exc:  # a bug must end the generations it touched, not the worker
                log.exception("the engine's worker caught an error; ending the running generations")
                for sequence in self._active:
                    sequence.generation._put(exc)
                self._active.clear()

    def _receive(self, block: bool) -> None:
        """Move new requests and commands to the waiting line; when idle, sleep until one comes or keep_alive ends."""
        if block and not self._waiting:
            try:
                self._waiting.append(self._inbox.get(timeout=self._seconds_to_expiry()))
            except queue.Empty:
                return
        while True:
            try:
                self._waiting.append(self._inbox.get_nowait())
            except queue.Empty:
                return

    def _seconds_to_expiry(self) -> float | None:
        if self._model is None or self.keep_alive is None or self._submits:
            return None
        return min(max(0.0, self._last_used + self.keep_alive - time.time()), threading.TIMEOUT_MAX)

    def _maybe_expire(self) -> None:
        remaining = self._seconds_to_expiry()
        if remaining is not None and remaining <= 0:
            self._unload()

    def _serve_waiting(self) -> bool:
        """Start what can start, in arrival order; returns True when the engine must stop."""
        for item in list(self._waiting):
            if isinstance(item, Generation) and item.cancelled:
                self._waiting.remove(item)
                self._finish_unstarted(item, "cancelled")
        while self._waiting:
            item = self._waiting[0]
            if isinstance(item, _Command):
                if item.kind == "wake":
                    self._waiting.popleft()
                    continue
                if item.kind == "close":
                    self._shutdown(item)
                    return True
                loaded = self._loaded_name()
                if self._active and (item.model != loaded if item.kind == "load" else item.model in (None, loaded)):
                    return False  # wait for the running generations of the current model to end
                self._waiting.popleft()
                try:
                    if item.kind == "load":
                        self._load(item.model)
                    elif item.model in (None, loaded):
                        self._unload()
                    item.future.set_result(None)
                except BaseException as exc:
                    item.future.set_exception(exc)
                continue
            if item.model != self._loaded_name() and self._active:
                return False
            if isinstance(item, EmbedJob):
                self._waiting.popleft()
                self._embed(item)
                continue
            if len(self._active) >= self.max_batch:
                return False
            self._waiting.popleft()
            self._start(item)
        return False

    def _loaded_name(self) -> str | None:
        return self._model.name if self._model else None

    def _load(self, name: str) -> None:
        if self._loaded_name() == name:
            return
        self._unload()
        began = time.perf_counter_ns()
        entry = self.store.get(name)
        forward_cls = registry.get_forward_pass(entry.manifest.architecture)
        tokenizer = Tokenizer.from_entry(entry)
        cuda = torch.device(self.options.device).type == "cuda"
        before = torch.cuda.memory_allocated(torch.device(self.options.device)) if cuda else 0
        forward = forward_cls(entry, self.options)
        vram = torch.cuda.memory_allocated(torch.device(self.options.device)) - before if cuda else 0
        vocab = int(forward.vocab_size)
        self._tokenizers[name] = (tokenizer, int(forward.max_context), GrammarCompiler(tokenizer, vocab))
        self._model = _Loaded(name, forward, tokenizer, entry.size_bytes, vram, time.perf_counter_ns() - began,
                              BatchMasks(vocab, pinned=cuda))
        self._last_used = time.time()

    def _unload(self) -> None:
        self.prefix_cache.clear()
        loaded, self._model = self._model, None
        if loaded is None:
            return
        loaded.forward.close()
        loaded.masks.close()
        del loaded
        gc.collect()
        if torch.device(self.options.device).type == "cuda":
            torch.cuda.empty_cache()

    def _shutdown(self, command: _Command) -> None:
        for sequence in self._active:
            self._finish(sequence, "cancelled", self._drain(sequence))
        self._active.clear()
        for item in self._waiting:
            if isinstance(item, Generation):
                self._finish_unstarted(item, "cancelled")
            elif isinstance(item, EmbedJob):
                item.future.set_exception(GdsllmError("the engine was closed"))
            elif item is not command:
                item.future.set_exception(GdsllmError("the engine was closed"))
        self._waiting.clear()
        try:
            self._unload()
            command.future.set_result(None)
        except BaseException as exc:
            command.future.set_exception(exc)

    def _start(self, generation: Generation) -> None:
        """Prefill one request and sample its first token; it joins the batch unless that already ends it."""
        try:
            if generation.model != self._loaded_name():
                began = time.perf_counter_ns()
                self._load(generation.model)
                generation.load_ns += time.perf_counter_ns() - began
            if generation.max_new <= 0:
                self._finish_unstarted(generation, "length")
                return
            loaded = self._model
            forward = loaded.forward
            began = time.perf_counter_ns()
            ids = generation.prompt_ids
            cache, reused = self._cached_prefix(forward, ids, len(ids) + generation.max_new)
            generation.cached_tokens, generation.prompt_tokens = reused, len(ids) - reused
            logits = forward.prefill(torch.tensor(ids[reused:], dtype=torch.long, device=forward.device), cache)
            sampler = Sampler(generation.request.sampling, len(ids), generation.request.logprobs, generation.matcher)
            sequence = _Sequence(
                generation=generation, cache=cache, sampler=sampler,
                detokenizer=IncrementalDetokenizer(loaded.tokenizer, context_ids=ids),
                stops=StopMatcher(generation.request.stop), history=list(ids))
            masks = loaded.masks.start([sampler.matcher])
            first = sample_batch(logits.reshape(1, -1), [sampler], [sequence.history],
                                 masks.result() if masks else None)[0]
            sequence.prompt_eval_ns = time.perf_counter_ns() - began
        except BaseException as exc:
            generation._put(exc)
            return
        self._last_used = time.time()
        if not self._accept(sequence, first):
            self._active.append(sequence)

    def _cached_prefix(self, forward: Any, ids: list[int], max_tokens: int) -> tuple[Any, int]:
        """(cache, tokens it already holds): the longest cached prefix of `ids` cut to leave at least one token
        to compute, or a new empty cache."""
        taken = self.prefix_cache.take(self._model.name, ids) if hasattr(forward, "reuse_cache") else None
        if taken is not None:
            entry, shared = taken
            keep = min(shared, len(ids) - 1)
            cache = forward.reuse_cache(entry.cache, keep, max_tokens) if keep > 0 else None
            if cache is not None:
                self.prefix_cache.hits += 1
                self.prefix_cache.reused_tokens += keep
                return cache, keep
            self.prefix_cache.misses += 1
            self.prefix_cache.put(entry.model, entry.tokens, entry.cache)  # untouched: another prompt may fit it
        return forward.new_cache(max_tokens), 0

    def _decode_step(self) -> None:
        """One token for every active sequence: one batched forward step, then one batched sampling pass (each
        sequence with its own options and generator)."""
        for sequence in [s for s in self._active if s.generation.cancelled]:
            self._active.remove(sequence)
            self._finish(sequence, "cancelled", self._drain(sequence))
        if not self._active:
            return
        batch = list(self._active)
        forward = self._model.forward
        began = time.perf_counter_ns()
        try:
            masks = self._model.masks.start([s.sampler.matcher for s in batch])  # overlaps the forward pass
            tokens = torch.tensor([s.last_token for s in batch], dtype=torch.long, device=forward.device)
            logits = forward.decode(tokens, [s.cache for s in batch])
            picked = sample_batch(logits, [s.sampler for s in batch], [s.history for s in batch],
                                  masks.result() if masks else None)
        except BaseException as exc:
            self._active.clear()
            for sequence in batch:
                sequence.generation._put(exc)
            return
        step_ns = time.perf_counter_ns() - began
        for sequence, sampled in zip(batch, picked, strict=True):
            sequence.eval_ns += step_ns
            if self._accept(sequence, sampled):
                self._active.remove(sequence)
        self._last_used = time.time()

    def _accept(self, sequence: _Sequence, sampled: Sampled) -> bool:
        """Turn a sampled token into an event; True when the sequence is done."""
        token = sampled.token
        sequence.completion_tokens += 1
        sequence.history.append(token)
        sequence.last_token = token
        tokenizer = self._model.tokenizer
        if token in tokenizer.eos_ids:
            self._finish(sequence, "stop", self._drain(sequence), token)
            return True
        if sequence.sampler.matcher is not None:
            advance(sequence.sampler.matcher, token)
        logprob = None if sampled.logprob is None else SampledLogprob(
            token, _token_text(tokenizer, token), sampled.logprob,
            [TokenLogprob(i, _token_text(tokenizer, i), value) for i, value in sampled.top])
        text, stopped = sequence.stops.feed(sequence.detokenizer.add(token))
        if stopped:
            self._finish(sequence, "stop", text, token, logprob)
            return True
        if sequence.completion_tokens >= sequence.generation.max_new:
            self._finish(sequence, "length", text + self._drain(sequence), token, logprob)
            return True
        sequence.generation._put(TokenEvent(text=text, token_id=token, logprob=logprob))
        return False

    @staticmethod
    def _drain(sequence: _Sequence) -> str:
        """What the detokenizer and the stop matcher still hold, at the end of a generation."""
        text, stopped = sequence.stops.feed(sequence.detokenizer.flush())
        return text if stopped else text + sequence.stops.flush()

    def _finish(self, sequence: _Sequence, reason: str, text: str, token: int | None = None,
                logprob: SampledLogprob | None = None) -> None:
        generation = sequence.generation
        generation._put(TokenEvent(
            text=text, token_id=token, logprob=logprob, done=True, done_reason=reason,
            prompt_tokens=generation.prompt_tokens, cached_tokens=generation.cached_tokens,
            completion_tokens=sequence.completion_tokens, prompt_truncated=generation.prompt_truncated,
            load_ns=generation.load_ns, prompt_eval_ns=sequence.prompt_eval_ns, eval_ns=sequence.eval_ns,
            total_ns=time.perf_counter_ns() - generation.submitted_ns, tokens=list(sequence.history)))
        if self._model is not None and hasattr(self._model.forward, "reuse_cache"):
            # the cache holds every token but the last one sampled (never fed back)
            self.prefix_cache.put(self._model.name, sequence.history[:-1], sequence.cache)
        sequence.cache = None

    def _embed(self, job: EmbedJob) -> None:
        """Run an embedding job on the loaded model (loading `job.model` first when another is loaded)."""
        try:
            self._load(job.model)
        except BaseException as exc:
            job.future.set_exception(exc)
            return
        job.run(self._model.forward)
        self._last_used = time.time()

    @staticmethod
    def _finish_unstarted(generation: Generation, reason: str) -> None:
        generation._put(TokenEvent(
            text="", done=True, done_reason=reason, prompt_tokens=generation.prompt_tokens,
            prompt_truncated=generation.prompt_truncated, load_ns=generation.load_ns,
            total_ns=time.perf_counter_ns() - generation.submitted_ns, tokens=list(generation.prompt_ids)))


def _safe_stats(forward: Any) -> dict:
    try:
        return dict(forward.stats())
    except Exception:  # statistics must never break /api/ps
        return {}


def _check_request(request: GenerateRequest) -> None:
    if (request.messages is None) == (request.prompt is None):
        raise BadRequestError("a request needs exactly one of `messages` (chat) or `prompt` (completion)",
                              "send either messages or a prompt")
    if request.messages is not None and not request.messages:
        raise BadRequestError("`messages` is empty", "send at least one message")
    if any(not isinstance(stop, str) or not stop for stop in request.stop):
        raise BadRequestError("stop strings must be non-empty strings", "remove the empty stop string")
    if request.logprobs is not None and not 0 <= request.logprobs <= 20:
        raise BadRequestError(f"top logprobs {request.logprobs} is out of range", "ask for 0 to 20 alternatives")
    if request.tool_choice not in ("auto", "none") and not request.tools:
        raise BadRequestError(f"tool_choice {request.tool_choice!r} needs tools", "send `tools` too")
    if request.tools:
        check_tools(request.tools)
        if request.grammar is not None and request.tool_choice not in ("auto", "none"):
            raise BadRequestError("a forced tool call and a response format cannot both constrain the output",
                                  "drop the response format or let the model choose (tool_choice auto)")
    check_generate(request)


def _tool_format(request: GenerateRequest, tokenizer: Tokenizer) -> ToolFormat | None:
    """The format tool calls are parsed in, or None when no tools are offered (or tool_choice is "none")."""
    if not request.tools or request.tool_choice == "none":
        return None
    fmt = tool_format(tokenizer.chat_template)
    if fmt is None:
        raise BadRequestError("this model's chat template has no tool-call format gdsllm knows (Hermes "
                              "<tool_call>, Llama 3.1 JSON, Mistral [TOOL_CALLS])",
                              "use a model made for tool calling (e.g. Qwen2.5, Llama 3.1), or leave `tools` out")
    if request.messages is None:
        raise BadRequestError("tools need a chat request (messages)", "send `messages` instead of a prompt")
    return fmt


def _chosen_tools(request: GenerateRequest) -> list[dict]:
    """The tools a forced call may use: all for "required", the named one otherwise."""
    if request.tool_choice == "required":
        return request.tools
    named = [tool for tool in request.tools if tool["function"]["name"] == request.tool_choice]
    if not named:
        raise BadRequestError(f"tool_choice names {request.tool_choice!r}, which is not in `tools`",
                              "name one of the tools sent")
    return named


def _token_text(tokenizer: Tokenizer, token: int) -> str:
    return tokenizer.decode([token], skip_special=False)


def _message_dict(message) -> dict:
    """A ChatMessage as chat templates read it (OpenAI's shape)."""
    fields = {"role": message.role, "content": message.content}
    if message.tool_calls:
        fields["tool_calls"] = template_tool_calls(message.tool_calls)
    if message.name is not None:
        fields["name"] = message.name
    if message.tool_call_id is not None:
        fields["tool_call_id"] = message.tool_call_id
    return fields


def _prompt_ids(request: GenerateRequest, tokenizer: Tokenizer, model: str, with_tools: bool = False) -> list[int]:
    """Token ids of the prompt: the chat template over the messages (and tools), or over system + prompt unless
    `raw`; a prompt of token ids as it is."""
    if isinstance(request.prompt, list):
        if not request.prompt:
            raise BadRequestError("the prompt is empty", "send some tokens")
        bad = [token for token in request.prompt if not 0 <= token < tokenizer.vocab_size]
        if bad:
            raise BadRequestError(f"prompt token id {bad[0]} is outside the vocabulary (0..{tokenizer.vocab_size - 1})",
                                  "send token ids of this model's tokenizer")
        return list(request.prompt)
    if request.messages is not None:
        messages = [_message_dict(m) for m in request.messages]
        if request.system and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": request.system})
    elif request.raw:
        messages = None
    else:
        messages = ([{"role": "system", "content": request.system}] if request.system else []) + \
                   [{"role": "user", "content": request.prompt}]
    tools = {"tools": request.tools} if with_tools else {}
    text = request.prompt if messages is None else render_chat(
        messages, tokenizer.chat_template, add_generation_prompt=True,
        bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token, model=repr(model), **tools)
    if request.context:  # an earlier exchange's tokens, continued by this prompt (no second BOS)
        return (_check_token_ids(request.context, tokenizer, "context")
                + tokenizer.encode(text, add_special=False))
    ids = tokenizer.encode(text, add_special=True)
    if not ids:
        raise BadRequestError("the prompt is empty", "send some text")
    return ids


def _check_token_ids(ids: list[int], tokenizer: Tokenizer, what: str) -> list[int]:
    vocab = tokenizer.vocab_size
    bad = next((token for token in ids if not isinstance(token, int) or not 0 <= token < vocab), None)
    if bad is not None:
        raise BadRequestError(f"{what} holds {bad!r}, which is not a token id of this model (0 to {vocab - 1})",
                              "send token ids this model's tokenizer produced")
    return list(ids)


def _fit_context(ids: list[int], n_ctx: int, request: GenerateRequest, max_context: int,
                 bos_id: int | None) -> tuple[list[int], bool]:
    """The prompt must leave room for one new token: else ContextOverflowError, or (with `truncate`) drop from the
    left, keeping BOS and at most half the context's room for new tokens."""
    if len(ids) < n_ctx:
        return ids, False
    if not request.truncate:
        raise ContextOverflowError(
            f"the prompt is {len(ids)} tokens but the context window is {n_ctx} tokens "
            f"(num_ctx {request.num_ctx or 'default ' + str(settings.default_num_ctx())}, "
            f"model maximum {max_context}); at least one token must be left to generate",
            f"shorten the prompt, or raise the context window up to {max_context}: GDSLLM_NUM_CTX for `gdsllm run` "
            "and the server's default, `options.num_ctx` in an ollama request; or send `\"truncate\": true`")
    room = min(request.max_tokens or n_ctx // 2, n_ctx // 2) or 1
    keep = n_ctx - room
    head = [bos_id] if bos_id is not None and ids[0] == bos_id else []
    return head + ids[len(ids) - (keep - len(head)):], True
