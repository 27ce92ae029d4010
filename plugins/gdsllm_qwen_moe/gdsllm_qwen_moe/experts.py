"""The MoE block with selective expert loading and a two-tier expert cache (VRAM in front of host RAM).

Per layer the router runs first; only the experts it picked (the union over every token of the step: the batch in
decode, the prompt chunk in prefill) are fetched. `ExpertCache.stream` hands them out as they become available:
VRAM-tier hits at once, host-tier hits after their copy to the device, and storage misses as each one's read lands
(all misses are submitted together at the start, one future per expert), so the compute of the first experts
overlaps the reads of the others; `ExpertCache.stream_groups` hands them out in the groups that became available
together, which the MoE block computes in grouped launches. Reads land in pooled host buffers (pinned when computing
on a GPU) and are copied into pooled device buffers on the compute stream: steady-state decoding allocates nothing.

Tiers: each holds experts under its own byte budget (`LfuTier`); eviction drops the expert requested least often
(ties: least recently used), never one the current step uses, and never for a rarer newcomer. The host tier admits
experts read from storage; the VRAM tier admits every expert it did not already hold (promotion from the host tier
or straight from storage), keeping the device copy just made. The VRAM tier is device-agnostic: with device "cpu"
and a budget it holds copies in host memory (what the CPU tests exercise). Admissions happen once the step's
experts are all in, in request order, so cache contents never depend on read completion order. Statistics: hits
per tier, misses (storage reads), bytes read, evictions.

Optional read-ahead (`ExpertCache.prefetch`, driven by the forward pass when `LoadOptions.extra["expert_prefetch"]`
is on): the experts predicted for the next layer that are neither cached nor on their way are read asynchronously
into pooled buffers held beside the cache (not counted in `cached_bytes`). In decode the read-ahead is submitted
right after the step's own reads, so the disk goes on from this layer's experts to the next one's while this layer
computes and the next one's attention runs. The next layer's `stream` takes those it needs (waiting on the read only
if it has not landed) and passes them through the same admission as synchronous misses, in the same order, so the
caches hold exactly what they would without read-ahead; the rest are waste, returned to the pool once landed. Host
RAM is thus at most the budget plus the read-ahead in flight (at most two layers' predictions, which the caller
caps)."""

import heapq
import itertools
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, as_completed
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from gdsllm_core.api import ExtentInfo, ExtentReader, Manifest, extent_views
from gdsllm_qwen_moe.config import QwenMoeConfig
from gdsllm_qwen_moe.weights import Weight, group_weights, linear, swiglu_mlp, swiglu_mlp_grouped

DENSE_TOKENS = 8  # up to this many rows, every selected expert runs on all rows (weights 0 where not routed)


def expert_extent(layer: int, expert: int) -> str:
    return f"blk.{layer}.expert.{expert}"


def route(x: torch.Tensor, router: Weight, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts, top-k, renormalised: (weights [N, k] in x's dtype, expert ids [N, k])."""
    probs = torch.softmax(linear(x, router).to(torch.float32), dim=-1)
    top_weights, top_ids = torch.topk(probs, top_k, dim=-1)
    top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
    return top_weights.to(x.dtype), top_ids


def route_table(x: torch.Tensor, router: Weight, top_k: int, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`route` as (expert ids [N, k], routing table [N, num_experts] in x's dtype: each expert's weight per row, 0
    where not routed)."""
    weights, ids = route(x, router, top_k)
    return ids, torch.zeros(x.shape[0], num_experts, dtype=x.dtype, device=x.device).scatter_(1, ids, weights)


def shared_expert(x: torch.Tensor, w: dict[str, Weight], prefix: str) -> torch.Tensor:
    """The shared expert's output for x [N, hidden], scaled by its sigmoid gate."""
    out = linear(F.silu(linear(x, w[prefix + "ffn_gate_shexp.weight"])) * linear(x, w[prefix + "ffn_up_shexp.weight"]),
                 w[prefix + "ffn_down_shexp.weight"])
    return torch.sigmoid(linear(x, w[prefix + "ffn_gate_inp_shexp.weight"])) * out


def prediction_scores(x: torch.Tensor, router: Weight, top_k: int, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shape-static part of `predict_experts` (what a CUDA graph can hold): the `limit` largest sums over the
    rows of x of the routing weight `router` gives each expert (as `route` picks them) and those experts' ids,
    largest first; an expert no row picked scores 0."""
    weights, ids = route(x, router, top_k)
    score = torch.zeros(router.shape[0], dtype=torch.float32, device=x.device)
    score.index_add_(0, ids.reshape(-1), weights.reshape(-1).float())
    return torch.topk(score, min(limit, router.shape[0]))


def predicted(scores: torch.Tensor, ids: torch.Tensor) -> list[int]:
    """The experts of a `prediction_scores` result that some row picked, the likeliest first."""
    return [expert for score, expert in zip(scores.tolist(), ids.tolist(), strict=True) if score > 0]


def predict_experts(x: torch.Tensor, router: Weight, top_k: int, limit: int) -> list[int]:
    """The experts `router` picks for the rows of x (the union of their top-k, as `route` picks them), the most
    likely first (the largest sum of routing weights over the rows), at most `limit`."""
    return predicted(*prediction_scores(x, router, top_k, limit))


@dataclass
class CacheStats:
    hits: int = 0  # served by the host tier
    vram_hits: int = 0  # served by the VRAM tier
    misses: int = 0  # read from storage (whether or not read ahead)
    bytes_read: int = 0
    reads: int = 0  # steps that issued storage reads
    read_ns: int = 0  # time spent waiting for them
    evictions: int = 0  # host tier
    vram_evictions: int = 0
    vram_promotions: int = 0  # experts admitted to the VRAM tier
    last_read_by_layer: dict[int, dict] = field(default_factory=dict)
    # read-ahead: misses are counted as above whether or not they were prefetched; bytes_read includes its reads
    prefetched: int = 0  # experts read ahead
    prefetch_hits: int = 0  # of those, requested by the next step (misses it did not have to read itself)
    prefetch_waste: int = 0  # of those, not requested: read for nothing
    prefetch_bytes: int = 0
    prefetch_reads: int = 0  # batched read-ahead reads issued
    prefetch_wait_ns: int = 0  # time a step waited on read-ahead that had not landed yet
    last_prefetch_by_layer: dict[int, dict] = field(default_factory=dict)

    def as_dict(self, host: "LfuTier", vram: "LfuTier") -> dict:
        requests = self.hits + self.vram_hits + self.misses
        past_vram = requests - self.vram_hits
        return {"requests": requests, "hit_rate": (self.hits + self.vram_hits) / requests if requests else 0.0,
                "vram": {"hits": self.vram_hits, "hit_rate": self.vram_hits / requests if requests else 0.0,
                         "cached_bytes": vram.cached_bytes, "budget_bytes": vram.budget_bytes,
                         "evictions": self.vram_evictions, "promotions": self.vram_promotions},
                # host: of the requests the VRAM tier did not serve (all of them when it is off)
                "host": {"hits": self.hits, "misses": self.misses,
                         "hit_rate": self.hits / past_vram if past_vram else 0.0,
                         "cached_bytes": host.cached_bytes, "budget_bytes": host.budget_bytes,
                         "evictions": self.evictions},
                "storage": {"bytes_read": self.bytes_read, "reads": self.reads, "read_ns": self.read_ns},
                "prefetch": {"prefetched": self.prefetched, "hits": self.prefetch_hits, "waste": self.prefetch_waste,
                             "bytes_read": self.prefetch_bytes, "reads": self.prefetch_reads,
                             "wait_ns": self.prefetch_wait_ns, "sync_misses": self.misses - self.prefetch_hits}}


@dataclass
class _Step:
    """One `ExpertCache.stream` call, from its requests to its admissions."""

    layer: int
    experts: list[int]  # as requested
    names: dict[int, str]  # expert -> extent name
    ahead: dict[str, tuple[torch.Tensor, Future]]  # read-ahead this step takes over: extent -> (buffer, read)
    vram_hits: list[int] = field(default_factory=list)
    host_hits: list[int] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)  # read from storage, now or by the read-ahead
    buffers: dict[int, torch.Tensor] = field(default_factory=dict)  # expert -> host buffer its read lands in
    futures: dict[int, Future] = field(default_factory=dict)  # expert -> its read
    read_bytes: int = 0  # read by this step itself


class LfuTier:
    """Experts (weights + the buffer they live in) under a byte budget. Ranks are (frequency, last use), the
    frequency shared with the other tier (requests counted once per step); the lowest rank is evicted first."""

    def __init__(self, budget_bytes: int, frequency: dict[str, int], release: Callable[[torch.Tensor], None]):
        self.budget_bytes = budget_bytes
        self.cached_bytes = 0
        self.entries: dict[str, tuple[dict[str, Weight], torch.Tensor]] = {}
        self.frequency = frequency
        self.release = release  # takes an evicted expert's buffer back
        self.evictions = 0
        self._rank: dict[str, tuple[int, int]] = {}
        self._heap: list[tuple[int, int, str]] = []  # ranks, some stale (skipped when popped)
        self._clock = itertools.count()

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def use(self, name: str) -> dict[str, Weight] | None:
        """The weights of a held expert (its rank refreshed), or None."""
        if name not in self.entries:
            return None
        self._set_rank(name)
        return self.entries[name][0]

    def admit(self, name: str, weights: Callable[[], dict[str, Weight]], buffer: torch.Tensor,
              keep: set[str]) -> bool:
        """Hold an expert (its weights made by `weights()` if admitted) if the budget allows, evicting less
        frequently used ones not in `keep`."""
        nbytes = buffer.numel()
        if nbytes > self.budget_bytes:
            return False
        while self.cached_bytes + nbytes > self.budget_bytes:
            victim = self._coldest(keep)
            if victim is None or self.frequency[victim] > self.frequency[name]:
                return False  # everything left is needed now, or hotter than the newcomer
            _, victim_buffer = self.entries.pop(victim)
            del self._rank[victim]
            self.release(victim_buffer)
            self.cached_bytes -= victim_buffer.numel()
            self.evictions += 1
        self.entries[name] = (weights(), buffer)
        self._set_rank(name)
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

    def _set_rank(self, name: str) -> None:
        rank = self._rank[name] = (self.frequency[name], next(self._clock))
        heapq.heappush(self._heap, (*rank, name))
        if len(self._heap) > 4 * len(self._rank) + 64:  # drop stale ranks now and then
            self._heap = [(*r, n) for n, r in self._rank.items()]
            heapq.heapify(self._heap)

    def _coldest(self, keep: set[str]) -> str | None:
        """The held expert to evict first (least frequently used, then least recently), not one in `keep`."""
        held, victim = [], None
        while self._heap:
            frequency, last_use, name = self._heap[0]
            if self._rank.get(name) != (frequency, last_use):
                heapq.heappop(self._heap)  # stale: evicted, or used again since
            elif name in keep:
                held.append(heapq.heappop(self._heap))
            else:
                victim = name
                break
        for item in held:
            heapq.heappush(self._heap, item)
        return victim


class ExpertCache:
    """Expert extents on demand: read from storage through `reader`, kept in a host tier (pinned when computing on
    a GPU) up to `budget_bytes` and in a VRAM tier (on `device`) up to `vram_budget_bytes`, handed out on
    `device`. Read and staging buffers come from pools keyed by size, reused step after step."""

    def __init__(self, reader: ExtentReader, manifest: Manifest, budget_bytes: int,
                 device: torch.device | None = None, vram_budget_bytes: int = 0):
        self.reader = reader
        self.device = device or torch.device("cpu")
        self.extents = {e.name: e for e in manifest.extents if ".expert." in e.name}
        self.frequency: dict[str, int] = {}
        self.host = LfuTier(budget_bytes, self.frequency, self._free_host)
        self.vram = LfuTier(vram_budget_bytes, self.frequency, self._free_device)
        # experts are copied to `device` unless they are used in place (CPU, no VRAM tier)
        self.staged = self.device.type != "cpu" or vram_budget_bytes > 0
        self._host_free: dict[int, list[torch.Tensor]] = {}
        self._device_free: dict[int, list[torch.Tensor]] = {}
        self._host_in_use: list[torch.Tensor] = []  # the last step's uncached read buffers
        self._device_in_use: list[torch.Tensor] = []  # the last step's staging buffers not kept by the VRAM tier
        self._copied: torch.cuda.Event | None = None  # recorded after the last step's copies to the GPU
        self._pending: dict[str, tuple[torch.Tensor, Future]] = {}  # read-ahead: expert -> (buffer, its read)
        self._unused: list[tuple[torch.Tensor, Future]] = []  # read-ahead its layer did not request, maybe in flight
        self.stats = CacheStats()

    # budgets (the host tier's under the names the forward pass and bench have always used) --------------------
    @property
    def budget_bytes(self) -> int:
        return self.host.budget_bytes

    @budget_bytes.setter
    def budget_bytes(self, value: int) -> None:
        self.host.budget_bytes = value

    @property
    def cached_bytes(self) -> int:
        return self.host.cached_bytes

    def cached_names(self) -> set[str]:
        """Experts held by the host tier."""
        return set(self.host.entries)

    def vram_names(self) -> set[str]:
        return set(self.vram.entries)

    # fetching -----------------------------------------------------------------------------------------------
    def get(self, layer: int, experts: list[int]) -> dict[int, dict[str, Weight]]:
        """The weights of `experts` of `layer`, all at once."""
        return dict(self.stream(layer, experts))

    def stream(self, layer: int, experts: list[int]) -> Iterator[tuple[int, dict[str, Weight]]]:
        """(expert, its weights on the device) for each of `experts` of `layer`, as each becomes available: VRAM
        hits, host hits, then storage misses in the order their reads land. The reads are submitted before this
        returns (work the caller queues before consuming overlaps them). Consume it to the end: the cache
        admissions and statistics of the step happen there."""
        return (pair for group in self.stream_groups(layer, experts) for pair in group)

    def stream_groups(self, layer: int, experts: list[int]) -> Iterator[list[tuple[int, dict[str, Weight]]]]:
        """`stream` in groups of experts that became available together: the VRAM hits, the host hits (their copies
        queued), then the experts of each read as it lands."""
        self._recycle()
        names = {e: expert_extent(layer, e) for e in experts}
        ahead = {name: self._pending.pop(name) for name in names.values()
                 if name in self._pending and name not in self.host and name not in self.vram}
        prefix = expert_extent(layer, 0)[:-1]
        for name in [name for name in self._pending if name.startswith(prefix)]:  # predicted, not requested
            self._unused.append(self._pending.pop(name))
        step = _Step(layer, list(experts), names, ahead)
        for expert, name in names.items():
            self.frequency[name] = self.frequency.get(name, 0) + 1
            in_vram, in_host = self.vram.use(name), self.host.use(name)  # a request refreshes both tiers' ranks
            if in_vram is not None:
                step.vram_hits.append(expert)
            elif in_host is not None:
                step.host_hits.append(expert)
            else:
                step.missing.append(expert)
        self.stats.vram_hits += len(step.vram_hits)
        self.stats.hits += len(step.host_hits)
        self.stats.misses += len(step.missing)
        unread = [e for e in step.missing if names[e] not in ahead]
        step.read_bytes = sum(self.extents[names[e]].nbytes for e in unread)
        if unread:
            extents = [self.extents[names[e]] for e in unread]
            step.buffers.update({e: self._host_buffer(extent.nbytes) for e, extent in zip(unread, extents, strict=True)})
            step.futures.update(zip(unread, self.reader.submit_each(extents, [step.buffers[e] for e in unread]),
                                    strict=True))
            self.stats.reads += 1
        for e in step.missing:
            if names[e] in ahead:
                step.buffers[e], step.futures[e] = ahead[names[e]]
        return self._deliver(step)

    def _deliver(self, step: "_Step") -> Iterator[list[tuple[int, dict[str, Weight]]]]:
        """`stream_groups`' hand-over, once its reads are on their way."""
        names, ahead, buffers = step.names, step.ahead, step.buffers
        staged: dict[int, tuple[dict[str, Weight], torch.Tensor]] = {}  # expert -> (device weights, device buffer)
        if step.vram_hits:
            yield [(expert, self.vram.entries[names[expert]][0]) for expert in step.vram_hits]
        if step.host_hits:
            yield [(expert, self._on_device(expert, self.extents[names[expert]], *self.host.entries[names[expert]],
                                            staged)) for expert in step.host_hits]
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
            if any(names[e] in ahead for e in by_future[id(future)]):
                self.stats.prefetch_wait_ns += waited
            else:
                self.stats.read_ns += waited
            yield [(expert, self._on_device(expert, self.extents[names[expert]], None, buffers[expert], staged))
                   for expert in by_future[id(future)]]
        if self.staged and self.device.type == "cuda" and (step.host_hits or step.missing):
            self._copied = torch.cuda.Event()
            self._copied.record(torch.cuda.current_stream(self.device))
        self._admit_all(names, step.host_hits, step.missing, buffers, staged, set(names.values()))
        self._drop_unused()
        self.stats.prefetch_hits += len(ahead)
        self.stats.bytes_read += step.read_bytes
        self.stats.last_read_by_layer[step.layer] = {"ids": step.experts, "misses": len(step.missing),
                                                      "bytes": step.read_bytes, "prefetch_hits": len(ahead),
                                                      "vram_hits": len(step.vram_hits)}

    def _on_device(self, expert: int, extent: ExtentInfo, weights: dict[str, Weight] | None, buffer: torch.Tensor,
                   staged: dict) -> dict[str, Weight]:
        """The expert's weights where they are computed: copied into a staging buffer on the device (kept in
        `staged` for the VRAM tier's admission), or the host views themselves (`weights`, else made here)."""
        if not self.staged:
            return weights if weights is not None else group_weights(extent, extent_views(extent, buffer))
        device_buffer = self._device_buffer(extent.nbytes)
        device_buffer.copy_(buffer[:extent.nbytes], non_blocking=True)
        on_device = group_weights(extent, extent_views(extent, device_buffer))
        staged[expert] = (on_device, device_buffer)
        return on_device

    def _admit_all(self, names: dict[int, str], host_hits: list[int], missing: list[int],
                   buffers: dict[int, torch.Tensor], staged: dict, keep: set[str]) -> None:
        """The step's admissions, in request order: host tier for storage reads, VRAM tier for everything it
        did not hold. Buffers no tier kept go back to the pools at the next step."""
        for expert in missing:
            extent, buffer = self.extents[names[expert]], buffers[expert]
            if not self.host.admit(names[expert], lambda e=extent, b=buffer: group_weights(e, extent_views(e, b)),
                                   buffer, keep):
                self._host_in_use.append(buffer)
        for expert in names:
            if expert not in staged:
                continue
            weights, device_buffer = staged[expert]
            if self.vram.admit(names[expert], lambda w=weights: w, device_buffer, keep):
                self.stats.vram_promotions += 1
            else:
                self._device_in_use.append(device_buffer)
        self.stats.evictions, self.stats.vram_evictions = self.host.evictions, self.vram.evictions

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Start reading those of `experts` of `layer` that are neither cached nor already on their way, in one
        batched asynchronous read; the next step uses them or drops them."""
        names = [expert_extent(layer, e) for e in experts]
        wanted = [self.extents[n] for n in names
                  if n not in self.host and n not in self.vram and n not in self._pending]
        self.stats.last_prefetch_by_layer[layer] = {"predicted": list(experts),
                                                    "read": [int(e.name.rsplit(".", 1)[1]) for e in wanted]}
        if not wanted:
            return
        buffers = [self._host_buffer(extent.nbytes) for extent in wanted]
        future = self.reader.submit(wanted, buffers)
        for extent, buffer in zip(wanted, buffers, strict=True):
            self._pending[extent.name] = (buffer, future)
        nbytes = sum(extent.nbytes for extent in wanted)
        self.stats.prefetched += len(wanted)
        self.stats.prefetch_bytes += nbytes
        self.stats.bytes_read += nbytes
        self.stats.prefetch_reads += 1

    def _drop_unused(self) -> None:
        """Read-ahead its layer did not ask for: wait for it to land (its buffers are about to be reused), count it
        as waste."""
        for buffer, future in self._unused:
            future.result()
            self._host_free.setdefault(buffer.numel(), []).append(buffer)  # never copied to the GPU: no sync needed
        self.stats.prefetch_waste += len(self._unused)
        self._unused.clear()

    @property
    def pending_bytes(self) -> int:
        """Host RAM held by read-ahead not yet taken by a step (beside `cached_bytes`)."""
        return sum(buffer.numel() for buffer, _ in self._pending.values())

    # buffer pools -------------------------------------------------------------------------------------------
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

    def as_dict(self) -> dict:
        return self.stats.as_dict(self.host, self.vram)

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


def moe_block(x: torch.Tensor, w: dict[str, Weight], prefix: str, layer: int, config: QwenMoeConfig,
              cache: ExpertCache, read_ahead: Callable[[], tuple[int, list[int]]] | None = None,
              dense: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x [N, hidden] -> routed experts (weighted) + sigmoid-gated shared expert. `dense`: (expert ids, routing
    table, shared expert output) already computed for x (by a decode graph), else computed here: the routing
    first, the shared expert once the reads are on their way. Each expert is computed as soon as `cache.stream`
    hands it over (up to DENSE_TOKENS rows: on every row, weighted 0 where not routed, so no host sync; its output in
    its own slot, the slots summed in expert order: the result does not depend on the order reads land).
    `read_ahead` gives (layer, experts) to prefetch; it is called (and its prefetch submitted) behind this layer's
    own reads (up to DENSE_TOKENS rows), or once this layer's experts are in (a prompt chunk: its reads come
    first)."""
    if dense is None:
        ids, table = route_table(x, w[prefix + "ffn_gate_inp.weight"], config.num_experts_per_tok, config.num_experts)
        shared = None
    else:
        ids, table, shared = dense
    selected = sorted(set(ids.reshape(-1).tolist()))
    arriving = cache.stream_groups(layer, selected) if x.shape[0] <= DENSE_TOKENS else None  # reads start now
    if arriving is not None and read_ahead is not None:
        cache.prefetch(*read_ahead())
        read_ahead = None
    if shared is None:
        shared = shared_expert(x, w, prefix)
    if arriving is not None:
        slots = x.new_empty(len(selected), *x.shape)
        position = {expert: j for j, expert in enumerate(selected)}
        for group in arriving:  # experts that became available together run as one grouped launch where they can
            names = [f"blk.{layer}.expert.{expert}." for expert, _ in group]
            if len(group) > 1 and swiglu_mlp_grouped(
                    x, [tuple(ew[p + f"ffn_{m}.weight"] for m in ("gate", "up", "down"))
                        for p, (_, ew) in zip(names, group, strict=True)],
                    [table[:, expert, None] for expert, _ in group], [slots[position[expert]] for expert, _ in group]):
                continue
            for p, (expert, ew) in zip(names, group, strict=True):
                expert_ffn(x, ew, p, table[:, expert, None], slots[position[expert]])
        routed = slots.sum(dim=0)
    else:
        experts = cache.get(layer, selected)
        routed = torch.zeros_like(x)
        for expert in selected:
            tokens = torch.where((ids == expert).any(dim=-1))[0]
            routed.index_add_(0, tokens, expert_ffn(x[tokens], experts[expert], f"blk.{layer}.expert.{expert}.",
                                                    table[tokens, expert, None]))
    if read_ahead is not None:
        cache.prefetch(*read_ahead())
    return routed + shared


def expert_ffn(x: torch.Tensor, ew: dict[str, Weight], p: str, coefficients: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """One expert's MLP on x [N, hidden], row n scaled by coefficients[n] ([N, 1]) when given, into `out` when given."""
    return swiglu_mlp(x, ew[p + "ffn_gate.weight"], ew[p + "ffn_up.weight"], ew[p + "ffn_down.weight"], coefficients,
                      out)
