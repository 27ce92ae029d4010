"""Expert residency: the MoE experts of a model in two tiers (VRAM in front of host RAM) over storage, at the
granularity of one expert = one extent = one read. Any MoE plugin uses it: it names its expert extents by
(layer, expert) and says how an extent's views become the weights its math takes; the routing helpers and
`routed_experts` (the weighted sum over the routed experts, computed as their reads land) are shared too.

Per layer the router runs first; only the experts it picked (the union over every token of the step: the batch in
decode, the prompt chunk in prefill) are fetched. `ExpertResidency.stream_groups` hands them out as they become
available: VRAM-tier hits at once, host-tier hits after their copy to the device, and storage misses as each one's
read lands (all misses are submitted together at the start, one future per expert), so the compute of the first
experts overlaps the reads of the others. Reads land in pooled host buffers (pinned when computing on a GPU) and
are copied into pooled device buffers on the compute stream: steady-state decoding allocates nothing.

Tiers: each holds experts under its own byte budget (`LfuTier`); eviction drops the expert requested least often
(ties: least recently used), never one the current step uses, and never for a rarer newcomer. The host tier admits
experts read from storage; the VRAM tier admits every expert it did not already hold (promotion from the host tier
or straight from storage), keeping the device copy just made. The VRAM tier is device-agnostic: with device "cpu"
and a budget it holds copies in host memory (what the CPU tests exercise). Admissions happen once the step's
experts are all in, in request order, so cache contents never depend on read completion order. Statistics (always
on, typed: `ExpertStats`): hits per tier, misses (storage reads), bytes read, evictions, read-ahead.

Read-ahead (`ExpertResidency.prefetch`): the experts predicted for the next layer that are neither cached nor on
their way are read asynchronously into pooled buffers held beside the tiers (not counted in `cached_bytes`). The
next layer's `stream_groups` takes those it needs (waiting on the read only if it has not landed) and passes them
through the same admission as synchronous misses, in the same order, so the tiers hold exactly what they would
without read-ahead; the rest are waste, returned to the pool once landed. Host RAM is thus at most the budget plus
the read-ahead in flight (at most two layers' predictions, which the caller caps)."""

import heapq
import itertools
import time
from collections.abc import Callable, Hashable, Iterator, Mapping
from concurrent.futures import Future, as_completed
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import msgspec
import torch

from gdsllm_core.layout.manifest import ExtentInfo
from gdsllm_core.storage.reader import extent_views

DENSE_TOKENS = 8  # up to this many rows, every selected expert runs on all rows (weights 0 where not routed)

W = TypeVar("W")  # one expert's weights as the plugin's math takes them (a dict of tensors, a struct, ...)
ExpertKey = tuple[int, int]  # (layer, expert)
MakeWeights = Callable[[ExtentInfo, dict[str, torch.Tensor]], W]  # an extent's tensor views -> its weights


class Reader(Protocol):
    """What the residency needs of `storage.reader.ExtentReader`."""

    def submit(self, extents: list[ExtentInfo], destinations: list[torch.Tensor]) -> Future: ...

    def submit_each(self, extents: list[ExtentInfo], destinations: list[torch.Tensor]) -> list[Future]: ...


# routing ------------------------------------------------------------------------------------------------------
def top_k_routing(logits: torch.Tensor, top_k: int, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the experts' router logits [N, E] (in fp32), top-k, renormalised over the k when `normalize`
    (Qwen's `norm_topk_prob`): (weights [N, k] in the logits' dtype, expert ids [N, k])."""
    probs = torch.softmax(logits.to(torch.float32), dim=-1)
    top_weights, top_ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
    return top_weights.to(logits.dtype), top_ids


def routing_table(weights: torch.Tensor, ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The routing as a table [N, num_experts]: each expert's weight per row, 0 where not routed."""
    return torch.zeros(weights.shape[0], num_experts, dtype=weights.dtype,
                       device=weights.device).scatter_(1, ids, weights)


def prediction_scores(weights: torch.Tensor, ids: torch.Tensor, num_experts: int,
                      limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shape-static part of a read-ahead prediction (what a CUDA graph can hold): the `limit` largest sums over
    the rows of the routing weight each expert gets, and those experts' ids, largest first; an expert no row picked
    scores 0."""
    score = torch.zeros(num_experts, dtype=torch.float32, device=weights.device)
    score.index_add_(0, ids.reshape(-1), weights.reshape(-1).float())
    return torch.topk(score, min(limit, num_experts))


def predicted(scores: torch.Tensor, ids: torch.Tensor) -> list[int]:
    """The experts of a `prediction_scores` result that some row picked, the likeliest first."""
    return [expert for score, expert in zip(scores.tolist(), ids.tolist(), strict=True) if score > 0]


# statistics ---------------------------------------------------------------------------------------------------
class TierStats(msgspec.Struct):
    """One tier of expert residency."""

    hits: int
    hit_rate: float  # VRAM: of all requests; host: of those the VRAM tier did not serve (all when it is off)
    cached_bytes: int
    budget_bytes: int
    evictions: int
    promotions: int = 0  # VRAM tier: experts admitted
    misses: int = 0  # host tier: requests read from storage


class StorageStats(msgspec.Struct):
    bytes_read: int  # by the steps' own reads and by the read-ahead
    reads: int  # steps that issued storage reads
    read_ns: int  # time spent waiting for them


class PrefetchStats(msgspec.Struct):
    prefetched: int  # experts read ahead
    hits: int  # of those, requested by the next step
    waste: int  # of those, not requested: read for nothing
    bytes_read: int
    reads: int  # batched read-ahead reads issued
    wait_ns: int  # time a step waited on read-ahead that had not landed yet
    sync_misses: int  # misses the steps had to read themselves


class ExpertStats(msgspec.Struct):
    """A snapshot of `ExpertResidency`'s statistics (`bench`, `/api/ps` and `show` print its `to_builtins`)."""

    requests: int
    hit_rate: float
    vram: TierStats
    host: TierStats
    storage: StorageStats
    prefetch: PrefetchStats


@dataclass
class LayerRead:
    """What one layer's last step asked for and read."""

    ids: list[int]  # experts requested
    misses: int
    bytes: int  # read by the step itself (not by read-ahead)
    prefetch_hits: int
    vram_hits: int


@dataclass
class LayerPrefetch:
    """What the last read-ahead for a layer predicted and read."""

    predicted: list[int]
    read: list[int]  # those neither cached nor already on their way


@dataclass
class Counters:
    """The running counters behind `ExpertStats`."""

    hits: int = 0  # served by the host tier
    vram_hits: int = 0  # served by the VRAM tier
    misses: int = 0  # read from storage (whether or not read ahead)
    bytes_read: int = 0
    reads: int = 0
    read_ns: int = 0
    evictions: int = 0  # host tier
    vram_evictions: int = 0
    vram_promotions: int = 0
    prefetched: int = 0
    prefetch_hits: int = 0
    prefetch_waste: int = 0
    prefetch_bytes: int = 0
    prefetch_reads: int = 0
    prefetch_wait_ns: int = 0
    last_read_by_layer: dict[int, LayerRead] = field(default_factory=dict)
    last_prefetch_by_layer: dict[int, LayerPrefetch] = field(default_factory=dict)


# tiers --------------------------------------------------------------------------------------------------------
class LfuTier(Generic[W]):
    """Experts (weights + the buffer they live in) under a byte budget. Ranks are (frequency, last use), the
    frequency shared with the other tier (requests counted once per step); the lowest rank is evicted first."""

    def __init__(self, budget_bytes: int, frequency: dict[Hashable, int], release: Callable[[torch.Tensor], None]):
        self.budget_bytes = budget_bytes
        self.cached_bytes = 0
        self.entries: dict[Hashable, tuple[W, torch.Tensor]] = {}
        self.frequency = frequency
        self.release = release  # takes an evicted expert's buffer back
        self.evictions = 0
        self._rank: dict[Hashable, tuple[int, int]] = {}
        self._heap: list[tuple[int, int, Hashable]] = []  # ranks, some stale (skipped when popped)
        self._clock = itertools.count()

    def __contains__(self, key: Hashable) -> bool:
        return key in self.entries

    def use(self, key: Hashable) -> W | None:
        """The weights of a held expert (its rank refreshed), or None."""
        if key not in self.entries:
            return None
        self._set_rank(key)
        return self.entries[key][0]

    def admit(self, key: Hashable, weights: Callable[[], W], buffer: torch.Tensor, keep: set[Hashable]) -> bool:
        """Hold an expert (its weights made by `weights()` if admitted) if the budget allows, evicting less
        frequently used ones not in `keep`."""
        nbytes = buffer.numel()
        if nbytes > self.budget_bytes:
            return False
        while self.cached_bytes + nbytes > self.budget_bytes:
            victim = self._coldest(keep)
            if victim is None or self.frequency[victim] > self.frequency[key]:
                return False  # everything left is needed now, or hotter than the newcomer
            _, victim_buffer = self.entries.pop(victim)
            del self._rank[victim]
            self.release(victim_buffer)
            self.cached_bytes -= victim_buffer.numel()
            self.evictions += 1
        self.entries[key] = (weights(), buffer)
        self._set_rank(key)
        self.cached_bytes += nbytes
        return True

    def clear(self) -> list[torch.Tensor]:
        """Forget every held expert; their buffers are returned."""
        buffers = [buffer for _, buffer in self.entries.values()]
        self.entries.clear()
        self._rank.clear()
        self._heap.clear()
        self.cached_bytes = 0
        return buffers

    def _set_rank(self, key: Hashable) -> None:
        rank = self._rank[key] = (self.frequency[key], next(self._clock))
        heapq.heappush(self._heap, (*rank, key))
        if len(self._heap) > 4 * len(self._rank) + 64:  # drop stale ranks now and then
            self._heap = [(*r, k) for k, r in self._rank.items()]
            heapq.heapify(self._heap)

    def _coldest(self, keep: set[Hashable]) -> Hashable | None:
        """The held expert to evict first (least frequently used, then least recently), not one in `keep`."""
        held, victim = [], None
        while self._heap:
            frequency, last_use, key = self._heap[0]
            if self._rank.get(key) != (frequency, last_use):
                heapq.heappop(self._heap)  # stale: evicted, or used again since
            elif key in keep:
                held.append(heapq.heappop(self._heap))
            else:
                victim = key
                break
        for item in held:
            heapq.heappush(self._heap, item)
        return victim


@dataclass
class _Step:
    """One `ExpertResidency.stream_groups` call, from its requests to its admissions."""

    layer: int
    experts: list[int]  # as requested
    ahead: dict[ExpertKey, tuple[torch.Tensor, Future]]  # read-ahead this step takes over: key -> (buffer, read)
    vram_hits: list[int] = field(default_factory=list)
    host_hits: list[int] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)  # read from storage, now or by the read-ahead
    buffers: dict[int, torch.Tensor] = field(default_factory=dict)  # expert -> host buffer its read lands in
    futures: dict[int, Future] = field(default_factory=dict)  # expert -> its read
    read_bytes: int = 0  # read by this step itself


class ExpertResidency(Generic[W]):
    """Expert extents on demand: read from storage through `reader`, kept in a host tier (pinned when computing on
    a GPU) up to `budget_bytes` and in a VRAM tier (on `device`) up to `vram_budget_bytes`, handed out on `device`
    as `make_weights(extent, views)` makes them. `extents` maps (layer, expert) to its extent. Read and staging
    buffers come from pools keyed by size, reused step after step."""

    def __init__(self, reader: Reader, extents: Mapping[ExpertKey, ExtentInfo], make_weights: MakeWeights,
                 budget_bytes: int, device: torch.device | None = None, vram_budget_bytes: int = 0):
        self.reader = reader
        self.device = device or torch.device("cpu")
        self.extents = dict(extents)
        self.make_weights = make_weights
        self.frequency: dict[ExpertKey, int] = {}
        self.host: LfuTier[W] = LfuTier(budget_bytes, self.frequency, self._free_host)
        self.vram: LfuTier[W] = LfuTier(vram_budget_bytes, self.frequency, self._free_device)
        # experts are copied to `device` unless they are used in place (CPU, no VRAM tier)
        self.staged = self.device.type != "cpu" or vram_budget_bytes > 0
        self._host_free: dict[int, list[torch.Tensor]] = {}
        self._device_free: dict[int, list[torch.Tensor]] = {}
        self._host_in_use: list[torch.Tensor] = []  # the last step's uncached read buffers
        self._device_in_use: list[torch.Tensor] = []  # the last step's staging buffers not kept by the VRAM tier
        self._copied: torch.cuda.Event | None = None  # recorded after the last step's copies to the GPU
        self._pending: dict[ExpertKey, tuple[torch.Tensor, Future]] = {}  # read-ahead: key -> (buffer, its read)
        self._unused: list[tuple[torch.Tensor, Future]] = []  # read-ahead its layer did not request, maybe in flight
        self.counters = Counters()

    @property
    def budget_bytes(self) -> int:
        """The host tier's budget."""
        return self.host.budget_bytes

    @budget_bytes.setter
    def budget_bytes(self, value: int) -> None:
        self.host.budget_bytes = value

    @property
    def cached_bytes(self) -> int:
        """Bytes held by the host tier."""
        return self.host.cached_bytes

    def cached_keys(self) -> set[ExpertKey]:
        """Experts held by the host tier."""
        return set(self.host.entries)

    def vram_keys(self) -> set[ExpertKey]:
        return set(self.vram.entries)

    @property
    def pending_bytes(self) -> int:
        """Host RAM held by read-ahead not yet taken by a step (beside `cached_bytes`)."""
        return sum(buffer.numel() for buffer, _ in self._pending.values())

    def stats(self) -> ExpertStats:
        c = self.counters
        requests = c.hits + c.vram_hits + c.misses
        past_vram = requests - c.vram_hits
        return ExpertStats(
            requests=requests, hit_rate=(c.hits + c.vram_hits) / requests if requests else 0.0,
            vram=TierStats(hits=c.vram_hits, hit_rate=c.vram_hits / requests if requests else 0.0,
                           cached_bytes=self.vram.cached_bytes, budget_bytes=self.vram.budget_bytes,
                           evictions=c.vram_evictions, promotions=c.vram_promotions),
            host=TierStats(hits=c.hits, misses=c.misses, hit_rate=c.hits / past_vram if past_vram else 0.0,
                           cached_bytes=self.host.cached_bytes, budget_bytes=self.host.budget_bytes,
                           evictions=c.evictions),
            storage=StorageStats(bytes_read=c.bytes_read, reads=c.reads, read_ns=c.read_ns),
            prefetch=PrefetchStats(prefetched=c.prefetched, hits=c.prefetch_hits, waste=c.prefetch_waste,
                                   bytes_read=c.prefetch_bytes, reads=c.prefetch_reads, wait_ns=c.prefetch_wait_ns,
                                   sync_misses=c.misses - c.prefetch_hits))

    # hand-out ---------------------------------------------------------------------------------------------
    def get(self, layer: int, experts: list[int]) -> dict[int, W]:
        """The weights of `experts` of `layer`, all at once."""
        return dict(self.stream(layer, experts))

    def stream(self, layer: int, experts: list[int]) -> Iterator[tuple[int, W]]:
        """(expert, its weights on the device) for each of `experts` of `layer`, as each becomes available."""
        return (pair for group in self.stream_groups(layer, experts) for pair in group)

    def stream_groups(self, layer: int, experts: list[int]) -> Iterator[list[tuple[int, W]]]:
        """(expert, weights) in groups that became available together: the VRAM hits, the host hits (their copies
        queued), then the experts of each read as it lands. The reads are submitted before this returns (work the
        caller queues before consuming overlaps them). Consume it to the end: the tiers' admissions and the
        statistics of the step happen there."""
        self._recycle()
        ahead = {(layer, e): self._pending.pop((layer, e)) for e in experts
                 if (layer, e) in self._pending and (layer, e) not in self.host and (layer, e) not in self.vram}
        for key in [key for key in self._pending if key[0] == layer]:  # predicted, not requested
            self._unused.append(self._pending.pop(key))
        step = _Step(layer, list(experts), ahead)
        for expert in experts:
            key = (layer, expert)
            self.frequency[key] = self.frequency.get(key, 0) + 1
            in_vram, in_host = self.vram.use(key), self.host.use(key)  # a request refreshes both tiers' ranks
            if in_vram is not None:
                step.vram_hits.append(expert)
            elif in_host is not None:
                step.host_hits.append(expert)
            else:
                step.missing.append(expert)
        c = self.counters
        c.vram_hits += len(step.vram_hits)
        c.hits += len(step.host_hits)
        c.misses += len(step.missing)
        unread = [e for e in step.missing if (layer, e) not in ahead]
        if unread:
            extents = [self.extents[layer, e] for e in unread]
            step.read_bytes = sum(extent.nbytes for extent in extents)
            step.buffers.update({e: self._host_buffer(extent.nbytes) for e, extent in zip(unread, extents, strict=True)})
            step.futures.update(zip(unread, self.reader.submit_each(extents, [step.buffers[e] for e in unread]),
                                    strict=True))
            c.reads += 1
        for e in step.missing:
            if (layer, e) in ahead:
                step.buffers[e], step.futures[e] = ahead[layer, e]
        return self._deliver(step)

    def _deliver(self, step: _Step) -> Iterator[list[tuple[int, W]]]:
        """`stream_groups`' hand-over, once its reads are on their way."""
        layer, ahead, buffers, c = step.layer, step.ahead, step.buffers, self.counters
        staged: dict[int, tuple[W, torch.Tensor]] = {}  # expert -> (device weights, device buffer)
        if step.vram_hits:
            yield [(expert, self.vram.entries[layer, expert][0]) for expert in step.vram_hits]
        if step.host_hits:
            yield [(expert, self._on_device(layer, expert, *self.host.entries[layer, expert], staged))
                   for expert in step.host_hits]
        by_future: dict[int, list[int]] = {}
        for expert in step.missing:
            by_future.setdefault(id(step.futures[expert]), []).append(expert)
        landed = as_completed({id(f): f for f in step.futures.values()}.values())
        while True:
            began = time.perf_counter_ns()
            future = next(landed, None)
            waited = time.perf_counter_ns() - began
            if future is None:
                break
            future.result()
            if any((layer, e) in ahead for e in by_future[id(future)]):
                c.prefetch_wait_ns += waited
            else:
                c.read_ns += waited
            yield [(expert, self._on_device(layer, expert, None, buffers[expert], staged))
                   for expert in by_future[id(future)]]
        if self.staged and self.device.type == "cuda" and (step.host_hits or step.missing):
            self._copied = torch.cuda.Event()
            self._copied.record(torch.cuda.current_stream(self.device))
        self._admit_all(step, staged)
        self._drop_unused()
        c.prefetch_hits += len(ahead)
        c.bytes_read += step.read_bytes
        c.last_read_by_layer[layer] = LayerRead(ids=step.experts, misses=len(step.missing), bytes=step.read_bytes,
                                                prefetch_hits=len(ahead), vram_hits=len(step.vram_hits))

    def _weights(self, extent: ExtentInfo, buffer: torch.Tensor) -> W:
        return self.make_weights(extent, extent_views(extent, buffer))

    def _on_device(self, layer: int, expert: int, weights: W | None, buffer: torch.Tensor, staged: dict) -> W:
        """The expert's weights where they are computed: copied into a staging buffer on the device (kept in
        `staged` for the VRAM tier's admission), or the host views themselves (`weights`, else made here)."""
        extent = self.extents[layer, expert]
        if not self.staged:
            return weights if weights is not None else self._weights(extent, buffer)
        device_buffer = self._device_buffer(extent.nbytes)
        device_buffer.copy_(buffer[:extent.nbytes], non_blocking=True)
        on_device = self._weights(extent, device_buffer)
        staged[expert] = (on_device, device_buffer)
        return on_device

    def _admit_all(self, step: _Step, staged: dict[int, tuple[W, torch.Tensor]]) -> None:
        """The step's admissions, in request order: host tier for storage reads, VRAM tier for everything it did
        not hold. Buffers no tier kept go back to the pools at the next step."""
        layer, keep = step.layer, {(step.layer, e) for e in step.experts}
        for expert in step.missing:
            extent, buffer = self.extents[layer, expert], step.buffers[expert]
            if not self.host.admit((layer, expert), lambda e=extent, b=buffer: self._weights(e, b), buffer, keep):
                self._host_in_use.append(buffer)
        for expert in step.experts:
            if expert not in staged:
                continue
            weights, device_buffer = staged[expert]
            if self.vram.admit((layer, expert), lambda w=weights: w, device_buffer, keep):
                self.counters.vram_promotions += 1
            else:
                self._device_in_use.append(device_buffer)
        self.counters.evictions, self.counters.vram_evictions = self.host.evictions, self.vram.evictions

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Start reading those of `experts` of `layer` that are neither cached nor already on their way, in one
        batched asynchronous read; the next step uses them or drops them."""
        wanted = [e for e in experts
                  if (layer, e) not in self.host and (layer, e) not in self.vram and (layer, e) not in self._pending]
        self.counters.last_prefetch_by_layer[layer] = LayerPrefetch(predicted=list(experts), read=wanted)
        if not wanted:
            return
        extents = [self.extents[layer, e] for e in wanted]
        buffers = [self._host_buffer(extent.nbytes) for extent in extents]
        future = self.reader.submit(extents, buffers)
        for expert, buffer in zip(wanted, buffers, strict=True):
            self._pending[layer, expert] = (buffer, future)
        nbytes = sum(extent.nbytes for extent in extents)
        c = self.counters
        c.prefetched += len(wanted)
        c.prefetch_bytes += nbytes
        c.bytes_read += nbytes
        c.prefetch_reads += 1

    def _drop_unused(self) -> None:
        """Read-ahead its layer did not ask for: wait for it to land (its buffers are about to be reused), count it
        as waste."""
        for buffer, future in self._unused:
            future.result()
            self._host_free.setdefault(buffer.numel(), []).append(buffer)  # never copied to the GPU: no sync needed
        self.counters.prefetch_waste += len(self._unused)
        self._unused.clear()

    # buffer pools -----------------------------------------------------------------------------------------
    def _host_buffer(self, nbytes: int) -> torch.Tensor:
        pool = self._host_free.get(nbytes)
        if pool:
            return pool.pop()
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.device.type == "cuda")

    def _device_buffer(self, nbytes: int) -> torch.Tensor:
        pool = self._device_free.get(nbytes)
        if pool:
            return pool.pop()
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def _wait_copies(self) -> None:
        """The copies out of host buffers issued so far have landed (their buffers may be refilled)."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None

    def _recycle(self) -> None:
        """The last step's buffers that no tier kept go back to the pools. Device buffers are reused in stream
        order (the next copy into one queues behind the compute that read it); host buffers once the copies out
        of them have landed."""
        if self._host_in_use:
            self._wait_copies()
        for buffer in self._host_in_use:
            self._host_free.setdefault(buffer.numel(), []).append(buffer)
        for buffer in self._device_in_use:
            self._device_free.setdefault(buffer.numel(), []).append(buffer)
        self._host_in_use, self._device_in_use = [], []

    def _free_host(self, buffer: torch.Tensor) -> None:
        self._host_in_use.append(buffer)  # an evicted expert's buffer: back to the pool at the next step

    def _free_device(self, buffer: torch.Tensor) -> None:
        self._device_free.setdefault(buffer.numel(), []).append(buffer)

    def clear(self) -> None:
        """Back to cold: no expert held, no request counted (statistics and buffer pools are kept)."""
        self._unused += self._pending.values()
        self._pending.clear()
        self._drop_unused()
        self._wait_copies()
        self._host_in_use += self.host.clear()
        self._device_in_use += self.vram.clear()
        self._recycle()
        self.frequency.clear()

    def close(self) -> None:
        """Drop every held expert and pooled buffer (after the reads and copies in flight have landed)."""
        self.clear()
        self._host_free.clear()
        self._device_free.clear()
        self._host_in_use, self._device_in_use = [], []


# the routed part of a MoE block --------------------------------------------------------------------------------
ExpertMlp = Callable[[torch.Tensor, W, torch.Tensor, torch.Tensor | None], torch.Tensor]
GroupedMlp = Callable[[torch.Tensor, list[W], list[torch.Tensor], list[torch.Tensor]], bool]
T = TypeVar("T")


def routed_experts(x: torch.Tensor, ids: torch.Tensor, table: torch.Tensor, residency: ExpertResidency[W],
                   layer: int, expert_mlp: ExpertMlp, grouped_mlp: GroupedMlp | None = None,
                   read_ahead: Callable[[], tuple[int, list[int]]] | None = None,
                   while_reading: Callable[[], T] | None = None) -> tuple[torch.Tensor, T | None]:
    """The weighted sum of the routed experts' outputs for x [N, hidden] (`ids` [N, k], `table` [N, E] from
    `top_k_routing` / `routing_table`), and what `while_reading()` returned (work queued once the reads are on
    their way: a shared expert). Each expert is computed as soon as `residency` hands it over (up to DENSE_TOKENS
    rows: on every row, weighted 0 where not routed, so no host sync; its output in its own slot, the slots summed
    in expert order: the result does not depend on the order reads land). `expert_mlp(x, weights, coefficients
    [N, 1], out)` computes one expert (into `out` when given); `grouped_mlp(x, weights, coefficients, outs)` several
    that became available together, or returns False (then they run one by one). `read_ahead` gives (layer,
    experts) to prefetch: it is called behind this layer's own reads (up to DENSE_TOKENS rows), or once this layer's
    experts are in (a prompt chunk: its reads come first)."""
    selected = sorted(set(ids.reshape(-1).tolist()))
    arriving = residency.stream_groups(layer, selected) if x.shape[0] <= DENSE_TOKENS else None  # reads start now
    if arriving is not None and read_ahead is not None:
        residency.prefetch(*read_ahead())
        read_ahead = None
    extra = while_reading() if while_reading is not None else None
    if arriving is not None:
        slots = x.new_empty(len(selected), *x.shape)
        position = {expert: j for j, expert in enumerate(selected)}
        for group in arriving:  # experts that became available together run as one grouped launch where they can
            if len(group) > 1 and grouped_mlp is not None and grouped_mlp(
                    x, [weights for _, weights in group], [table[:, expert, None] for expert, _ in group],
                    [slots[position[expert]] for expert, _ in group]):
                continue
            for expert, weights in group:
                expert_mlp(x, weights, table[:, expert, None], slots[position[expert]])
        routed = slots.sum(dim=0)
    else:
        experts = residency.get(layer, selected)
        routed = torch.zeros_like(x)
        for expert in selected:
            tokens = torch.where((ids == expert).any(dim=-1))[0]
            routed.index_add_(0, tokens, expert_mlp(x[tokens], experts[expert], table[tokens, expert, None], None))
    if read_ahead is not None:
        residency.prefetch(*read_ahead())
    return routed, extra
