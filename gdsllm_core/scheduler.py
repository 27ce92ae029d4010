"""Residency: where each extent lives (VRAM, pinned host RAM, storage) and when it moves.

A forward pass walks its extents in order through `fetch(name)`, after hinting the next ones with `prefetch`.
This is the default (`tiered`) scheduler; plugins may register others through `register_schedulers`.
On a CUDA device `TieredScheduler(...)` builds a `GpuTieredScheduler` (three tiers, streamed through a ring)."""

import collections
import mmap
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from gdsllm_core.engine.forward import LoadOptions
from gdsllm_core.errors import BackendUnavailableError
from gdsllm_core.layout.store import ModelEntry
from gdsllm_core.storage.reader import ExtentReader, extent_views


class TieredScheduler:
    """On the CPU every extent is read once into host memory and stays there (the resident tier)."""

    def __new__(cls, entry: ModelEntry, options: LoadOptions, reader: ExtentReader | None = None):
        if cls is TieredScheduler and torch.device(options.device).type == "cuda":
            return super().__new__(GpuTieredScheduler)
        return super().__new__(cls)

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


VRAM_MARGIN = 1 << 30  # left free for the CUDA context, cuBLAS workspaces and fragmentation
HOST_MARGIN = 4 << 30  # RAM left to the rest of the machine when the host cache is sized automatically
RING_SLOTS = 3  # streamed layers in flight: the one computing and two being read


def available_ram() -> int:
    """MemAvailable from /proc/meminfo (bytes); 0 where it cannot be read."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PinnedArena:
    """One block of page-locked host memory of exactly `nbytes` (anonymous mmap + cudaHostRegister), so the
    pinned bytes are what the host budget says (torch's pinned allocator rounds up to a power of two)."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self._map = mmap.mmap(-1, max(nbytes, 1))
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8, count=nbytes) if nbytes else torch.empty(0, dtype=torch.uint8)
        self.registered = False
        if nbytes:
            code = torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), nbytes, 0)
            if int(code) != 0:
                raise BackendUnavailableError(f"cudaHostRegister of {nbytes / 2**30:.2f} GiB failed (error {int(code)})",
                                              "lower --host-cache or raise the locked-memory limit (ulimit -l)")
            self.registered = True

    def close(self) -> None:
        if self.registered:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            self.registered = False
        self.tensor = None
        self._map.close()


class GpuTieredScheduler(TieredScheduler):
    """Three tiers on a GPU. Extents that are not decoder layers (`blk.*`) and as many layers as fit the VRAM budget
    (beside `extra["reserved_vram_bytes"]` for the KV cache and scratch) are resident; the next layers within the
    host budget live in pinned host RAM; the rest stay on storage. Non-resident layers go through a ring of
    pre-allocated GPU buffers: while layer i computes, the next ones are copied (pinned tier, on a side stream) or
    read (storage tier, by the reader on a loader thread); the compute stream waits on events, the host only where
    a storage read has not finished (counted as I/O wait). Fetches are expected in a fixed cyclic order (the layers,
    token after token); any other order drains the ring and restarts it there.

    LoadOptions.extra: `reserved_vram_bytes`, `max_vram_layers` (cap on resident layers, like llama.cpp's -ngl),
    `ring_slots` (default 3)."""

    def __init__(self, entry: ModelEntry, options: LoadOptions, reader: ExtentReader | None = None):
        self.entry = entry
        self.device = torch.device(options.device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.reader = reader or ExtentReader(entry.path, entry.manifest)
        self.counters = {"fetches": 0, "bytes_read": 0, "io_wait_ns": 0, "bytes_from_host": 0,
                         "bytes_from_storage": 0}
        extents = list(entry.manifest.extents)
        self._extents = {e.name: e for e in extents}
        layers = [e for e in extents if e.name.startswith("blk.")]
        fixed = [e for e in extents if not e.name.startswith("blk.")]
        reserved = int(options.extra.get("reserved_vram_bytes", 0))
        slots = int(options.extra.get("ring_slots", RING_SLOTS))
        max_layers = options.extra.get("max_vram_layers")
        free, _total = torch.cuda.mem_get_info(self.device)
        self.vram_budget = int(options.vram_budget) if options.vram_budget is not None else free - VRAM_MARGIN
        self.host_budget = (int(options.host_cache) if options.host_cache is not None
                            else max(0, available_ram() - HOST_MARGIN))
        fixed_bytes = sum(e.nbytes for e in fixed)
        room = self.vram_budget - reserved - fixed_bytes
        if room < 0:
            raise BackendUnavailableError(
                f"the VRAM budget of {self.vram_budget / 2**30:.2f} GiB cannot hold the embeddings and output head "
                f"({fixed_bytes / 2**30:.2f} GiB) beside the KV cache and scratch ({reserved / 2**30:.2f} GiB)",
                "raise --vram-budget or lower the context length (num_ctx)")
        layer_max = max((e.nbytes for e in layers), default=0)
        all_fit = sum(e.nbytes for e in layers) <= room and (max_layers is None or int(max_layers) >= len(layers))
        if not all_fit:
            room -= slots * layer_max
            if room < 0:
                raise BackendUnavailableError(
                    f"the VRAM budget of {self.vram_budget / 2**30:.2f} GiB leaves no room for {slots} streaming "
                    f"buffers of {layer_max / 2**20:.0f} MiB", "raise --vram-budget")
        self.tier: dict[str, str] = {e.name: "vram" for e in fixed}
        used_vram, used_host = 0, 0
        for e in layers:
            resident = sum(1 for t in self.tier.values() if t == "vram") - len(fixed)
            if (all_fit or (used_vram + e.nbytes <= room and (max_layers is None or resident < int(max_layers)))):
                self.tier[e.name] = "vram"
                used_vram += e.nbytes
            elif used_host + e.nbytes <= self.host_budget:
                self.tier[e.name] = "host"
                used_host += e.nbytes
            else:
                self.tier[e.name] = "storage"
        self._load(fixed + layers, slots if not all_fit else 0, layer_max)

    def _load(self, extents, slots: int, slot_bytes: int) -> None:
        resident = [e for e in extents if self.tier[e.name] == "vram"]
        hosted = [e for e in extents if self.tier[e.name] == "host"]
        self._arena = torch.empty(sum(e.nbytes for e in resident), dtype=torch.uint8, device=self.device)
        self._pinned = PinnedArena(sum(e.nbytes for e in hosted)) if hosted else None
        self._resident: dict[str, dict[str, torch.Tensor]] = {}
        self._host_buffers: dict[str, torch.Tensor] = {}
        began = time.perf_counter_ns()
        for group, base in ((resident, self._arena), (hosted, self._pinned.tensor if self._pinned else None)):
            buffers, start = [], 0
            for e in group:
                buffers.append(base[start:start + e.nbytes])
                start += e.nbytes
            if group:
                self.reader.read(group, buffers)
            for e, buffer in zip(group, buffers, strict=True):
                if group is resident:
                    self._resident[e.name] = extent_views(e, buffer)
                else:
                    self._host_buffers[e.name] = buffer
        self.counters["load_ns"] = time.perf_counter_ns() - began
        self.counters["bytes_read"] += sum(e.nbytes for e in resident + hosted)
        # the ring
        self._order = [e.name for e in extents if self.tier[e.name] != "vram"]
        self._position = {name: i for i, name in enumerate(self._order)}
        self._slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(slots)]
        self._slot_free = [None] * slots  # CUDA event recorded on the compute stream once a slot's layer is done
        self._copy_stream = torch.cuda.Stream(self.device) if slots else None
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gdsllm-ring") if slots else None
        self._inflight: collections.deque = collections.deque()  # (name, slot, Future | Event)
        self._next = 0  # index in _order of the next extent to request
        self._seq = 0  # requests issued (slot = seq % slots)
        self._in_use: int | None = None  # slot handed out by the last fetch, not yet released
        self._lock = threading.Lock()

    # -- ring ---------------------------------------------------------------------------------------------------

    def _issue(self) -> None:
        """Request the next extent in cyclic order into the next slot."""
        name = self._order[self._next]
        self._next = (self._next + 1) % len(self._order)
        slot = self._seq % len(self._slots)
        self._seq += 1
        extent = self._extents[name]
        free = self._slot_free[slot]
        dest = self._slots[slot][:extent.nbytes]
        if self.tier[name] == "host":
            with torch.cuda.stream(self._copy_stream):
                if free is not None:
                    self._copy_stream.wait_event(free)
                dest.copy_(self._host_buffers[name], non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(self._copy_stream)
            self.counters["bytes_from_host"] += extent.nbytes
        else:
            def read() -> None:
                if free is not None:
                    free.synchronize()
                self.reader.read([extent], [dest])
            ready = self._loader.submit(read)
            self.counters["bytes_from_storage"] += extent.nbytes
        self._inflight.append((name, slot, ready))

    def _release(self) -> None:
        """The compute stream has been given all work on the slot handed out last: mark when it is done."""
        if self._in_use is not None:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._slot_free[self._in_use] = event
            self._in_use = None

    def _drain(self) -> None:
        for _name, _slot, ready in self._inflight:
            ready.result() if isinstance(ready, Future) else ready.synchronize()
        self._inflight.clear()

    def fetch(self, extent_name: str) -> dict[str, torch.Tensor]:
        """The tensors of one extent in GPU memory, ready for work enqueued on the current stream."""
        self.counters["fetches"] += 1
        self._release()
        views = self._resident.get(extent_name)
        if views is not None:
            return views
        if extent_name not in self._position:
            raise KeyError(f"no extent {extent_name!r} in model {self.entry.name}")
        if not self._inflight or self._inflight[0][0] != extent_name:
            self._drain()
            self._next = self._position[extent_name]
        while len(self._inflight) < len(self._slots):
            self._issue()
        name, slot, ready = self._inflight.popleft()
        began = time.perf_counter_ns()
        if isinstance(ready, Future):
            ready.result()
        else:
            torch.cuda.current_stream(self.device).wait_event(ready)
        self.counters["io_wait_ns"] += time.perf_counter_ns() - began
        self._in_use = slot
        return extent_views(self._extents[name], self._slots[slot])

    def prefetch(self, extent_names: list[str]) -> None:
        """Streamed extents are requested in cyclic order by `fetch` itself; nothing else to do."""

    def placement(self) -> dict[str, list[str]]:
        where: dict[str, list[str]] = {"vram": [], "host": [], "storage": []}
        for name, tier in self.tier.items():
            where[tier].append(name)
        return where

    def stats(self) -> dict:
        sizes = {"vram": 0, "host": 0, "storage": 0}
        for name, tier in self.tier.items():
            sizes[tier] += self._extents[name].nbytes
        layers = {tier: sum(1 for n in names if n.startswith("blk.")) for tier, names in self.placement().items()}
        return {"backend": self.reader.backend.name, "tiers": sizes, "layers": layers,
                "ring_slots": len(self._slots), "ring_bytes": sum(s.numel() for s in self._slots),
                "vram_budget": self.vram_budget, "host_budget": self.host_budget, **self.counters}

    def close(self) -> None:
        self._release()
        self._drain()
        if self._loader is not None:
            self._loader.shutdown(wait=True)
        torch.cuda.synchronize(self.device)
        self._resident.clear()
        self._host_buffers.clear()
        self._slots.clear()
        self._arena = None
        if self._pinned is not None:
            self._pinned.close()
            self._pinned = None
        self.reader.close()
