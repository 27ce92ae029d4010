"""Residency: where each extent lives (VRAM, pinned host RAM, storage) and when it moves.

A forward pass walks its extents in order through `fetch(name)`, after hinting the next ones with `prefetch`.
This is the default (`tiered`) scheduler; plugins may register others through `register_schedulers`."""

import time

import torch

from gdsllm_core.engine.forward import LoadOptions
from gdsllm_core.layout.store import ModelEntry
from gdsllm_core.storage.reader import ExtentReader, extent_views


class TieredScheduler:
    """On the CPU every extent is read once into host memory and stays there (the resident tier)."""

    def __init__(self, entry: ModelEntry, options: LoadOptions, reader: ExtentReader | None = None):
        self.entry = entry
        self.device = torch.device(options.device)
        self.reader = reader or ExtentReader(entry.path, entry.manifest)
        self._resident: dict[str, dict[str, torch.Tensor]] = {}
        self.counters = {"fetches": 0, "bytes_read": 0, "io_wait_ns": 0}
        self._load_all()

    def _load_all(self) -> None:
        extents = self.entry.manifest.extents
        total = sum(extent.nbytes for extent in extents)
        arena = torch.empty(total, dtype=torch.uint8)
        buffers, start = [], 0
        for extent in extents:
            buffers.append(arena[start:start + extent.nbytes])
            start += extent.nbytes
        began = time.perf_counter_ns()
        self.reader.read(extents, buffers)
        self.counters["io_wait_ns"] += time.perf_counter_ns() - began
        self.counters["bytes_read"] += total
        for extent, buffer in zip(extents, buffers, strict=True):
            self._resident[extent.name] = extent_views(extent, buffer)

    def fetch(self, extent_name: str) -> dict[str, torch.Tensor]:
        """The tensors of one extent on the compute device, ready to use."""
        self.counters["fetches"] += 1
        return self._resident[extent_name]

    def prefetch(self, extent_names: list[str]) -> None:
        """A hint that these extents are needed next (everything is resident here)."""

    def stats(self) -> dict:
        resident = sum(e.nbytes for e in self.entry.manifest.extents if e.name in self._resident)
        return {"backend": self.reader.backend.name, "tiers": {"host": resident, "vram": 0, "storage": 0},
                **self.counters}

    def close(self) -> None:
        self._resident.clear()
        self.reader.close()
