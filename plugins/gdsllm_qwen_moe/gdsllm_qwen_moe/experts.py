"""The MoE block with selective expert loading and a host-RAM expert cache.

Per layer the router runs first; only the experts it picked (the union over every token of the step: the batch in
decode, the prompt chunk in prefill) are fetched, the cache misses in one batched `ExtentReader.submit`. Cached
experts live in host RAM under a byte budget; eviction drops the expert requested least often (ties: least recently
used), so frequently routed experts stay. Statistics: hits, misses, bytes read from storage, evictions."""

import heapq
import itertools
import time
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


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    reads: int = 0  # batched storage reads issued
    read_ns: int = 0  # time spent waiting for them
    evictions: int = 0
    last_read_by_layer: dict[int, dict] = field(default_factory=dict)

    def as_dict(self, cached_bytes: int, budget_bytes: int) -> dict:
        requests = self.hits + self.misses
        return {"host": {"hits": self.hits, "misses": self.misses,
                         "hit_rate": self.hits / requests if requests else 0.0,
                         "cached_bytes": cached_bytes, "budget_bytes": budget_bytes, "evictions": self.evictions},
                "storage": {"bytes_read": self.bytes_read, "reads": self.reads, "read_ns": self.read_ns}}


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
        self.frequency: dict[str, int] = {}
        self.stats = CacheStats()

    def get(self, layer: int, experts: list[int]) -> dict[int, dict[str, Weight]]:
        """The weights of `experts` of `layer`; misses are read together in one batched read."""
        self._release(self._in_use)
        self._in_use = []
        names = {e: expert_extent(layer, e) for e in experts}
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
            buffers = [self._buffer(extent.nbytes) for extent in extents]
            began = time.perf_counter_ns()
            self.reader.read(extents, buffers)
            self.stats.read_ns += time.perf_counter_ns() - began
            read_bytes = sum(extent.nbytes for extent in extents)
            self.stats.reads += 1
            for expert, extent, buffer in zip(missing, extents, buffers, strict=True):
                found[expert] = group_weights(extent, extent_views(extent, buffer))
                if not self._admit(extent.name, found[expert], buffer, keep=set(names.values())):
                    self._in_use.append(buffer)
        self.stats.bytes_read += read_bytes
        self.stats.last_read_by_layer[layer] = {"ids": list(experts), "misses": len(missing),
                                                 "bytes": read_bytes}
        if self.device.type != "cpu":
            found = {expert: to_device(weights, self.device) for expert, weights in found.items()}
        return found

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
              cache: ExpertCache) -> torch.Tensor:
    """x [N, hidden] -> routed experts (weighted) + sigmoid-gated shared expert."""
    weights, ids = route(x, w[prefix + "ffn_gate_inp.weight"], config.num_experts_per_tok)
    selected = torch.unique(ids).tolist()
    experts = cache.get(layer, selected)
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
