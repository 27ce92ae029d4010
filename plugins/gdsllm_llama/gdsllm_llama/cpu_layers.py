"""CPU-computed layers for the GPU forward pass: with layers streamed from pinned RAM, decode is PCIe bound, so
some host-tier layers are computed on the CPU cores (as llama.cpp does with the layers it does not offload) while
the copy stream carries the others to the GPU: PCIe never idles and fewer bytes cross it.

Weights: Q4_0 and Q4_1 matrices are repacked once for torch's CPU int4 kernel
(`aten._weight_int4pack_mm_for_cpu`, group 32, w = (q - 8) * scale + zero: exactly Q4_0's d * (q - 8) with zero
0, and Q4_1's d * q + m with zero = m + 8d). The kernel is fast with bf16 activations and scales only, so the four
matrix products take bf16 inputs (scales rounded to bf16) and give bf16 results; norms, rope, attention, SwiGLU
and the residual stay fp32, through the CPU reference's own `layer_forward`. Layers holding other types stay
streamed (dequantizing them to bf16 would move more bytes than PCIe does).

KV: each sequence gets a CPU cache (the reference's `LlamaCache`) for the CPU-placed layers. A layer's keys and
values are kept where it is computed; when a step computes it on the other side (prefill and large batches run
every layer on the GPU), the rows that side lacks are copied over first (`begin_step`).

Batch: CPU time grows with the rows of a step while a PCIe copy does not, so the CPU time per layer is measured at
load for 1..16 rows and each step takes the CPU layers that make its simulated time shortest
(`runtime.cpu_plan.plan_cpu_layers`): fewer as the batch grows, none for prefill; the GGUF bytes of CPU-placed layers
stay pinned for that (both copies count against the host budget)."""

import dataclasses
import statistics
import time
import weakref
from dataclasses import dataclass

import torch

from gdsllm_core.api import COPY_CHUNK_BYTES, ExtentInfo, plan_cpu_layers, simulate_cpu_plan, spread
from gdsllm_llama.config import LlamaConfig
from gdsllm_llama.forward import LlamaCache, layer_forward, rope_tables

BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20}  # the GGML types the CPU int4 kernel represents exactly (bar bf16 scales)
GROUP = 32
ROW_MULTIPLE = 16  # the kernel's packing wants output rows in multiples of 16 (padded with zero weights)
MAX_CPU_ROWS = 16  # rows (sequences x new tokens) a step may give the CPU layers; larger steps stream them all
MEASURE_ROWS = (1, 2, 4, 8, 16)
MEASURE_CONTEXT = 128  # cached positions behind each row when timing a CPU layer
# Per CPU layer and step, beyond its compute and the DMA wait the simulation models: h's round trip, the sync.
# Decode times of a 7B with 0..16 CPU layers on the H100 machine (2026-11-25) fit `simulate_step_seconds` with
# 0-0.1 ms here once the wait for the copy operation in progress is modelled.
LAYER_OVERHEAD_S = 0.1e-3
# GPU decode speed through a layer's bytes, for the compute-chain estimate: a streamed 7B Q4_0 layer (114 MB) costs
# the chain 0.25-0.35 ms on the H100 (2026-11-25), mostly its fetch issuing the ring's copies, then one graph
# replay (eagerly, 0.35-0.5 ms of launches), not the 0.08 ms its bytes need.
GPU_LAYER_GBPS = 400.0
REPLAN_DRIFT = 0.15  # re-plan a step size's CPU layers when a speed it used has moved by more than this
REPLAN_GAIN = 0.03  # and take the new plan only if it simulates this much faster than the one in use
# Layers packed for the CPU at load are the most a step can compute there: as many as the plan would take with
# the CPU this much faster than measured at load (one short measurement; decoding then measures it in use).
PLACE_CPU_SPEEDUP = 1.3
MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def q4_codes(raw: torch.Tensor, qtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes uint8 [rows, cols] (0..15), scales and zeros fp32 [rows, cols / 32] of Q4_0 / Q4_1 blocks raw uint8
    [rows, row_bytes], such that the weights are (code - 8) * scale + zero."""
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, BLOCK_BYTES[qtype])
    d = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1).float()
    qs = blocks[..., BLOCK_BYTES[qtype] - 16:]
    codes = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(rows, -1)  # element j: low nibble j, j + 16: high
    if qtype == "Q4_0":
        return codes, d, torch.zeros_like(d)
    m = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float()
    return codes, d, m + 8 * d


@dataclass
class PackedMatrix:
    """One matrix [out_features, in_features] (or several stacked along the outputs) for the CPU int4 kernel;
    `x @ matrix` gives x [M, in] fp32 times its transpose, fp32 [M, out] (bf16 products)."""

    packed: torch.Tensor  # uint8, the kernel's layout
    scales_and_zeros: torch.Tensor  # bf16 [in / 32, padded out, 2]
    out_features: int

    @classmethod
    def from_blocks(cls, parts: list[tuple[torch.Tensor, str]]) -> "PackedMatrix":
        """From GGML blocks (raw uint8 [rows, row_bytes], qtype) stacked in order along the output rows."""
        decoded = [q4_codes(raw, qtype) for raw, qtype in parts]
        codes = torch.cat([c for c, _, _ in decoded])
        scales = torch.cat([s for _, s, _ in decoded])
        zeros = torch.cat([z for _, _, z in decoded])
        rows = codes.shape[0]
        pad = -rows % ROW_MULTIPLE
        if pad:  # zero weights: code 8, scale 0, zero 0
            codes = torch.cat([codes, torch.full((pad, codes.shape[1]), 8, dtype=torch.uint8)])
            scales = torch.cat([scales, scales.new_zeros(pad, scales.shape[1])])
            zeros = torch.cat([zeros, zeros.new_zeros(pad, zeros.shape[1])])
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        scales_and_zeros = torch.stack([scales.T, zeros.T], dim=-1).to(torch.bfloat16).contiguous()
        return cls(packed, scales_and_zeros, rows)

    def __rmatmul__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16).contiguous(), self.packed, GROUP,
                                                         self.scales_and_zeros)
        return out[:, :self.out_features].float()

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + self.scales_and_zeros.numel() * 2

    @staticmethod
    def packed_nbytes(rows: int, cols: int) -> int:
        padded = rows + (-rows % ROW_MULTIPLE)
        return padded * cols // 2 + padded * (cols // GROUP) * 4


@dataclass
class PackedLayer:
    """One decoder layer for the CPU, shaped like the reference's `LayerWeights` (so `layer_forward` runs it)."""

    attn_norm: torch.Tensor  # fp32 [D]
    qkv: PackedMatrix
    attn_output: PackedMatrix
    ffn_norm: torch.Tensor
    gate_up: PackedMatrix
    ffn_down: PackedMatrix

    @classmethod
    def from_views(cls, extent: ExtentInfo, views: dict[str, torch.Tensor]) -> "PackedLayer":
        qtypes = {t.name.split(".")[2]: t.qtype for t in extent.tensors}
        raw = {t.name.split(".")[2]: views[t.name] for t in extent.tensors}

        def pack(*names: str) -> PackedMatrix:
            return PackedMatrix.from_blocks([(raw[n], qtypes[n]) for n in names])

        def norm(name: str) -> torch.Tensor:  # a plain-typed view (F32, F16, BF16) copied out of pinned RAM
            return raw[name].float().reshape(-1).clone()

        return cls(attn_norm=norm("attn_norm"), qkv=pack("attn_q", "attn_k", "attn_v"),
                   attn_output=pack("attn_output"), ffn_norm=norm("ffn_norm"), gate_up=pack("ffn_gate", "ffn_up"),
                   ffn_down=pack("ffn_down"))

    @property
    def nbytes(self) -> int:
        return (self.attn_norm.numel() * 4 + self.ffn_norm.numel() * 4
                + sum(m.nbytes for m in (self.qkv, self.attn_output, self.gate_up, self.ffn_down)))


def can_run_on_cpu(extent: ExtentInfo) -> bool:
    """Whether every matrix of a decoder layer is a type the CPU int4 kernel represents (Q4_0, Q4_1)."""
    kinds = {t.name.split(".")[2]: t for t in extent.tensors}
    norms_plain = all(kinds.get(name) is not None and kinds[name].qtype in ("F32", "F16", "BF16")
                      for name in ("attn_norm", "ffn_norm"))
    return norms_plain and all(name in kinds and kinds[name].qtype in BLOCK_BYTES for name in MATRICES)


def packed_layer_nbytes(extent: ExtentInfo) -> int:
    """Host bytes a layer takes once packed for the CPU (norms included)."""
    kinds = {t.name.split(".")[2]: t for t in extent.tensors}
    cols = kinds["attn_q"].shape[-1]
    qkv = sum(kinds[n].shape[0] for n in ("attn_q", "attn_k", "attn_v"))
    gate_up = kinds["ffn_gate"].shape[0] + kinds["ffn_up"].shape[0]
    return (PackedMatrix.packed_nbytes(qkv, cols) + PackedMatrix.packed_nbytes(kinds["attn_output"].shape[0],
                                                                               kinds["attn_output"].shape[1])
            + PackedMatrix.packed_nbytes(gate_up, cols)
            + PackedMatrix.packed_nbytes(kinds["ffn_down"].shape[0], kinds["ffn_down"].shape[1]) + 8 * cols)


def measure_layer_seconds(config: LlamaConfig, layer: PackedLayer, rows: tuple[int, ...] = MEASURE_ROWS,
                          context: int = MEASURE_CONTEXT, reps: int = 5) -> dict[int, float]:
    """CPU seconds of one decode step of `layer` for each row count (rows sequences, `context` cached positions
    each): median of `reps` after a warm-up."""
    one = dataclasses.replace(config, n_layers=1)
    inv_freq = config.inv_freq()
    seconds = {}
    with torch.inference_mode():
        for n in rows:
            caches = [LlamaCache(one, context + 1) for _ in range(n)]
            for cache in caches:
                cache.k.normal_()
                cache.v.normal_()
                cache.length = context
            x = torch.randn(n, config.dim)
            cos, sin = rope_tables(inv_freq, torch.full((n,), context))
            times = []
            for _ in range(reps + 1):
                began = time.perf_counter()
                layer_forward(config, layer, x, cos, sin, 0, caches, [1] * n)
                times.append(time.perf_counter() - began)
            seconds[n] = statistics.median(times[1:])
    return seconds


class _SequenceKv:
    """The CPU side of one sequence's KV for the CPU-placed layers (made when the CPU first computes for it), and
    how many positions each side holds per layer."""

    def __init__(self, config: LlamaConfig, n_layers: int, max_tokens: int, on_gpu: int):
        self.cache = LlamaCache(dataclasses.replace(config, n_layers=n_layers), max_tokens)
        self.on_cpu = [0] * n_layers  # positions valid in the CPU cache, per CPU-placed layer
        self.on_gpu = [on_gpu] * n_layers  # positions valid in the GPU cache

    def ensure(self, positions: int) -> None:
        """Room for `positions` positions (the cache grows by doubling; the valid rows are kept)."""
        self.cache.length = min(max(self.on_cpu), self.cache.k.shape[2])
        self.cache.reserve(positions - self.cache.length)


class CpuLayers:
    """The CPU-placed layers of one `LlamaForwardGPU`: packed weights, CPU KV per sequence, and the per-step plan.
    Build with `attach`; per step: `begin_step(caches, n_new)` (which layers the CPU computes), then
    `run_layer(i, h)` for each of them in place of the GPU layer.

    With auto placement the count per step size is re-planned from what decoding measures (the CPU's seconds
    per layer, the copy stream's GB/s, both under each other's load on host memory) once they drift from the
    figures the plan used; `fixed_count` (set for a requested count) skips that."""

    def __init__(self, config: LlamaConfig, residency, layers: dict[int, PackedLayer], seconds: dict[int, float],
                 copy_s: float, gpu_s: float, layer_bytes: int, fixed_count: int | None = None):
        self.config = config
        self.fixed_count = fixed_count
        self.residency = residency
        self.layers = layers
        self.order = sorted(layers)  # slot of layer i in the CPU caches: its index here
        self._slot = {layer: slot for slot, layer in enumerate(self.order)}
        self.seconds = seconds  # measured at load, per row count, CPU alone
        self.seconds_in_use: dict[int, float] = {}  # measured while decoding (running average), per row count
        self.copy_s, self.gpu_s = copy_s, gpu_s
        self.layer_bytes = layer_bytes  # GGUF bytes of one layer: what a copy moves
        self.tiers = residency.layer_tiers()  # "vram" / "ring" per layer, for the step simulation
        self.slots = residency.ring_slots
        self.inv_freq = config.inv_freq()
        self._kv: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # GPU cache -> _SequenceKv
        self._staging = torch.empty(MAX_CPU_ROWS, config.dim, dtype=torch.float32,
                                    pin_memory=torch.cuda.is_available())
        self._plans: dict[int, tuple[frozenset[int], float, float]] = {}  # rows -> layers, cpu_s and copy_s used
        self._step: tuple[list, int, int, torch.Tensor, torch.Tensor] | None = None  # caches, n_new, bucket, cos, sin

    @classmethod
    def attach(cls, config: LlamaConfig, entry, residency) -> "CpuLayers | None":
        """Place layers on the CPU as `residency.cpu_request` says ("auto": measured balance; a count; 0: none)
        and pack them; None when there are none."""
        request = residency.cpu_request
        if not request or not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            return None
        candidates = residency.cpu_candidates(can_run_on_cpu)
        if not candidates:
            return None
        extents = {e.name: e for e in entry.manifest.extents}
        per_layer = max(packed_layer_nbytes(extents[name]) for name in candidates)
        limit = min(len(candidates), max(0, residency.host_room()) // per_layer)
        if limit == 0:
            return None
        first = candidates[0]
        probe = PackedLayer.from_views(extents[first], residency.host_view(first))
        seconds = measure_layer_seconds(config, probe)
        copy_s = residency.copy_seconds(first)
        gpu_s = extents[first].nbytes / (GPU_LAYER_GBPS * 1e9)
        if request == "auto":  # ring copies will go in COPY_CHUNK_BYTES pieces once layers are placed
            indices = plan_cpu_layers(residency.layer_tiers(), [int(name.split(".")[1]) for name in candidates],
                                      copy_s, seconds[1] / PLACE_CPU_SPEEDUP + LAYER_OVERHEAD_S, gpu_s,
                                      residency.ring_slots, limit,
                                      dma_wait_s=copy_s * min(1.0, COPY_CHUNK_BYTES / extents[first].nbytes))
            names = [f"blk.{i}" for i in indices]
        else:
            names = spread(candidates, min(int(request), limit))
        if not names:
            return None
        layers = {int(name.split(".")[1]): (probe if name == first else
                                            PackedLayer.from_views(extents[name], residency.host_view(name)))
                  for name in names}
        residency.place_on_cpu(names, sum(layer.nbytes for layer in layers.values()))
        return cls(config, residency, layers, seconds, copy_s, gpu_s, extents[first].nbytes,
                   fixed_count=None if request == "auto" else len(names))

    # -- per step -------------------------------------------------------------------------------------------------

    def _bucket(self, rows: int) -> int | None:
        """The smallest measured row count covering `rows` (None above them all or above MAX_CPU_ROWS)."""
        return next((n for n in sorted(self.seconds) if n >= rows), None) if rows <= MAX_CPU_ROWS else None

    def _estimates(self, bucket: int) -> tuple[float, float]:
        """(CPU seconds per layer, copy seconds per layer): measured while decoding where available."""
        cpu_s = self.seconds_in_use.get(bucket, self.seconds[bucket]) + LAYER_OVERHEAD_S
        gbps = self.residency.recent_copy_gbps()
        copy_s = self.layer_bytes / (gbps * 1e9) if gbps else self.copy_s
        return cpu_s, copy_s

    def _dma_wait_s(self, copy_s: float) -> float:
        """How long h's copy to the host may wait for a ring copy operation in progress (one chunk of it)."""
        chunk = self.residency.copy_chunk_bytes
        return copy_s * min(1.0, chunk / self.layer_bytes) if chunk and self.layer_bytes else copy_s

    def plan(self, rows: int) -> frozenset[int]:
        """The CPU-placed layers the CPU computes in a step of `rows` rows: all of a fixed count, or those making
        the simulated step shortest (`plan_cpu_layers`, re-planned when a speed drifts by more than REPLAN_DRIFT,
        and changed only for a plan REPLAN_GAIN faster: each change drains the ring and moves layers to other
        slots, whose graphs are then captured anew); none above MAX_CPU_ROWS."""
        bucket = self._bucket(rows)
        if bucket is None:
            return frozenset()
        if self.fixed_count is not None:
            return frozenset(spread(self.order, self.fixed_count))
        cpu_s, copy_s = self._estimates(bucket)
        found = self._plans.get(rows)
        if found is not None and max(abs(cpu_s / found[1] - 1), abs(copy_s / found[2] - 1)) <= REPLAN_DRIFT:
            return found[0]
        dma_wait_s = self._dma_wait_s(copy_s)
        chosen = frozenset(plan_cpu_layers(self.tiers, self.order, copy_s, cpu_s, self.gpu_s, self.slots,
                                           dma_wait_s=dma_wait_s))
        if found is not None and chosen != found[0]:
            def seconds(layers: frozenset[int]) -> float:
                return simulate_cpu_plan(self.tiers, layers, copy_s, cpu_s, self.gpu_s, self.slots, dma_wait_s)
            if seconds(chosen) > seconds(found[0]) * (1 - REPLAN_GAIN):
                chosen = found[0]
        self._plans[rows] = (chosen, cpu_s, copy_s)
        return chosen

    def begin_step(self, caches: list, n_new: int) -> frozenset[int]:
        """Before a step adding `n_new` positions to each of `caches` (GPU caches, `length` positions held): pick
        the layers the CPU computes, point the residency's ring past them, and bring each CPU-placed layer's
        keys/values up to date on the side that computes it this step."""
        rows = len(caches) * n_new
        self.residency.recent_copy_gbps()  # collect the copy timings of the last step
        active = self.plan(rows)
        self.residency.set_cpu_active(frozenset(f"blk.{i}" for i in active))
        for cache in caches:
            kv = self._kv.get(cache)
            if kv is None:
                if not active:
                    continue  # the GPU holds every position; the CPU side is made when the CPU first computes
                kv = self._kv[cache] = _SequenceKv(self.config, len(self.order), cache.max_tokens, cache.length)
            if active:
                kv.ensure(cache.length + n_new)
            for slot, layer in enumerate(self.order):
                # positions past `length` (a step that failed, a cache cut back) are rewritten now, not valid
                kv.on_cpu[slot], kv.on_gpu[slot] = min(kv.on_cpu[slot], cache.length), min(kv.on_gpu[slot], cache.length)
                if layer in active:
                    if kv.on_cpu[slot] < cache.length:
                        self._to_cpu(cache, kv, slot, layer, kv.on_cpu[slot], cache.length)
                    kv.on_cpu[slot] = cache.length + n_new
                else:
                    if kv.on_gpu[slot] < cache.length:
                        self._to_gpu(cache, kv, slot, layer, kv.on_gpu[slot], cache.length)
                    kv.on_gpu[slot] = cache.length + n_new
        if active:
            positions = torch.cat([torch.arange(cache.length, cache.length + n_new) for cache in caches])
            self._step = (list(caches), n_new, self._bucket(rows), *rope_tables(self.inv_freq, positions))
        return active

    def _to_cpu(self, cache, kv: _SequenceKv, slot: int, layer: int, start: int, end: int) -> None:
        """GPU cache rows [start, end) of `layer` ([tokens, KV, hd] fp16) into the CPU cache ([KV, tokens, hd])."""
        kv.cache.k[slot, :, start:end] = cache.k[layer, start:end].transpose(0, 1).float().cpu()
        kv.cache.v[slot, :, start:end] = cache.v[layer, start:end].transpose(0, 1).float().cpu()

    def _to_gpu(self, cache, kv: _SequenceKv, slot: int, layer: int, start: int, end: int) -> None:
        device = cache.k.device
        cache.k[layer, start:end] = kv.cache.k[slot, :, start:end].transpose(0, 1).to(device, cache.k.dtype)
        cache.v[layer, start:end] = kv.cache.v[slot, :, start:end].transpose(0, 1).to(device, cache.v.dtype)

    @torch.inference_mode()
    def run_layer(self, layer: int, h: torch.Tensor) -> None:
        """Layer `layer` on the CPU for the step `begin_step` began: h [sequences * n_new, D] fp32 on the GPU (rows
        grouped by sequence) goes to the host, through the layer, and back in place (queued on the current
        stream)."""
        caches, n_new, bucket, cos, sin = self._step
        staging = self._staging[:h.shape[0]]
        staging.copy_(h)  # waits for the GPU work before it (the copy stream goes on)
        began = time.perf_counter_ns()
        kvs = [self._kv[cache].cache for cache in caches]
        for kv, cache in zip(kvs, caches, strict=True):
            kv.length = cache.length
        out = layer_forward(self.config, self.layers[layer], staging, cos, sin, self._slot[layer], kvs,
                            [n_new] * len(caches))
        staging.copy_(out)
        h.copy_(staging, non_blocking=True)
        spent = time.perf_counter_ns() - began
        previous = self.seconds_in_use.get(bucket)
        self.seconds_in_use[bucket] = spent / 1e9 if previous is None else 0.8 * previous + 0.2 * spent / 1e9
        self.residency.record_cpu_layer(spent)

    def stats(self) -> dict:
        return {"layers": self.order, "packed_bytes": sum(layer.nbytes for layer in self.layers.values()),
                "seconds_per_layer": self.seconds, "seconds_per_layer_decoding": dict(self.seconds_in_use),
                "copy_seconds_per_layer": self.copy_s, "copy_gbps_decoding": self.residency.recent_copy_gbps(),
                "fixed_count": self.fixed_count,
                "plans": {rows: len(plan[0]) for rows, plan in sorted(self._plans.items())}}

    def close(self) -> None:
        self._step = None
        self.layers.clear()
        self._kv = weakref.WeakKeyDictionary()
