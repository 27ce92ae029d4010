"""Residency: where each extent lives (VRAM, pinned host RAM, storage) and when it moves.

A driver walks its extents in order through `fetch(name)`, after hinting the next ones with `prefetch`. This is
the default (`tiered`) residency; plugins may register others through `register_residencies`. On a CUDA device
`TieredResidency(...)` builds a `GpuTieredResidency` (three tiers, streamed through a ring). Decoder layers are the
extents whose declared role is LAYER; MoE experts have their own residency (the expert cache) and are not placed
here."""

import collections
import mmap
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import msgspec
import torch

from gdsllm_core.errors import BackendUnavailableError, BadRequestError, CorruptModelError
from gdsllm_core.layout.manifest import ExtentInfo, ExtentRole
from gdsllm_core.layout.store import ModelEntry
from gdsllm_core.runtime.stats import ResidencyStats, TierBytes
from gdsllm_core.storage.reader import ExtentReader, extent_views


def missing_extent(model: str, extent_name: str) -> CorruptModelError:
    return CorruptModelError(f"model {model!r} has no extent {extent_name!r} (its config names more than its manifest "
                             "holds)", "the manifest is damaged: re-convert the model with `gdsllm pull`")


@dataclass(frozen=True)
class Placement:
    """What a residency is asked for: the device, budgets in bytes (None: automatic), VRAM the driver reserves
    beside the weights (KV cache, scratch), a cap on resident layers, the ring's depth (None: automatic) and the
    CPU-layer request ("auto", a count, 0: off)."""

    device: str = "cpu"
    vram_budget: int | None = None
    host_cache: int | None = None
    reserved_vram_bytes: int = 0
    max_vram_layers: int | None = None
    ring_slots: int | None = None
    cpu_layers: str | int = 0


def decoder_layers(extents: list[ExtentInfo]) -> list[ExtentInfo]:
    """The extents declared as decoder layers, in layer order."""
    return sorted((e for e in extents if e.role == ExtentRole.LAYER), key=lambda e: e.index)


class TieredResidency:
    """On the CPU every extent is read once into host memory and stays there (the resident tier)."""

    def __new__(cls, entry: ModelEntry, placement: Placement, reader: ExtentReader | None = None):
        if cls is TieredResidency and torch.device(placement.device).type == "cuda":
            return super().__new__(GpuTieredResidency)
        return super().__new__(cls)

    def __init__(self, entry: ModelEntry, placement: Placement, reader: ExtentReader | None = None):
        self.entry = entry
        self.device = torch.device(placement.device)
        self.reader = reader or ExtentReader(entry.path, entry.manifest)
        self._resident: dict[str, dict[str, torch.Tensor]] = {}
        self._stats = ResidencyStats(backend=self.reader.backend.name, tiers=TierBytes())
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
        self._stats.io_wait_ns += time.perf_counter_ns() - began
        self._stats.bytes_read += total
        self._stats.tiers.host = total
        for extent, buffer in zip(extents, buffers, strict=True):
            self._resident[extent.name] = extent_views(extent, buffer)

    def fetch(self, extent_name: str) -> dict[str, torch.Tensor]:
        """The tensors of one extent on the compute device, ready to use."""
        self._stats.fetches += 1
        views = self._resident.get(extent_name)
        if views is None:
            raise missing_extent(self.entry.name, extent_name)
        return views

    def prefetch(self, extent_names: list[str]) -> None:
        """A hint that these extents are needed next (everything is resident here)."""

    def tier(self, extent_name: str) -> str:
        """Everything is resident (on the CPU device, host memory is where the model computes from)."""
        return "vram"

    def stats(self) -> ResidencyStats:
        """A snapshot of the counters (they only grow) and the placement."""
        return msgspec.structs.replace(self._stats, tiers=msgspec.structs.replace(self._stats.tiers),
                                       layers=dict(self._stats.layers))

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
    """The `cpu_layers` option checked: "auto" (balance CPU compute against the copy stream), or a layer count (0:
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


class GpuTieredResidency(TieredResidency):
    """Three tiers on a GPU. Extents that are not decoder layers and as many layers as fit the VRAM budget
    (beside `placement.reserved_vram_bytes` for the KV cache and scratch) are resident; the next layers within the
    host budget live in pinned host RAM; the rest stay on storage. Non-resident layers go through a ring of
    pre-allocated GPU buffers: while layer i computes, the next ones are copied (pinned tier, on a side stream) or
    read (storage tier, by the reader on a loader thread); the compute stream waits on events, the host only where
    a storage read has not finished (counted as I/O wait). Fetches are expected in a fixed cyclic order (the layers,
    token after token); any other order drains the ring and restarts it there.

    Some host-tier layers may also be computed on the CPU ("cpu" placement, `placement.cpu_layers`: "auto", a
    count, or 0 = off): the driver packs them for its CPU kernels (`place_on_cpu`, within the host budget beside
    the pinned tier; their GGUF bytes stay pinned for prefill and large batches) and, step by step, says which
    of them it computes there (`set_cpu_active`); the ring then skips those, so the copy stream carries the
    others while the CPU works.

    The ring's depth: `placement.ring_slots`, else RING_SLOTS, or RING_SLOTS_WITH_CPU when CPU layers are asked
    for and some layers land in pinned host RAM."""

    def __init__(self, entry: ModelEntry, placement: Placement, reader: ExtentReader | None = None):
        self.entry = entry
        self.device = torch.device(placement.device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.reader = reader or ExtentReader(entry.path, entry.manifest)
        self._stats = ResidencyStats(backend=self.reader.backend.name, tiers=TierBytes())
        extents = [e for e in entry.manifest.extents if e.role != ExtentRole.EXPERT]
        self._extents = {e.name: e for e in extents}
        layers = decoder_layers(extents)
        self._layer_names = [e.name for e in layers]
        layer_set = set(self._layer_names)
        fixed = [e for e in extents if e.name not in layer_set]
        reserved = placement.reserved_vram_bytes
        self.cpu_request = cpu_layers_option(placement.cpu_layers)
        self.cpu_placed: list[str] = []  # host-tier layers the forward pass may compute on the CPU
        self.cpu_bytes = 0  # host RAM of their CPU copies (beside the pinned tier, within the host budget)
        self.copy_chunk_bytes = 0  # ring copies in pieces of this many bytes (0: whole extents)
        self._cpu_active: frozenset[str] = frozenset()  # those computed on the CPU in the current step
        self._copy_clock: collections.deque = collections.deque(maxlen=256)  # (start, end, bytes) of timed copies
        self._copy_gbps: collections.deque = collections.deque(maxlen=32)  # speeds of the latest finished ones
        free, _total = torch.cuda.mem_get_info(self.device)
        self.vram_budget = int(placement.vram_budget) if placement.vram_budget is not None else free - VRAM_MARGIN
        self.host_budget = (int(placement.host_cache) if placement.host_cache is not None
                            else max(0, available_ram() - HOST_MARGIN))
        fixed_bytes = sum(e.nbytes for e in fixed)
        room = self.vram_budget - reserved - fixed_bytes
        if room < 0:
            raise BackendUnavailableError(
                f"the VRAM budget of {self.vram_budget / 2**30:.2f} GiB cannot hold the embeddings and output head "
                f"({fixed_bytes / 2**30:.2f} GiB) beside the KV cache and scratch ({reserved / 2**30:.2f} GiB)",
                "raise --vram-budget or lower the context length (num_ctx)")
        layer_max = max((e.nbytes for e in layers), default=0)
        max_layers = len(layers) if placement.max_vram_layers is None else int(placement.max_vram_layers)
        self._tier: dict[str, str] = {e.name: "vram" for e in fixed}
        if sum(e.nbytes for e in layers) <= room and max_layers >= len(layers):
            self._tier.update({e.name: "vram" for e in layers})
            self._load(fixed + layers, 0, layer_max)
            return
        depths = ([int(placement.ring_slots)] if placement.ring_slots is not None
                  else [RING_SLOTS_WITH_CPU, RING_SLOTS] if self.cpu_request else [RING_SLOTS])
        placed = place_streamed_layers(layers, room, self.host_budget, max_layers, depths)
        if placed is None:
            raise BackendUnavailableError(
                f"the VRAM budget of {self.vram_budget / 2**30:.2f} GiB leaves no room for {depths[-1]} streaming "
                f"buffers of {layer_max / 2**20:.0f} MiB", "raise --vram-budget")
        slots, tiers = placed
        self._tier.update(tiers)
        self._load(fixed + layers, slots, layer_max)

    def _load(self, extents, slots: int, slot_bytes: int) -> None:
        resident = [e for e in extents if self._tier[e.name] == "vram"]
        hosted = [e for e in extents if self._tier[e.name] == "host"]
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
        self._stats.load_ns = time.perf_counter_ns() - began
        self._stats.bytes_read += sum(e.nbytes for e in resident + hosted)
        # the ring
        self._order = [e.name for e in extents if self._tier[e.name] != "vram"]
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
        if self._tier[name] == "host":
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
            self._stats.bytes_from_host += extent.nbytes
        else:
            def read() -> None:
                if free is not None:
                    free.synchronize()
                self.reader.read([extent], [dest])
            ready = self._loader.submit(read)
            self._stats.bytes_from_storage += extent.nbytes
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
        self._stats.fetches += 1
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
        self._stats.io_wait_ns += time.perf_counter_ns() - began
        self._in_use = slot
        return extent_views(self._extents[name], self._slots[slot])

    def prefetch(self, extent_names: list[str]) -> None:
        """Streamed extents are requested in cyclic order by `fetch` itself; nothing else to do."""

    def tier(self, extent_name: str) -> str:
        return self._tier[extent_name]

    # -- CPU-computed layers ------------------------------------------------------------------------------------

    def cpu_candidates(self, eligible: Callable[[ExtentInfo], bool]) -> list[str]:
        """Host-tier layers, in order, that the forward pass can compute on the CPU (`eligible`)."""
        return [name for name in self._layer_names
                if self._tier[name] == "host" and eligible(self._extents[name])]

    def layer_tiers(self) -> list[str]:
        """Per decoder layer, in order: "vram" (resident) or "ring" (streamed from pinned RAM or storage)."""
        return ["vram" if self._tier[name] == "vram" else "ring" for name in self._layer_names]

    @property
    def ring_slots(self) -> int:
        return len(self._slots)

    def host_view(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors of a host-tier extent in pinned RAM (for packing it for the CPU)."""
        return extent_views(self._extents[name], self._host_buffers[name])

    def host_room(self) -> int:
        """Host budget left beside the pinned tier and the CPU copies."""
        pinned = sum(e.nbytes for name, e in self._extents.items() if self._tier[name] == "host")
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
        wrong = [name for name in names if self._tier.get(name) != "host"]
        if wrong:
            raise ValueError(f"only host-tier layers can be placed on the CPU, not {wrong}")
        if nbytes > self.host_room() + self.cpu_bytes:
            raise BackendUnavailableError(
                f"the CPU copies of {len(names)} layers ({nbytes / 2**30:.2f} GiB) do not fit the host budget "
                f"beside the pinned layers", "raise --host-cache or lower --cpu-layers")
        self.cpu_placed, self.cpu_bytes = list(names), nbytes
        self.copy_chunk_bytes = COPY_CHUNK_BYTES if names else 0

    def record_cpu_layer(self, nanoseconds: int) -> None:
        """Count one layer pass the CPU computed, and its time."""
        self._stats.cpu_layer_runs += 1
        self._stats.cpu_compute_ns += nanoseconds

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
        for name, tier in self._tier.items():
            where[tier].append(name)
        if self.cpu_placed:
            where["host"] = [name for name in where["host"] if name not in self.cpu_placed]
            where["cpu"] = list(self.cpu_placed)
        return where

    def stats(self) -> ResidencyStats:
        sizes = TierBytes()
        for name, tier in self._tier.items():
            setattr(sizes, tier, getattr(sizes, tier) + self._extents[name].nbytes)
        layer_set = set(self._layer_names)
        layers = {tier: sum(1 for n in names if n in layer_set) for tier, names in self.placement().items()}
        return msgspec.structs.replace(
            self._stats, tiers=sizes, layers=layers, ring_slots=len(self._slots),
            ring_bytes=sum(s.numel() for s in self._slots), vram_budget=self.vram_budget,
            host_budget=self.host_budget, cpu_bytes=self.cpu_bytes, cpu_active_layers=len(self._cpu_active))

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
