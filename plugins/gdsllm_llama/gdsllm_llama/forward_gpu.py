"""LlamaForwardGPU: the LLaMA forward pass on a CUDA GPU, built from the kernels in `gdsllm_kernels`.

Same config, tensor names, rope convention (HF half-split) and cache semantics as the CPU reference `forward.py`.
Decode (up to DECODE_BATCH sequences a step, more in groups): fused dequant + GEMV kernels straight from the GGML
blocks (`ops.MAX_BATCH` rows of x a launch), RoPE fused with the KV-cache write and split-K decode attention, each one
launch for all sequences; positions, lengths and cache addresses live in a device table, so when all layers are
resident a step of B sequences is the replay of one CUDA graph per B, whichever caches they use; otherwise each
GPU-computed layer is the replay of its own graph per B and buffer (ring slot) its weights sit in (eagerly, a
layer's ten launches cost ~0.5 ms of host time: beside CPU-computed layers that time is on the critical path).
Prefill: each weight is dequantized to fp16 into a reused scratch buffer and multiplied with cuBLAS; attention
through torch SDPA. Layers come from the tiered residency (VRAM, pinned host RAM, storage), which streams
non-resident ones while earlier layers compute.

The residual stream is fp32; activations fed to matrix products and the KV cache are fp16; logits are fp32.
"""

import math
import time
from collections import OrderedDict

import msgspec
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from gdsllm_core.api import (
    ContextOverflowError,
    LoadOptions,
    ModelEntry,
    Placement,
    UnsupportedQuantError,
    get_residency,
)
from gdsllm_kernels import ops
from gdsllm_llama.config import LlamaConfig
from gdsllm_llama.cpu_layers import CpuLayers

# cuDNN attention is left out: it builds an execution plan per new prompt length (a stall of about a second)
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
PREFILL_CHUNK = 512  # prompt tokens per pass through the layers (each streamed layer moves once per chunk)
DECODE_BATCH = 32  # sequences one decode step takes (the workspace's size); more are decoded in groups
ACTIVATION_MARGIN = 256 << 20  # cuBLAS workspace and allocator slack, reserved beside the KV cache
MAX_LAYER_GRAPHS = 1024  # per-layer decode graphs kept (least recently replayed dropped first)


class LlamaGpuCache:
    """KV cache of one sequence on the GPU: k, v fp16 [n_layers, max_tokens, n_kv_heads, head_dim], allocated
    once. Each step writes `length` and the caches' addresses into the forward's device table of sequences."""

    def __init__(self, config: LlamaConfig, max_tokens: int, device: torch.device):
        self.max_tokens = max_tokens
        self.length = 0
        shape = (config.n_layers, max_tokens, config.n_kv_heads, config.head_dim)
        self.k = torch.empty(shape, dtype=torch.float16, device=device)
        self.v = torch.empty(shape, dtype=torch.float16, device=device)

    def reserve(self, n_new: int) -> None:
        if self.length + n_new > self.max_tokens:
            raise ContextOverflowError(f"{self.length + n_new} tokens do not fit the sequence's cache of "
                                       f"{self.max_tokens}", "shorten the prompt or raise num_ctx")


def kv_bytes(config: LlamaConfig, tokens: int) -> int:
    return 2 * config.n_layers * tokens * config.n_kv_heads * config.head_dim * 2


class LlamaForwardGPU:
    """ForwardPass for architecture "llama" on CUDA. LoadOptions: vram_budget, host_cache, max_context; extra:
    `residency` (default "tiered"), `max_vram_layers`, `ring_slots`, `cuda_graphs` and `repack` (default True),
    `fast_gemv` (default False: Q4_0 partial sums in fp16, see kernels/gemv.cu)."""

    def __init__(self, entry: ModelEntry, options: LoadOptions | None = None):
        options = options or LoadOptions(device="cuda")
        self.entry = entry
        self.config = c = LlamaConfig.from_dict(entry.manifest.config)
        self.device = torch.device(options.device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.vocab_size = c.vocab_size
        self.max_context = min(c.context_length, options.max_context or c.context_length)
        self.use_graphs = bool(options.extra.get("cuda_graphs", True))
        self.fast_gemv = bool(options.extra.get("fast_gemv", False))
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}  # batch size -> captured decode step
        self._layer_graphs: OrderedDict[tuple[int, int, int], torch.cuda.CUDAGraph] = OrderedDict()  # (layer, B,
        # weights' address), least recently replayed first
        self._layers_seen: set[tuple[int, int, int]] = set()  # run once eagerly: captured when met again
        self._graph_pool = None
        self._capture_stream: torch.cuda.Stream | None = None
        self._qtypes = {t.name: t.qtype for e in entry.manifest.extents for t in e.tensors}
        self._check_types()
        self._head_name = "token_embd.weight" if c.tied_embeddings else "output.weight"
        self._head_extent = "token_embd" if c.tied_embeddings else "output"
        self._prefill_chunk = int(options.extra.get("prefill_chunk", PREFILL_CHUNK))
        residency_cls = get_residency(options.extra.get("residency", "tiered"))
        placement = Placement(device=str(self.device), vram_budget=options.vram_budget, host_cache=options.host_cache,
                              reserved_vram_bytes=self._reserved_bytes(),
                              max_vram_layers=options.extra.get("max_vram_layers"),
                              ring_slots=options.extra.get("ring_slots"), cpu_layers=options.extra.get("cpu_layers", 0))
        with torch.cuda.device(self.device):
            self.residency = residency_cls(entry, placement)
            self.cpu_layers = CpuLayers.attach(c, entry, self.residency)  # host-tier layers the CPU may compute
            self._allocate_workspace()
            self.repacked_bytes = self._repack_resident() if options.extra.get("repack", True) else 0
        self.last_step: dict = {}
        self._on_cpu: frozenset[int] = frozenset()  # layers the CPU computes in the current decode step

    # -- set-up -----------------------------------------------------------------------------------------------

    def _check_types(self) -> None:
        for name, qtype in self._qtypes.items():
            if name.endswith("_norm.weight"):
                continue
            if qtype not in ops.QTYPE_CODES:
                raise UnsupportedQuantError(f"tensor {name} is {qtype}, which has no GPU kernel",
                                            f"convert the model to one of {', '.join(ops.QTYPE_CODES)}")

    def _largest_matrix(self) -> int:
        c = self.config
        return max(c.ffn_dim * c.dim, c.n_heads * c.head_dim * c.dim)

    def _reserved_bytes(self) -> int:
        """VRAM the forward pass needs beside the weights: one sequence's KV cache for max_context, the fp16
        dequant scratch, the workspace and the prefill activations of one chunk."""
        c, chunk = self.config, self._prefill_chunk
        scratch = self._largest_matrix() * 2
        qkv = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim
        per_token = 4 * c.dim + 2 * c.dim + 6 * qkv + 2 * c.n_heads * c.head_dim + 3 * 2 * c.ffn_dim + 4 * c.vocab_size
        return kv_bytes(c, self.max_context) + scratch + chunk * per_token * 2 + ACTIVATION_MARGIN

    def _allocate_workspace(self) -> None:
        c, dev, B = self.config, self.device, DECODE_BATCH
        q_size, kv_size = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        self._scratch = torch.empty(self._largest_matrix(), dtype=torch.float16, device=dev)
        self._h = torch.empty(B, c.dim, dtype=torch.float32, device=dev)
        self._xn = torch.empty(B, c.dim, dtype=torch.float16, device=dev)
        self._q = torch.empty(B, q_size, dtype=torch.float32, device=dev)
        self._k = torch.empty(B, kv_size, dtype=torch.float32, device=dev)
        self._v = torch.empty(B, kv_size, dtype=torch.float32, device=dev)
        self._q16 = torch.empty(B, q_size, dtype=torch.float16, device=dev)
        self._attn = torch.empty(B, q_size, dtype=torch.float16, device=dev)
        self._act = torch.empty(B, c.ffn_dim, dtype=torch.float16, device=dev)
        self._logits = torch.empty(B, c.vocab_size, dtype=torch.float32, device=dev)
        self._tokens = torch.zeros(B, dtype=torch.int64, device=dev)
        self._slots = torch.zeros(B, ops.SEQ_SLOT_FIELDS, dtype=torch.int64, device=dev)  # see ops.seq_slots
        self._attn_scratch = ops.attention_scratch(c.n_heads, c.head_dim, dev, B)
        self._inv_freq = c.inv_freq().to(dev, torch.float32).contiguous()
        self._scale = 1.0 / math.sqrt(c.head_dim)
        self._norms: dict[str, torch.Tensor] = {}

    def _repack_resident(self) -> int:
        """Rewrite resident Q4_0/Q8_0 matrices into the GPU layout once (aligned 16-byte code loads in the
        kernels); streamed layers keep the GGUF layout. Returns the bytes repacked."""
        scratch = self._scratch.view(torch.uint8)
        done = 0
        for extent in self.entry.manifest.extents:
            if self.residency.tier(extent.name) != "vram":
                continue
            tensors = [t for t in extent.tensors if ops.can_repack(t.qtype, t.shape[-1])
                       and t.nbytes <= scratch.numel()]
            if not tensors:
                continue
            views = self.residency.fetch(extent.name)
            for t in tensors:
                self._qtypes[t.name] = ops.repack(views[t.name], t.qtype, t.shape[-1], scratch)
                done += t.nbytes
        return done

    # -- weights ----------------------------------------------------------------------------------------------

    def _norm(self, views: dict[str, torch.Tensor], name: str, cache: bool) -> torch.Tensor:
        """An fp32 norm weight (converted once for resident extents)."""
        found = self._norms.get(name)
        if found is not None:
            return found
        weight = views[name]
        if weight.dtype != torch.float32:
            weight = weight.float()
            if cache:
                self._norms[name] = weight
        return weight

    def _layer(self, i: int) -> tuple[dict[str, torch.Tensor], bool]:
        extent = f"blk.{i}"
        views = self.residency.fetch(extent)
        resident = self.residency.tier(extent) == "vram"
        return views, resident

    def _dequant(self, views: dict[str, torch.Tensor], name: str, cols: int) -> torch.Tensor:
        rows = views[name].shape[0]
        out = self._scratch[:rows * cols].view(rows, cols)
        return ops.dequantize(views[name], self._qtypes[name], cols, out=out)

    def _gemv_group(self, views, names: list[str], x: torch.Tensor, outs: list[torch.Tensor],
                    accumulate: bool = False, fast: bool | None = None) -> None:
        """One launch per run of same-typed matrices (q, k, v share one when their types agree) and group of
        `ops.MAX_BATCH` rows of x (ops.gemv splits larger batches; a run's groups follow each other, so its
        weights are read again from L2)."""
        fast = self.fast_gemv if fast is None else fast
        start = 0
        while start < len(names):
            end = start + 1
            while end < len(names) and self._qtypes[names[end]] == self._qtypes[names[start]]:
                end += 1
            ops.gemv([views[n] for n in names[start:end]], self._qtypes[names[start]], x, outs[start:end],
                     accumulate=accumulate, fast=fast)
            start = end

    def _gated_ffn(self, views, gate: str, up: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """out = fp16(silu(gate @ x) * (up @ x)) for rows x [B, dim]: fused when gate and up share a type."""
        if self._qtypes[gate] != self._qtypes[up]:
            g32 = torch.empty(x.shape[0], self.config.ffn_dim, dtype=torch.float32, device=self.device)
            u32 = torch.empty_like(g32)
            self._gemv_group(views, [gate, up], x, [g32, u32])
            out.copy_(F.silu(g32) * u32)
        else:
            ops.gemv_swiglu(views[gate], views[up], self._qtypes[gate], x, out, fast=self.fast_gemv)

    # -- decode ---------------------------------------------------------------------------------------------

    def _write_slots(self, caches: list[LlamaGpuCache], positions: list[int], lengths: list[int]) -> None:
        """Fill the device table of sequences the RoPE and attention kernels read (an ordinary pageable copy:
        the host buffer is consumed before the call returns, so nothing waits on the GPU)."""
        table = ops.seq_slots([c.k for c in caches], [c.v for c in caches], positions, lengths)
        self._slots[:len(caches)].copy_(table, non_blocking=True)

    def _decode_layer(self, i: int, w: dict[str, torch.Tensor], resident: bool, B: int) -> None:
        """Layer i of a decode step for B rows, its weights `w`: `_h` updated in place."""
        c, p = self.config, f"blk.{i}."
        h, xn, slots = self._h[:B], self._xn[:B], self._slots[:B]
        q, k, v, q16, attn, act = (self._q[:B], self._k[:B], self._v[:B], self._q16[:B], self._attn[:B],
                                   self._act[:B])
        ops.rmsnorm(h, self._norm(w, p + "attn_norm.weight", resident), c.rms_eps, out=xn)
        self._gemv_group(w, [p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"], xn, [q, k, v])
        ops.rope_store(q, k, v, slots, i, self._inv_freq, c.n_heads, c.n_kv_heads, c.head_dim, c.head_dim, True, q16)
        ops.attention_decode(q16.view(B, c.n_heads, c.head_dim), slots, i, c.n_kv_heads, self._scale,
                             attn.view(B, c.n_heads, c.head_dim), self._attn_scratch)
        self._gemv_group(w, [p + "attn_output.weight"], attn, [h], accumulate=True)
        ops.rmsnorm(h, self._norm(w, p + "ffn_norm.weight", resident), c.rms_eps, out=xn)
        self._gated_ffn(w, p + "ffn_gate.weight", p + "ffn_up.weight", xn, act)
        self._gemv_group(w, [p + "ffn_down.weight"], act, [h], accumulate=True)

    def _layer_graph(self, i: int, w: dict[str, torch.Tensor], resident: bool,
                     B: int) -> torch.cuda.CUDAGraph | None:
        """Layer i's decode for B rows as a graph over the buffer its weights `w` sit in (a ring slot holds other
        layers at other times: the graph is per layer and buffer). None the first time a (layer, B, buffer) is met
        (the caller runs it eagerly: kernels load outside the capture) and once a capture has failed."""
        key = (i, B, w[f"blk.{i}.attn_q.weight"].data_ptr())
        graph = self._layer_graphs.get(key)
        if graph is not None:
            self._layer_graphs.move_to_end(key)
            return graph
        if key not in self._layers_seen:
            self._layers_seen.add(key)
            return None
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        if self._capture_stream is None:
            self._capture_stream = torch.cuda.Stream(self.device)
        graph = torch.cuda.CUDAGraph()
        # Captured directly rather than under `torch.cuda.graph`, which synchronizes the device and empties the
        # allocator's caches first: a capture per layer and slot would stall the ring's copies each time.
        # thread_local: the ring's loader thread may allocate or copy meanwhile.
        try:
            with torch.cuda.stream(self._capture_stream):
                graph.capture_begin(pool=self._graph_pool, capture_error_mode="thread_local")
                try:
                    self._decode_layer(i, w, resident, B)
                finally:
                    graph.capture_end()
        except RuntimeError:  # a launch that cannot be captured here: eager from now on
            self.use_graphs = False
            self._layer_graphs.clear()
            return None
        self._layer_graphs[key] = graph
        if len(self._layer_graphs) > MAX_LAYER_GRAPHS:  # batch sizes and slots come and go: bound what is kept
            self._layer_graphs.popitem(last=False)
        return graph

    def _decode_layers(self, B: int) -> None:
        c = self.config
        h, xn = self._h[:B], self._xn[:B]
        layer_graphs = self.use_graphs and not self._all_resident()  # all resident: the whole step is one graph
        for i in range(c.n_layers):
            if i in self._on_cpu:
                self.cpu_layers.run_layer(i, h)
                continue
            w, resident = self._layer(i)
            graph = self._layer_graph(i, w, resident, B) if layer_graphs else None
            if graph is not None:
                graph.replay()
            else:
                self._decode_layer(i, w, resident, B)
        fixed = self.residency.fetch("output_norm")
        ops.rmsnorm(h, self._norm(fixed, "output_norm.weight", True), c.rms_eps, out=xn)
        self._gemv_group(self.residency.fetch(self._head_extent), [self._head_name], xn, [self._logits[:B]],
                         fast=False)

    def _embed(self, tokens: torch.Tensor, out: torch.Tensor) -> None:
        table = self.residency.fetch("token_embd")["token_embd.weight"]
        ops.dequantize(table, self._qtypes["token_embd.weight"], self.config.dim, out=out, rows=tokens,
                       dtype=torch.float32)

    def _decode_step(self, B: int) -> None:
        """One token of the B sequences whose tokens and table are in `_tokens` / `_slots`: logits in `_logits`."""
        self._embed(self._tokens[:B], self._h[:B])
        self._decode_layers(B)

    def _all_resident(self) -> bool:
        return all(self.residency.tier(e.name) == "vram" for e in self.entry.manifest.extents)

    def _graph_for(self, B: int) -> torch.cuda.CUDAGraph | None:
        """The captured step for B sequences (made on first use, after one eager step on the current inputs, which
        the replay then repeats), or None where graphs do not apply: some layers stream through the residency."""
        if not (self.use_graphs and self._all_resident()):
            return None
        graph = self._graphs.get(B)
        if graph is None:
            self._decode_step(B)  # warm-up: compiles and loads every kernel outside the capture
            torch.cuda.current_stream(self.device).synchronize()
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self._graph_pool):
                    self._decode_step(B)
            except RuntimeError:  # a launch that cannot be captured here: run eagerly from now on
                self.use_graphs = False
                return None
            self._graphs[B] = graph
        return graph

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, caches: list[LlamaGpuCache]) -> torch.Tensor:
        """One step for B sequences (tokens [B]); logits [B, V] fp32 on the GPU. Up to DECODE_BATCH (32)
        sequences share each layer's fetch and launches; more are decoded in groups of that many."""
        tokens = tokens.reshape(-1)
        if tokens.numel() != len(caches):
            raise ValueError(f"{tokens.numel()} tokens for {len(caches)} caches")
        if len(caches) > DECODE_BATCH:
            return torch.cat([self.decode(tokens[i:i + DECODE_BATCH], caches[i:i + DECODE_BATCH])
                              for i in range(0, len(caches), DECODE_BATCH)])
        began, counters = time.perf_counter(), self.residency.stats()
        B = len(caches)
        with torch.cuda.device(self.device):
            for cache in caches:
                cache.reserve(1)
            self._tokens[:B].copy_(tokens, non_blocking=True)
            self._write_slots(caches, [cache.length for cache in caches], [cache.length + 1 for cache in caches])
            self._on_cpu = self.cpu_layers.begin_step(caches, 1) if self.cpu_layers else frozenset()
            graph = self._graph_for(B)
            if graph is not None:
                graph.replay()
            else:
                self._decode_step(B)
            for cache in caches:
                cache.length += 1
            logits = self._logits[:B].clone()
        self._record_step(B, began, counters)
        return logits

    # -- prefill ----------------------------------------------------------------------------------------------

    def _project(self, w, name: str, x: torch.Tensor) -> torch.Tensor:
        """x [T, K] fp16 @ W^T -> fp16 [T, rows], through the dequant scratch and cuBLAS."""
        return torch.matmul(x, self._dequant(w, name, x.shape[1]).t())

    def _prefill_chunk_layers(self, h: torch.Tensor, cache: LlamaGpuCache, start: int) -> None:
        c = self.config
        T = h.shape[0]
        S = start + T
        q16 = torch.empty(T, c.n_heads * c.head_dim, dtype=torch.float16, device=self.device)
        self._write_slots([cache], [start], [S])
        slots = self._slots[:1]
        mask = None
        if start:
            mask = (torch.arange(S, device=self.device)[None, :]
                    <= torch.arange(start, S, device=self.device)[:, None])
        on_cpu = self.cpu_layers.begin_step([cache], T) if self.cpu_layers else frozenset()
        for i in range(c.n_layers):
            if i in on_cpu:
                self.cpu_layers.run_layer(i, h)
                continue
            w, resident = self._layer(i)
            p = f"blk.{i}."
            xn = ops.rmsnorm(h, self._norm(w, p + "attn_norm.weight", resident), c.rms_eps)
            q = self._project(w, p + "attn_q.weight", xn).float()
            k = self._project(w, p + "attn_k.weight", xn).float()
            v = self._project(w, p + "attn_v.weight", xn).float()
            ops.rope_store(q, k, v, slots, i, self._inv_freq, c.n_heads, c.n_kv_heads, c.head_dim, c.head_dim, True,
                           q16)
            qh = q16.view(T, c.n_heads, c.head_dim).transpose(0, 1).unsqueeze(0)  # [1, H, T, hd]
            kh = cache.k[i, :S].transpose(0, 1).unsqueeze(0).contiguous()  # [1, KV, S, hd]
            vh = cache.v[i, :S].transpose(0, 1).unsqueeze(0).contiguous()
            with sdpa_kernel(SDPA_BACKENDS):
                attn = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=mask is None,
                                                      enable_gqa=c.n_heads != c.n_kv_heads)
            attn = attn[0].transpose(0, 1).reshape(T, c.n_heads * c.head_dim)  # [T, H*hd]
            h += self._project(w, p + "attn_output.weight", attn)
            xn = ops.rmsnorm(h, self._norm(w, p + "ffn_norm.weight", resident), c.rms_eps)
            gate = self._project(w, p + "ffn_gate.weight", xn)
            up = self._project(w, p + "ffn_up.weight", xn)
            h += self._project(w, p + "ffn_down.weight", ops.swiglu(gate, up))

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits [T, V] of hidden rows h [T, D] fp32 (GEMV over the quantized head)."""
        c = self.config
        norm = self._norm(self.residency.fetch("output_norm"), "output_norm.weight", True)
        xn = ops.rmsnorm(h.contiguous(), norm, c.rms_eps)
        logits = torch.empty(h.shape[0], c.vocab_size, dtype=torch.float32, device=self.device)
        self._gemv_group(self.residency.fetch(self._head_extent), [self._head_name], xn, [logits], fast=False)
        return logits

    def _prefill_layers(self, tokens: torch.Tensor, cache: LlamaGpuCache, every_row: bool) -> torch.Tensor:
        """The residual stream after the last layer, fp32 [T, D] (or only its last row), chunk by chunk."""
        cache.reserve(tokens.numel())
        outputs = []
        for first in range(0, tokens.numel(), self._prefill_chunk):
            chunk = tokens[first:first + self._prefill_chunk]
            h = torch.empty(chunk.numel(), self.config.dim, dtype=torch.float32, device=self.device)
            self._embed(chunk, h)
            self._prefill_chunk_layers(h, cache, cache.length)
            cache.length += chunk.numel()
            outputs.append(h if every_row else h[-1:])
        return torch.cat(outputs) if every_row else outputs[-1]

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, cache: LlamaGpuCache, all_logits: bool = False) -> torch.Tensor:
        tokens = tokens.reshape(-1).to(self.device, torch.int64)
        began, counters = time.perf_counter(), self.residency.stats()
        with torch.cuda.device(self.device):
            logits = self._head(self._prefill_layers(tokens, cache, all_logits))
        self._record_step(tokens.numel(), began, counters)
        return logits if all_logits else logits[0]

    @torch.inference_mode()
    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """Prefill's layers over a fresh cache, then the final RMSNorm in fp32 (the head gets an fp16 copy)."""
        tokens = tokens.reshape(-1).to(self.device, torch.int64)
        with torch.cuda.device(self.device):
            hidden = self._prefill_layers(tokens, self.new_cache(tokens.numel()), True)
            norm = self._norm(self.residency.fetch("output_norm"), "output_norm.weight", True)
            return norm * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.config.rms_eps))

    # -- protocol ---------------------------------------------------------------------------------------------

    def new_cache(self, max_tokens: int) -> LlamaGpuCache:
        return LlamaGpuCache(self.config, min(max_tokens, self.max_context), self.device)

    def reuse_cache(self, cache: LlamaGpuCache, keep: int, max_tokens: int) -> LlamaGpuCache:
        """The first `keep` positions stay; a cache too small for `max_tokens` is copied into a larger one."""
        keep = min(keep, cache.length)
        max_tokens = min(max_tokens, self.max_context)
        if max_tokens > cache.max_tokens:
            grown = self.new_cache(max_tokens)
            grown.k[:, :keep] = cache.k[:, :keep]
            grown.v[:, :keep] = cache.v[:, :keep]
            cache = grown
        cache.length = keep
        return cache

    def _record_step(self, tokens: int, began: float, before) -> None:
        after = self.residency.stats()
        self.last_step = {
            "tokens": tokens, "host_seconds": time.perf_counter() - began,
            "io_wait_s": (after.io_wait_ns - before.io_wait_ns) / 1e9,
            "bytes_from_host": after.bytes_from_host - before.bytes_from_host,
            "bytes_from_storage": after.bytes_from_storage - before.bytes_from_storage,
        }

    def stats(self) -> dict:
        return {**msgspec.to_builtins(self.residency.stats()), "last_step": self.last_step, "cuda_graphs": self.use_graphs,
                "cuda_graph_batches": sorted(self._graphs), "cuda_graph_layers": len(self._layer_graphs),
                "cpu_layers": self.cpu_layers.stats() if self.cpu_layers else None,
                "repacked_bytes": self.repacked_bytes, "vram_allocated": torch.cuda.memory_allocated(self.device)}

    def close(self) -> None:
        if self.cpu_layers:
            self.cpu_layers.close()
        self.residency.close()
        self._norms.clear()
        self._graphs.clear()
        self._layer_graphs.clear()


def make_forward(entry: ModelEntry, options: LoadOptions | None = None):
    """The LLaMA forward pass for `options.device`: this GPU version on CUDA, the CPU reference otherwise."""
    options = options or LoadOptions()
    if torch.device(options.device).type == "cuda":
        return LlamaForwardGPU(entry, options)
    from gdsllm_llama.forward import LlamaForward

    return LlamaForward(entry, options)
