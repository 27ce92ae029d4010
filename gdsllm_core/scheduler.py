"""Residency: where each extent lives (VRAM, pinned host RAM, storage) and when it moves.

A forward pass walks its extents in order through `fetch(name)`, after hinting the next ones with `prefetch`.
This is the default (`tiered`) scheduler; plugins may register others through `register_schedulers`.
On a CUDA device `TieredScheduler(...)` builds a `GpuTieredScheduler` (three tiers, streamed through a ring)."""

import collections
import math
import mmap
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from gdsllm_core.engine.forward import LoadOptions
from gdsllm_core.errors import BackendUnavailableError, BadRequestError, CorruptModelError
from gdsllm_core.layout.manifest import ExtentInfo
from gdsllm_core.layout.store import ModelEntry
from gdsllm_core.storage.reader import ExtentReader, extent_views


def missing_extent(model: str, extent_name: str) -> CorruptModelError:
    return CorruptModelError(f"model {model!r} has no extent {extent_name!r} (its config names more than its manifest "
                             "holds)", "the manifest is damaged: re-convert the model with `gdsllm pull`")


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
        views = self._resident.get(extent_name)
        if views is None:
            raise missing_extent(self.entry.name, extent_name)
        return views

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
# Streamed layers in flight. A full ring idles the copy stream until its oldest layer is computed, so the ring
# also covers the resident layers computed at the start of each step (eager, ~0.35 ms each on the H100). There,
# 7B Q4_0 with 8 layers resident and 24 pinned: 50-54 ms/token at 4 slots, PCIe at 51-54 GB/s (its ceiling).
RING_SLOTS = 4
RING_SLOTS_WITH_CPU = 8  # deeper when the CPU computes layers: the copy stream keeps working through CPU layers
COPY_CHUNK_BYTES = 16 << 20  # with CPU layers, ring copies go in pieces: a copy of h to the host waited for the
#                              host-to-device copy operation in progress in a fit of decode times on the H100, so
#                              keep those short (a direct probe later saw a 16 KB copy take 19-26 us beside them)


def available_ram() -> int:
    """MemAvailable from /proc/meminfo (bytes); 0 where it cannot be read."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_layers_option(value) -> str | int:
    """`extra["cpu_layers"]` checked: "auto" (balance CPU compute against the copy stream), or a layer count (0:
    off, the default)."""
    if value is None:
        return 0
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = -1
    if count < 0:
        raise BadRequestError(f"cpu_layers {value!r} is neither 'auto' nor a layer count",
                              "use --cpu-layers auto, 0 (off) or a number of layers")
    return count


def simulate_step_seconds(tiers: list[str], copy_s: float, cpu_s: float, gpu_s: float, slots: int = RING_SLOTS,
                          dma_wait_s: float = 0.0, tokens: int = 4) -> float:
    """Seconds of one decode step (the last of `tokens`, the ring in its steady state) of layers whose tiers are
    "vram" (resident), "ring" (copied through the ring, `copy_s` each) or "cpu" (computed on the CPU, `cpu_s` each,
    h's round trip included), modelled as `GpuTieredScheduler` and the forward pass run them: a fetch keeps
    `slots` copies requested, a copy starts once the copy stream is free, the host has asked for it and its slot's
    previous layer is done (a slot is released at the next fetch); the GPU computes a layer (`gpu_s`) once its
    copy is in; the CPU computes a layer once the GPU has finished everything before it, and the GPU goes on after.
    A CPU layer longer than the copies queued before it leaves the copy stream idle: the ring's depth counts.

    `dma_wait_s`: when h goes to the host by a DMA copy, it waits for the host-to-device copy operation in
    progress (seen on the H100 machine), i.e. up to the next boundary of `dma_wait_s` (the duration of one copy
    operation: `copy_s` for whole-layer copies, less when the ring copies in chunks); 0 when h moves without
    the copy engines."""
    order = [i for i, tier in enumerate(tiers) if tier == "ring"]
    host = gpu = copy = 0.0
    copies: list[tuple[float, float]] = []  # (start, end) of each ring copy
    inflight: collections.deque = collections.deque()  # ready times of requested copies, in order
    slot_free = [0.0] * max(slots, 1)
    in_use, issued, step = None, 0, 0.0
    for _ in range(tokens):
        began = host
        for tier in tiers:
            if tier == "vram":
                gpu = max(gpu, host) + gpu_s
            elif tier == "cpu":
                start = max(host, gpu)
                if dma_wait_s > 0:
                    for began_copy, ended in copies:
                        if began_copy <= start < ended:  # h's copy waits for the operation in progress
                            start = min(ended, began_copy + math.ceil((start - began_copy) / dma_wait_s) * dma_wait_s)
                host = start + cpu_s
                gpu = host
            else:
                if in_use is not None:
                    slot_free[in_use] = max(gpu, host)
                while len(inflight) < slots and order:
                    slot = issued % slots
                    begin = max(copy, slot_free[slot], host)
                    copy = begin + copy_s
                    copies.append((begin, copy))
                    inflight.append((slot, copy))
                    issued += 1
                in_use, ready = inflight.popleft()
                gpu = max(gpu, host, ready) + gpu_s
        host = max(host, gpu)
        step = host - began
    return step


def simulate_cpu_plan(tiers: list[str], on_cpu, copy_s: float, cpu_s: float, gpu_s: float, slots: int,
                      dma_wait_s: float = 0.0) -> float:
    """`simulate_step_seconds` with the layers whose indices are in `on_cpu` computed on the CPU."""
    marked = set(on_cpu)
    return simulate_step_seconds(["cpu" if i in marked else tier for i, tier in enumerate(tiers)], copy_s, cpu_s,
                                 gpu_s, slots, dma_wait_s)


def spread(names: list, n: int) -> list:
    """`n` of `names`, evenly spaced (the middle of n equal runs: every other one for half), so that streamed
    layers sit between CPU layers and the copy stream has work while the CPU computes."""
    k, n = len(names), min(n, len(names))
    return [names[(2 * j + 1) * k // (2 * n)] for j in range(n)] if n > 0 else []


def plan_cpu_layers(tiers: list[str], candidates: list[int], copy_s: float, cpu_s: float, gpu_s: float,
                    slots: int = RING_SLOTS, limit: int | None = None, margin: float = 0.03,
                    dma_wait_s: float = 0.0) -> list[int]:
    """Which of `candidates` (indices of "ring" layers in `tiers`) the CPU should compute: for each count up to
    `limit`, that many candidates evenly spread; the set whose simulated step (`simulate_cpu_plan`) is
    shortest, if it beats streaming them all by more than `margin` (else none)."""
    def seconds(chosen: list[int]) -> float:
        return simulate_cpu_plan(tiers, chosen, copy_s, cpu_s, gpu_s, slots, dma_wait_s)

    streamed = seconds([])
    best, best_s = [], streamed
    for n in range(1, min(len(candidates), len(candidates) if limit is None else limit) + 1):
        chosen = spread(candidates, n)
        step = seconds(chosen)
        if step < best_s:
            best, best_s = chosen, step
    return best if best_s < streamed * (1 - margin) else []


def place_streamed_layers(layers: list[ExtentInfo], room: int, host_budget: int, max_layers: int,
                          depths: list[int]) -> tuple[int, dict[str, str]] | None:
    """(ring slots, each layer's tier) when not every layer fits in VRAM: the first ring depth of `depths` whose
    buffers fit in `room` VRAM bytes, except that a depth before the last is taken only if some layer lands in
    pinned host RAM (the deeper ring serves CPU-computed layers, which are host-tier ones). In order, layers go to
    VRAM while the room left beside the ring and `max_layers` allow, then to host RAM within `host_budget`, then to
    storage. None when no depth's buffers fit."""
    layer_max = max((e.nbytes for e in layers), default=0)
    for slots in depths:
        if room - slots * layer_max < 0:
            continue
        tiers, used_vram, used_host, resident = {}, 0, 0, 0
        for e in layers:
            if used_vram + e.nbytes <= room - slots * layer_max and resident < max_layers:
                tiers[e.name] = "vram"
                used_vram += e.nbytes
                resident += 1
            elif used_host + e.nbytes <= host_budget:
                tiers[e.name] = "host"
                used_host += e.nbytes
            else:
                tiers[e.name] = "storage"
        if slots == depths[-1] or "host" in tiers.values():
            return slots, tiers
    return None


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

    Some host-tier layers may also be computed on the CPU ("cpu" placement, `extra["cpu_layers"]`: "auto", a count,
    or 0 = off): the forward pass packs them for its CPU kernels (`place_on_cpu`, within the host budget beside
    the pinned tier; their GGUF bytes stay pinned for prefill and large batches) and, step by step, says which
    of them it computes there (`set_cpu_active`); the ring then skips those, so the copy stream carries the
    others while the CPU works.

    LoadOptions.extra: `reserved_vram_bytes`, `max_vram_layers` (cap on resident layers, like llama.cpp's -ngl),
    `ring_slots` (default RING_SLOTS, or RING_SLOTS_WITH_CPU when `cpu_layers` is not 0 and some layers land in
    pinned host RAM), `cpu_layers`."""

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
        self.cpu_request = cpu_layers_option(options.extra.get("cpu_layers", 0))
        self.cpu_placed: list[str] = []  # host-tier layers the forward pass may compute on the CPU
        self.cpu_bytes = 0  # host RAM of their CPU copies (beside the pinned tier, within the host budget)
        self.copy_chunk_bytes = 0  # ring copies in pieces of this many bytes (0: whole extents)
        self._cpu_active: frozenset[str] = frozenset()  # those computed on the CPU in the current step
        self._copy_clock: collections.deque = collections.deque(maxlen=256)  # (start, end, bytes) of timed copies
        self._copy_gbps: collections.deque = collections.deque(maxlen=32)  # speeds of the latest finished ones
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
        max_layers = int(options.extra.get("max_vram_layers", len(layers)))
        self.tier: dict[str, str] = {e.name: "vram" for e in fixed}
        if sum(e.nbytes for e in layers) <= room and max_layers >= len(layers):
            self.tier.update({e.name: "vram" for e in layers})
            self._load(fixed + layers, 0, layer_max)
            return
        depths = ([int(options.extra["ring_slots"])] if "ring_slots" in options.extra
                  else [RING_SLOTS_WITH_CPU, RING_SLOTS] if self.cpu_request else [RING_SLOTS])
        placed = place_streamed_layers(layers, room, self.host_budget, max_layers, depths)
        if placed is None:
            raise BackendUnavailableError(
                f"the VRAM budget of {self.vram_budget / 2**30:.2f} GiB leaves no room for {depths[-1]} streaming "
                f"buffers of {layer_max / 2**20:.0f} MiB", "raise --vram-budget")
        slots, tiers = placed
        self.tier.update(tiers)
        self._load(fixed + layers, slots, layer_max)

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
        self._streamed = list(self._order)  # the ring's order when no layer is computed on the CPU
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
            timed = bool(self.cpu_placed)  # copy speed under load, for balancing the CPU layers against it
            with torch.cuda.stream(self._copy_stream):
                if free is not None:
                    self._copy_stream.wait_event(free)
                start = torch.cuda.Event(enable_timing=True) if timed else None
                if start is not None:
                    start.record(self._copy_stream)
                source, step = self._host_buffers[name], self.copy_chunk_bytes or extent.nbytes
                for offset in range(0, extent.nbytes, step):
                    dest[offset:offset + step].copy_(source[offset:offset + step], non_blocking=True)
                ready = torch.cuda.Event(enable_timing=timed)
                ready.record(self._copy_stream)
            if start is not None:
                self._copy_clock.append((start, ready, extent.nbytes))
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
            raise missing_extent(self.entry.name, extent_name)
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

    # -- CPU-computed layers ------------------------------------------------------------------------------------

    def cpu_candidates(self, eligible: Callable[[ExtentInfo], bool]) -> list[str]:
        """Host-tier layers, in order, that the forward pass can compute on the CPU (`eligible`)."""
        return [name for name, tier in self.tier.items()
                if tier == "host" and name.startswith("blk.") and eligible(self._extents[name])]

    def layer_tiers(self) -> list[str]:
        """Per decoder layer, in order: "vram" (resident) or "ring" (streamed from pinned RAM or storage)."""
        layers = sorted((name for name in self.tier if name.startswith("blk.")), key=lambda n: int(n.split(".")[1]))
        return ["vram" if self.tier[name] == "vram" else "ring" for name in layers]

    @property
    def ring_slots(self) -> int:
        return len(self._slots)

    def host_view(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors of a host-tier extent in pinned RAM (for packing it for the CPU)."""
        return extent_views(self._extents[name], self._host_buffers[name])

    def host_room(self) -> int:
        """Host budget left beside the pinned tier and the CPU copies."""
        pinned = sum(e.nbytes for name, e in self._extents.items() if self.tier[name] == "host")
        return self.host_budget - pinned - self.cpu_bytes

    def copy_seconds(self, name: str, reps: int = 5) -> float:
        """Seconds to copy a host-tier extent into a ring slot (median of `reps`, timed by events on the copy
        stream); call it before decoding starts (it uses slot 0)."""
        self._release()
        self._drain()
        torch.cuda.current_stream(self.device).synchronize()
        src = self._host_buffers[name]
        dest = self._slots[0][:src.numel()]
        times = []
        with torch.cuda.stream(self._copy_stream):
            for _ in range(reps + 1):
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(self._copy_stream)
                dest.copy_(src, non_blocking=True)
                stop.record(self._copy_stream)
                stop.synchronize()
                times.append(start.elapsed_time(stop) / 1e3)
        return sorted(times[1:])[reps // 2]

    def recent_copy_gbps(self) -> float | None:
        """Median GB/s of the latest host-tier copies (timed while CPU layers exist: PCIe and the CPU share host
        memory, so this is the speed under that load); None before any has finished."""
        while self._copy_clock and self._copy_clock[0][1].query():
            start, stop, nbytes = self._copy_clock.popleft()
            self._copy_gbps.append(nbytes / (start.elapsed_time(stop) / 1e3) / 1e9)
        return statistics.median(self._copy_gbps) if self._copy_gbps else None

    def place_on_cpu(self, names: list[str], nbytes: int) -> None:
        """Mark host-tier layers `names` as computable on the CPU, their CPU copies taking `nbytes` of host RAM."""
        wrong = [name for name in names if self.tier.get(name) != "host"]
        if wrong:
            raise ValueError(f"only host-tier layers can be placed on the CPU, not {wrong}")
        if nbytes > self.host_room() + self.cpu_bytes:
            raise BackendUnavailableError(
                f"the CPU copies of {len(names)} layers ({nbytes / 2**30:.2f} GiB) do not fit the host budget "
                f"beside the pinned layers", "raise --host-cache or lower --cpu-layers")
        self.cpu_placed, self.cpu_bytes = list(names), nbytes
        self.copy_chunk_bytes = COPY_CHUNK_BYTES if names else 0
        self.counters.setdefault("cpu_layer_runs", 0)
        self.counters.setdefault("cpu_compute_ns", 0)

    def set_cpu_active(self, names: frozenset[str]) -> None:
        """The CPU-placed layers the CPU computes from the next fetch on: the ring skips them (drained and
        restarted when the set changes, at a step boundary)."""
        if names == self._cpu_active:
            return
        if not names <= set(self.cpu_placed):
            raise ValueError(f"layers {sorted(names - set(self.cpu_placed))} are not placed on the CPU")
        self._release()
        self._drain()
        self._cpu_active = names
        self._order = [name for name in self._streamed if name not in names]
        self._position = {name: i for i, name in enumerate(self._order)}
        self._next = 0

    def placement(self) -> dict[str, list[str]]:
        """Extent names per tier; with CPU layers, a "cpu" entry (those layers are left out of "host")."""
        where: dict[str, list[str]] = {"vram": [], "host": [], "storage": []}
        for name, tier in self.tier.items():
            where[tier].append(name)
        if self.cpu_placed:
            where["host"] = [name for name in where["host"] if name not in self.cpu_placed]
            where["cpu"] = list(self.cpu_placed)
        return where

    def stats(self) -> dict:
        sizes = {"vram": 0, "host": 0, "storage": 0}
        for name, tier in self.tier.items():
            sizes[tier] += self._extents[name].nbytes
        layers = {tier: sum(1 for n in names if n.startswith("blk.")) for tier, names in self.placement().items()}
        return {"backend": self.reader.backend.name, "tiers": sizes, "layers": layers,
                "ring_slots": len(self._slots), "ring_bytes": sum(s.numel() for s in self._slots),
                "vram_budget": self.vram_budget, "host_budget": self.host_budget, "cpu_bytes": self.cpu_bytes,
                "cpu_active_layers": len(self._cpu_active), **self.counters}

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
