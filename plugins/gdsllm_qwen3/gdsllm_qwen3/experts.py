"""ExpertStore: the experts a router picked, read from storage one extent (= one read) per expert, kept in host RAM
under a byte budget (least recently used evicted first, never one the current step uses).

`stream(layer, experts)` yields each expert's (gate, up, down) dequantized on the compute device: cache hits first,
then the misses as their reads land (all submitted together, one future each), so computing the first experts
overlaps reading the others. Misses are admitted once the step's experts are all in, in request order, so what the
cache holds never depends on the order reads complete in. Statistics: hits, misses, bytes read, evictions."""

from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import as_completed

import torch

from gdsllm_core.api import ExtentReader, Manifest, extent_views, ggml
from gdsllm_qwen3.names import EXPERT_TENSORS, expert_extent


class ExpertStore:
    def __init__(self, reader: ExtentReader, manifest: Manifest, budget_bytes: int, device: torch.device,
                 dtype: torch.dtype):
        self.reader = reader
        self.extents = {e.name: e for e in manifest.extents if ".expert." in e.name}
        self.budget_bytes = budget_bytes
        self.device, self.dtype = device, dtype
        self._cached: OrderedDict[str, torch.Tensor] = OrderedDict()  # extent name -> its bytes, oldest use first
        self.cached_bytes = 0
        self.hits = self.misses = self.bytes_read = self.evictions = 0

    def _weights(self, name: str, buffer: torch.Tensor) -> tuple[torch.Tensor, ...]:
        extent = self.extents[name]
        views = extent_views(extent, buffer)
        infos = {t.name: t for t in extent.tensors}
        return tuple(ggml.dequantize(views[f"{name}.{part}.weight"].to(self.device, non_blocking=True),
                                     infos[f"{name}.{part}.weight"].qtype)
                     .reshape(infos[f"{name}.{part}.weight"].shape).to(self.dtype) for part in EXPERT_TENSORS)

    def stream(self, layer: int, experts: list[int]) -> Iterator[tuple[int, tuple[torch.Tensor, ...]]]:
        """(expert, (gate [F, D], up [F, D], down [D, F])) for each of `experts` of `layer`."""
        names = {expert: expert_extent(layer, expert) for expert in experts}
        missing = [expert for expert in experts if names[expert] not in self._cached]
        pin = self.device.type == "cuda"
        buffers = {expert: torch.empty(self.extents[names[expert]].nbytes, dtype=torch.uint8, pin_memory=pin)
                   for expert in missing}
        futures = self.reader.submit_each([self.extents[names[e]] for e in missing], [buffers[e] for e in missing])
        expert_of = dict(zip(futures, missing, strict=True))
        for expert in experts:
            if expert not in buffers:
                self.hits += 1
                self._cached.move_to_end(names[expert])
                yield expert, self._weights(names[expert], self._cached[names[expert]])
        for future in as_completed(futures):
            future.result()
            expert = expert_of[future]
            self.misses += 1
            self.bytes_read += self.extents[names[expert]].nbytes
            yield expert, self._weights(names[expert], buffers[expert])
        for expert in missing:
            self._admit(names[expert], buffers[expert], in_use=set(names.values()))

    def _admit(self, name: str, buffer: torch.Tensor, in_use: set[str]) -> None:
        nbytes = buffer.numel()
        if nbytes > self.budget_bytes:
            return
        while self.cached_bytes + nbytes > self.budget_bytes:
            victim = next((old for old in self._cached if old not in in_use), None)
            if victim is None:
                return
            self.cached_bytes -= self._cached.pop(victim).numel()
            self.evictions += 1
        self._cached[name] = buffer
        self.cached_bytes += nbytes

    def as_dict(self) -> dict:
        requests = self.hits + self.misses
        return {"requests": requests, "hits": self.hits, "misses": self.misses,
                "hit_rate": self.hits / requests if requests else 0.0, "bytes_read": self.bytes_read,
                "evictions": self.evictions, "cached_bytes": self.cached_bytes, "budget_bytes": self.budget_bytes}

    def close(self) -> None:
        self._cached.clear()
        self.cached_bytes = 0
