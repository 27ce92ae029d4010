"""The MoE block with selective expert loading and a host-RAM expert cache.

Per layer the router runs first; only the experts it picked (the union over every token of the step: the batch in
decode, the prompt chunk in prefill) are fetched, the cache misses in one batched `ExtentReader.submit`. Cached
experts live in host RAM under a byte budget; eviction drops the expert requested least often (ties: least recently
used), so frequently routed experts stay. Statistics: hits, misses, bytes read from storage, evictions.

Optional read-ahead (`ExpertCache.prefetch`, driven by the forward pass when `LoadOptions.extra["expert_prefetch"]`
is on): the experts predicted for the next layer that are neither cached nor on their way are read asynchronously
into pooled buffers held beside the cache (not counted in `cached_bytes`). The next `get` takes those it needs
(waiting on the read only if it has not landed) and passes them through the same admission as synchronous misses,
in the same order, so the cache holds exactly what it would without read-ahead; the rest are waste, returned to the
pool. Host RAM is thus at most the budget plus the read-ahead in flight (at most one layer's prediction, which the
caller caps)."""

import heapq
import itertools
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from gdsllm_core.layout.manifest import Manifest
from gdsllm_core.storage.reader import ExtentReader, extent_views
from gdsllm_qwen_moe.config import QwenMoeConfig
from gdsllm_qwen_moe.weights import Weight, group_weights, linear, to_device


def expert_extent(layer: int, expert: int) -> str:
    return f"blk.{layer}.expert.{expert}"


def route(x: torch.Tensor, router: Weight, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts, top-k, renormalised: (weights [N, k] in x's dtype, expert ids [N, k])."""
    probs = torch.softmax(linear(x, router).to(torch.float32), dim=-1)
    top_weights, top_ids = torch.topk(probs, top_k, dim=-1)
    top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
    return top_weights.to(x.dtype), top_ids


def predict_experts(x: torch.Tensor, router: Weight, top_k: int, limit: int) -> list[int]:
    """The experts `router` picks for the rows of x (the union of their top-k, as `route` picks them), those picked
    by the most rows first (ties: lower id), at most `limit`."""
    _, ids = route(x, router, top_k)
    votes = torch.bincount(ids.reshape(-1))
    order = torch.argsort(-votes, stable=True)
    return order[votes[order] > 0][:limit].tolist()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    reads: int = 0  # batched storage reads issued
    read_ns: int = 0  # time spent waiting for them
    evictions: int = 0
    last_read_by_layer: dict[int, dict] = field(default_factory=dict)
    # read-ahead: misses are counted as above whether or not they were prefetched; bytes_read includes its reads
    prefetched: int = 0  # experts read ahead
    prefetch_hits: int = 0  # of those, requested by the next get (misses it did not have to read itself)
    prefetch_waste: int = 0  # of those, not requested: read for nothing
    prefetch_bytes: int = 0
    prefetch_reads: int = 0  # batched read-ahead reads issued
    prefetch_wait_ns: int = 0  # time `get` waited on read-ahead that had not landed yet
    last_prefetch_by_layer: dict[int, dict] = field(default_factory=dict)

    def as_dict(self, cached_bytes: int, budget_bytes: int) -> dict:
        requests = self.hits + self.misses
        return {"host": {"hits": self.hits, "misses": self.misses,
                         "hit_rate": self.hits / requests if requests else 0.0,
                         "cached_bytes": cached_bytes, "budget_bytes": budget_bytes, "evictions": self.evictions},
                "storage": {"bytes_read": self.bytes_read, "reads": self.reads, "read_ns": self.read_ns},
                "prefetch": {"prefetched": self.prefetched, "hits": self.prefetch_hits, "waste": self.prefetch_waste,
                             "bytes_read": self.prefetch_bytes, "reads": self.prefetch_reads,
                             "wait_ns": self.prefetch_wait_ns, "sync_misses": self.misses - self.prefetch_hits}}


class ExpertCache:
    """Expert extents on demand: read from storage through `reader`, kept in host RAM (pinned when computing on a
    GPU) up to `budget_bytes`, and handed out on `device`. Read buffers come from a pool: those of experts that
    were not kept (or were evicted) are reused by later reads, so steady-state decoding allocates nothing."""

    def __init__(self, reader: ExtentReader, manifest: Manifest, budget_bytes: int,
                 device: torch.device | None = None):
        self.reader = reader
        self.device = device or torch.device("cpu")
        self.extents = {e.name: e for e in manifest.extents if ".expert." in e.name}
        self.budget_bytes = budget_bytes
        self.cached_bytes = 0
        self._entries: dict[str, tuple[dict[str, Weight], torch.Tensor]] = {}
        self._rank: dict[str, tuple[int, int]] = {}  # cached expert -> (frequency, last use): lowest is evicted first
        self._heap: list[tuple[int, int, str]] = []  # ranks, some stale (skipped when popped)
        self._clock = itertools.count()
        self._in_use: list[torch.Tensor] = []  # buffers of the last step's uncached experts
        self._free: dict[int, list[torch.Tensor]] = {}  # nbytes -> reusable buffers
        self._pending: dict[str, tuple[torch.Tensor, Future]] = {}  # read-ahead: expert -> (buffer, its read)
        self.frequency: dict[str, int] = {}
        self.stats = CacheStats()

    def get(self, layer: int, experts: list[int]) -> dict[int, dict[str, Weight]]:
        """The weights of `experts` of `layer`; misses are read together in one batched read."""
        self._release(self._in_use)
        self._in_use = []
        names = {e: expert_extent(layer, e) for e in experts}
        ahead = {name: self._pending.pop(name) for name in names.values()
                 if name in self._pending and name not in self._entries}
        found: dict[int, dict[str, Weight]] = {}
        missing = []
        for expert, name in names.items():
            self.frequency[name] = self.frequency.get(name, 0) + 1
            if name in self._entries:
                self._set_rank(name)
                found[expert] = self._entries[name][0]
            else:
                missing.append(expert)
        self.stats.hits += len(found)
        self.stats.misses += len(missing)
        read_bytes = 0
        if missing:
            extents = [self.extents[names[e]] for e in missing]
            unread = [extent for extent in extents if extent.name not in ahead]
            buffers = {extent.name: self._buffer(extent.nbytes) for extent in unread}
            if unread:
                began = time.perf_counter_ns()
                self.reader.read(unread, [buffers[extent.name] for extent in unread])
                self.stats.read_ns += time.perf_counter_ns() - began
                read_bytes = sum(extent.nbytes for extent in unread)
                self.stats.reads += 1
            if ahead:
                began = time.perf_counter_ns()
                for future in {id(f): f for _, f in ahead.values()}.values():
                    future.result()
                self.stats.prefetch_wait_ns += time.perf_counter_ns() - began
                self.stats.prefetch_hits += len(ahead)
                buffers.update({name: buffer for name, (buffer, _) in ahead.items()})
            for expert, extent in zip(missing, extents, strict=True):
                buffer = buffers[extent.name]
                found[expert] = group_weights(extent, extent_views(extent, buffer))
                if not self._admit(extent.name, found[expert], buffer, keep=set(names.values())):
                    self._in_use.append(buffer)
        self._drop_pending()
        self.stats.bytes_read += read_bytes
        self.stats.last_read_by_layer[layer] = {"ids": list(experts), "misses": len(missing),
                                                 "bytes": read_bytes, "prefetch_hits": len(ahead)}
        if self.device.type != "cpu":
            found = {expert: to_device(weights, self.device) for expert, weights in found.items()}
        return found

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Start reading those of `experts` of `layer` that are neither cached nor already on their way, in one
        batched asynchronous read; the next `get` uses them or drops them."""
        names = [expert_extent(layer, e) for e in experts]
        wanted = [self.extents[n] for n in names if n not in self._entries and n not in self._pending]
        self.stats.last_prefetch_by_layer[layer] = {"predicted": list(experts),
                                                    "read": [int(e.name.rsplit(".", 1)[1]) for e in wanted]}
        if not wanted:
            return
        buffers = [self._buffer(extent.nbytes) for extent in wanted]
        future = self.reader.submit(wanted, buffers)
        for extent, buffer in zip(wanted, buffers, strict=True):
            self._pending[extent.name] = (buffer, future)
        nbytes = sum(extent.nbytes for extent in wanted)
        self.stats.prefetched += len(wanted)
        self.stats.prefetch_bytes += nbytes
        self.stats.bytes_read += nbytes
        self.stats.prefetch_reads += 1

    def _drop_pending(self) -> None:
        """Read-ahead nobody asked for: wait for it to land (its buffers are about to be reused), count it as waste."""
        for buffer, future in self._pending.values():
            future.result()
            self._free.setdefault(buffer.numel(), []).append(buffer)  # never copied to the GPU: no sync needed
        self.stats.prefetch_waste += len(self._pending)
        self._pending.clear()

    @property
    def pending_bytes(self) -> int:
        """Host RAM held by read-ahead not yet taken by `get` (beside `cached_bytes`)."""
        return sum(buffer.numel() for buffer, _ in self._pending.values())

    def _buffer(self, nbytes: int) -> torch.Tensor:
        pool = self._free.get(nbytes)
        if pool:
            return pool.pop()
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.device.type == "cuda")

    def _release(self, buffers: list[torch.Tensor]) -> None:
        if buffers and self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # their copies to the GPU have landed
        for buffer in buffers:
            self._free.setdefault(buffer.numel(), []).append(buffer)

    def _admit(self, name: str, weights: dict[str, Weight], buffer: torch.Tensor, keep: set[str]) -> bool:
        """Cache an expert if the budget allows, evicting less frequently used ones not needed by this step."""
        nbytes = buffer.numel()
        if nbytes > self.budget_bytes:
            return False
        while self.cached_bytes + nbytes > self.budget_bytes:
            victim = self._coldest(keep)
            if victim is None:
                return False
            if self.frequency[victim] > self.frequency[name]:
                return False  # the newcomer is the rarer one: do not displace a hotter expert
            _, victim_buffer = self._entries.pop(victim)
            del self._rank[victim]
            self._release([victim_buffer])
            self.cached_bytes -= victim_buffer.numel()
            self.stats.evictions += 1
        self._entries[name] = (weights, buffer)
        self._set_rank(name)
        self.cached_bytes += nbytes
        return True

    def _set_rank(self, name: str) -> None:
        """A cached expert was just used: (frequency, now) is its new rank."""
        rank = self._rank[name] = (self.frequency[name], next(self._clock))
        heapq.heappush(self._heap, (*rank, name))
        if len(self._heap) > 4 * len(self._rank) + 64:  # drop stale ranks now and then
            self._heap = [(*r, n) for n, r in self._rank.items()]
            heapq.heapify(self._heap)

    def _coldest(self, keep: set[str]) -> str | None:
        """The cached expert to evict first (least frequently used, then least recently), not one in `keep`."""
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

    def cached_names(self) -> set[str]:
        return set(self._entries)

    def as_dict(self) -> dict:
        return self.stats.as_dict(self.cached_bytes, self.budget_bytes)


def moe_block(x: torch.Tensor, w: dict[str, Weight], prefix: str, layer: int, config: QwenMoeConfig,
              cache: ExpertCache, read_ahead: tuple[int, list[int]] | None = None) -> torch.Tensor:
    """x [N, hidden] -> routed experts (weighted) + sigmoid-gated shared expert. `read_ahead` (layer, experts): a
    prefetch started once this layer's experts are in hand, so that it overlaps their compute."""
    weights, ids = route(x, w[prefix + "ffn_gate_inp.weight"], config.num_experts_per_tok)
    selected = torch.unique(ids).tolist()
    experts = cache.get(layer, selected)
    if read_ahead is not None:
        cache.prefetch(*read_ahead)
    out = torch.zeros_like(x)
    for expert in selected:
        tokens, slot = torch.where(ids == expert)
        ew = experts[expert]
        p = f"blk.{layer}.expert.{expert}."
        hidden = x[tokens]
        act = F.silu(linear(hidden, ew[p + "ffn_gate.weight"])) * linear(hidden, ew[p + "ffn_up.weight"])
        out.index_add_(0, tokens, linear(act, ew[p + "ffn_down.weight"]) * weights[tokens, slot, None])
    shared = linear(F.silu(linear(x, w[prefix + "ffn_gate_shexp.weight"])) * linear(x, w[prefix + "ffn_up_shexp.weight"]),
                    w[prefix + "ffn_down_shexp.weight"])
    return out + torch.sigmoid(linear(x, w[prefix + "ffn_gate_inp_shexp.weight"])) * shared
