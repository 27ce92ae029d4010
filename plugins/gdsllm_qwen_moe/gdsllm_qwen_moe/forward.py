"""QwenMoeForward: the torch forward pass of Qwen3.5-MoE. Plain torch ops: the reference on the CPU; on a CUDA
device the same ops run there (the affine matrices through the kernels of `gdsllm_kernels.affine_ops`, see `weights.linear`).

Residency: the dense extents (embeddings, each layer's attention / router / shared expert / norms, output) are read
once, in one batched `ExtentReader` read, and stay resident on the compute device. Experts are never loaded up
front: core's expert residency (`experts.expert_residency`) reads the ones the router picks, per layer and step,
keeps them in host RAM under `LoadOptions.host_cache` bytes and hands them to the device when used. (The core's
`TieredResidency` reads every extent resident, so this plugin drives `ExtentReader` itself.)

`LoadOptions.extra`: "dtype" (activations: "float32", the default, or "bfloat16"), "dequantize_dense" (dequantize
the resident affine matrices once at load instead of at each use: default on CUDA), "prefill_chunk" (prompt tokens
per pass, default 512), "cuda_graphs" (default on: each layer's dense part replayed as a CUDA graph in decode, see
`decode_graphs`), "expert_prefetch" (read ahead the next layer's likely experts, see `_predict_next`: default on
CUDA, off on the CPU), "expert_prefetch_limit" (at most this many experts read ahead per layer, the likeliest
first; default PREFETCH_LIMIT: the host RAM held beyond the cache budget is at most this many experts per layer in
flight), "expert_read_threads" / "expert_read_chunk" (reader threads and piece size in bytes: a layer's experts are
spread over all threads), "expert_vram_bytes" (the VRAM expert tier's budget; default on CUDA:
`LoadOptions.vram_budget` less what the dense part took and VRAM_RESERVE, or without a budget the free VRAM after
loading less VRAM_RESERVE; 0 on the CPU)."""

from dataclasses import dataclass, field
from functools import partial

import msgspec
import torch

from gdsllm_core.api import BadRequestError, ContextOverflowError, ExtentReader, LoadOptions, ModelEntry, extent_views
from gdsllm_qwen_moe.attention import KVCache, gated_attention, rms_norm
from gdsllm_qwen_moe.config import QwenMoeConfig
from gdsllm_qwen_moe.decode_graphs import DecodeGraphs, DenseStep
from gdsllm_qwen_moe.experts import expert_residency, moe_block, predict_experts, predicted
from gdsllm_qwen_moe.linear_attn import gated_deltanet
from gdsllm_qwen_moe.weights import QuantizedWeight, Weight, dense, embedding_rows, group_weights, linear

DEFAULT_HOST_CACHE = 4 << 30  # bytes of experts kept in host RAM when LoadOptions.host_cache is None
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # LoadOptions.extra["dtype"]
PREFILL_CHUNK = 512  # prompt tokens per pass: experts are read once per chunk (the union of its routes)
# A layer's ~10 experts in 512 KiB pieces over 12 threads: the disk stays busy to the last piece (with the storage
# layer's 8 x 16 MiB, 10 whole-expert reads left 2 reading alone at the end), and the queue drains quickly at the
# layer's end. H100 machine, cold decode, settings interleaved step by step between shared ceiling probes (`bench
# --read-configs`), mean ratio to the paired I/O floor over 43-85 steps each, three device calls:
# 16x0.5 1.098 / 1.137 / 1.147; 12x0.5 1.086 / 1.059; 8x0.5 1.118; 10x0.5 1.120; 24x0.5 1.138; 32x1 1.176;
# 64x0.5 1.214; 8x1 1.103; 12x1 1.120. (Earlier runs: 16x0.25 1.43-1.48, 8x16 1.23-1.52.)
EXPERT_READ_THREADS = 12
EXPERT_READ_CHUNK = 512 << 10
# Read ahead only the single likeliest expert of the next layer: it is queued behind this layer's own reads, so it
# fills the disk's idle time at the layer's end (the queue draining, the next layer's dense part) and little more.
# H100 machine, cold decode of the synthetic 397B-shaped model (random routers), paired probes, three runs each:
# off 1.169/1.237/1.212, 1 expert 1.082/1.173/1.141, 2 experts 1.106/1.241/1.211; every predicted expert (up to
# 10) read ahead: 0.83-0.94x as fast as off.
PREFETCH_LIMIT = 1
VRAM_RESERVE = 4 << 30  # VRAM left beside the expert tier for caches, activations and the allocator


@dataclass
class QwenMoeCache:
    """One sequence's state: KV for full-attention layers, conv + recurrent state for linear ones."""

    max_tokens: int
    length: int = 0
    kv: dict[int, KVCache] = field(default_factory=dict)
    conv: dict[int, torch.Tensor] = field(default_factory=dict)  # [conv_dim, kernel-1]
    recurrent: dict[int, torch.Tensor] = field(default_factory=dict)  # [Hv, Dk, Dv] fp32


class QwenMoeForward:
    """`ForwardPass` for architecture "qwen3_5_moe"."""

    def __init__(self, entry: ModelEntry, options: LoadOptions):
        self.entry = entry
        self.config = QwenMoeConfig.from_dict(entry.manifest.config)
        self.device = torch.device("cpu" if options.device in ("auto", "") else options.device)
        dtype_name = options.extra.get("dtype", "float32")
        if dtype_name not in COMPUTE_DTYPES:
            raise BadRequestError(f"compute dtype {dtype_name!r} is not supported", "use float32 or bfloat16")
        self.dtype = COMPUTE_DTYPES[dtype_name]
        self.prefetch = bool(options.extra.get("expert_prefetch", self.device.type == "cuda"))
        self.prefetch_limit = int(options.extra.get("expert_prefetch_limit", PREFETCH_LIMIT))
        if self.prefetch_limit < 1:
            raise BadRequestError(f"expert_prefetch_limit {self.prefetch_limit} must be at least 1",
                                  "give a positive number of experts, or turn expert_prefetch off")
        self.vocab_size = self.config.vocab_size
        self.max_context = min(options.max_context or self.config.max_position_embeddings,
                               self.config.max_position_embeddings)
        self.reader = ExtentReader(entry.path, entry.manifest,
                                   threads=int(options.extra.get("expert_read_threads", EXPERT_READ_THREADS)),
                                   chunk_bytes=int(options.extra.get("expert_read_chunk", EXPERT_READ_CHUNK)))
        dense_extents = [e for e in entry.manifest.extents if ".expert." not in e.name]
        direct = self.device.type == "cuda" and self.reader.backend.name != "cpu"  # cuFile / staged into VRAM
        arena = torch.empty(sum(e.nbytes for e in dense_extents), dtype=torch.uint8, device=self.device if direct else "cpu")
        offsets = [0]
        for extent in dense_extents:
            offsets.append(offsets[-1] + extent.nbytes)
        self.reader.read(dense_extents, [arena[offsets[i]:offsets[i + 1]] for i in range(len(dense_extents))])
        self.dense_bytes = arena.numel()
        arena = arena.to(self.device)  # the dense part stays resident on the compute device
        self.weights: dict[str, Weight] = {}
        for i, extent in enumerate(dense_extents):
            self.weights.update(group_weights(extent, extent_views(extent, arena[offsets[i]:offsets[i + 1]])))
        if options.extra.get("dequantize_dense", self.device.type == "cuda"):  # trade memory for speed once
            self.weights = {name: dense(w, self.dtype) if isinstance(w, QuantizedWeight) and name != "token_embd.weight"
                            else w for name, w in self.weights.items()}
        budget = DEFAULT_HOST_CACHE if options.host_cache is None else options.host_cache
        self.experts = expert_residency(self.reader, entry.manifest, budget, self.device,
                                        self._vram_tier_bytes(options))
        self.prefill_chunk = int(options.extra.get("prefill_chunk", PREFILL_CHUNK))
        self.graphs = (DecodeGraphs(self.config, self.weights, self.prefetch_limit if self.prefetch else 0)
                       if self.device.type == "cuda" and options.extra.get("cuda_graphs", True) else None)
        self.tokens_processed = 0

    def _vram_tier_bytes(self, options: LoadOptions) -> int:
        if "expert_vram_bytes" in options.extra:
            return int(options.extra["expert_vram_bytes"])
        if self.device.type != "cuda":
            return 0
        if options.vram_budget is not None:
            return max(0, int(options.vram_budget) - torch.cuda.memory_allocated(self.device) - VRAM_RESERVE)
        free, _total = torch.cuda.mem_get_info(self.device)
        return max(0, free - VRAM_RESERVE)

    # caches -------------------------------------------------------------------------------------------------
    def new_cache(self, max_tokens: int) -> QwenMoeCache:
        if max_tokens > self.max_context:
            raise ContextOverflowError(f"a cache of {max_tokens} tokens exceeds the model's context of "
                                       f"{self.max_context}", "lower num_ctx")
        c = self.config
        cache = QwenMoeCache(max_tokens=max_tokens)
        for layer in range(c.num_hidden_layers):
            if c.is_linear(layer):
                cache.conv[layer] = torch.zeros(c.conv_dim, c.linear_conv_kernel_dim - 1, dtype=self.dtype,
                                                device=self.device)
                cache.recurrent[layer] = torch.zeros(c.linear_num_value_heads, c.linear_key_head_dim,
                                                     c.linear_value_head_dim, dtype=torch.float32, device=self.device)
            else:
                cache.kv[layer] = KVCache(c, max_tokens, self.dtype, self.device)
        return cache

    # passes -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, cache: QwenMoeCache, all_logits: bool = False) -> torch.Tensor:
        tokens = tokens.to(self.device).reshape(-1)
        if tokens.numel() == 0:
            raise BadRequestError("prefill needs at least one token")
        self._check_room([cache], tokens.numel())
        logits = []
        for start in range(0, tokens.numel(), self.prefill_chunk):
            hidden = self._layers(tokens[start:start + self.prefill_chunk].reshape(1, -1), [cache])[0]  # [t, H]
            if all_logits:
                logits.append(self._logits(hidden))
        return torch.cat(logits) if all_logits else self._logits(hidden[-1])

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, caches: list[QwenMoeCache]) -> torch.Tensor:
        tokens = tokens.to(self.device).reshape(-1)
        if not caches or tokens.numel() != len(caches):
            raise BadRequestError(f"decode got {tokens.numel()} tokens for {len(caches)} caches")
        self._check_room(caches, 1)
        return self._logits(self._layers(tokens.reshape(-1, 1), caches)[:, 0])

    @torch.no_grad()
    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(self.device).reshape(-1)
        cache = self.new_cache(max(1, tokens.numel()))
        return torch.cat([self._layers(tokens[start:start + self.prefill_chunk].reshape(1, -1), [cache])[0]
                          for start in range(0, tokens.numel(), self.prefill_chunk)]).to(torch.float32)

    def reuse_cache(self, cache: QwenMoeCache, keep: int, max_tokens: int) -> QwenMoeCache | None:
        """Only whole: the recurrent and conv states hold everything seen, so they cannot be cut back to `keep`
        (None then). The full-attention layers' KV is copied into larger tensors when `max_tokens` needs them."""
        if keep != cache.length or max_tokens > self.max_context:
            return None
        if max_tokens > cache.max_tokens:
            for layer, old in cache.kv.items():
                grown = KVCache(self.config, max_tokens, self.dtype, self.device)
                grown.keys[:, :keep] = old.keys[:, :keep]
                grown.values[:, :keep] = old.values[:, :keep]
                cache.kv[layer] = grown
            cache.max_tokens = max_tokens
        return cache

    def _check_room(self, caches: list[QwenMoeCache], n_new: int) -> None:
        for cache in caches:
            if cache.length + n_new > cache.max_tokens:
                raise ContextOverflowError(f"{cache.length} + {n_new} tokens exceed the cache of {cache.max_tokens}",
                                           "start a new sequence or raise num_ctx")

    def _layers(self, tokens: torch.Tensor, caches: list[QwenMoeCache]) -> torch.Tensor:
        """tokens [B, T] (B sequences, each continuing its cache) -> final hidden states [B, T, H]."""
        c, w = self.config, self.weights
        batch, length = tokens.shape
        x = embedding_rows(w["token_embd.weight"], tokens.reshape(-1), self.dtype).reshape(batch, length, -1)
        starts = [cache.length for cache in caches]
        for layer in range(c.num_hidden_layers):
            p = f"blk.{layer}."
            step = self._graphed(layer, x, caches, starts) if self.graphs is not None and length == 1 else None
            if step is not None:
                x, h, dense = step.residual, step.normed, (step.ids, step.table, step.shared)
            else:
                h = rms_norm(x, w[p + "attn_norm.weight"], c.rms_norm_eps)
                if c.is_linear(layer):
                    conv = torch.stack([cache.conv[layer] for cache in caches])
                    state = torch.stack([cache.recurrent[layer] for cache in caches])
                    h, conv, state = gated_deltanet(h, w, p, c, conv, state)
                    for b, cache in enumerate(caches):
                        cache.conv[layer], cache.recurrent[layer] = conv[b], state[b]
                else:
                    h = gated_attention(h, w, p, c, [cache.kv[layer] for cache in caches], starts)
                x = x + h
                h, dense = rms_norm(x, w[p + "post_attention_norm.weight"], c.rms_norm_eps), None
            ahead = (partial(self._predict_next, x, layer, step.ahead if step is not None else None)
                     if self.prefetch and layer + 1 < c.num_hidden_layers else None)  # called behind this layer's reads
            x = x + moe_block(h.reshape(batch * length, -1), w, p, layer, c, self.experts, ahead,
                              dense).reshape(x.shape)
        for cache in caches:
            cache.length += length
        self.tokens_processed += batch * length
        return rms_norm(x, w["output_norm.weight"], c.rms_norm_eps)

    def _graphed(self, layer: int, x: torch.Tensor, caches: list[QwenMoeCache], starts: list[int]) -> DenseStep | None:
        """The layer's dense part replayed from a decode graph, or None (run it eagerly)."""
        if self.config.is_linear(layer):
            return self.graphs.linear(layer, x, [cache.conv[layer] for cache in caches],
                                      [cache.recurrent[layer] for cache in caches])
        return self.graphs.full(layer, x, [cache.kv[layer] for cache in caches], starts)

    def _predict_next(self, x: torch.Tensor, layer: int,
                      graphed: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[int, list[int]]:
        """(layer + 1, the experts it will likely route to): its router applied to the residual stream entering
        this layer's MoE block, normalised with the next layer's own post-attention norm (the input its router was
        trained on, minus this layer's MoE output and the next layer's attention). The union over the step's tokens,
        most voted first, at most `prefetch_limit`; `graphed`: the same scores already computed by a decode graph."""
        if graphed is not None:
            return layer + 1, predicted(*graphed)
        c, p = self.config, f"blk.{layer + 1}."
        h = rms_norm(x, self.weights[p + "post_attention_norm.weight"], c.rms_norm_eps).reshape(-1, x.shape[-1])
        return layer + 1, predict_experts(h, self.weights[p + "ffn_gate_inp.weight"], c.num_experts_per_tok,
                                          self.prefetch_limit)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.weights.get("output.weight", self.weights["token_embd.weight"])
        return linear(hidden, head).to(torch.float32)

    # reporting ----------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        experts = msgspec.to_builtins(self.experts.stats())
        tokens = self.tokens_processed
        on_gpu = self.device.type == "cuda"
        per_token = {"vram_hits": experts["vram"]["hits"] / tokens if tokens else 0.0,
                     "host_hits": experts["host"]["hits"] / tokens if tokens else 0.0,
                     "misses": experts["host"]["misses"] / tokens if tokens else 0.0}
        return {"backend": self.reader.backend.name, "device": str(self.device),
                "tiers": {"vram": (self.dense_bytes if on_gpu else 0) + experts["vram"]["cached_bytes"],
                          "host": self.experts.cached_bytes + (0 if on_gpu else self.dense_bytes),
                          "storage": experts["storage"]["bytes_read"]},
                "dense_resident_bytes": self.dense_bytes, "expert_cache": experts, "tokens": tokens,
                "experts_per_token": per_token,
                "expert_bytes_read_per_token": experts["storage"]["bytes_read"] / tokens if tokens else 0.0}

    def close(self) -> None:
        self.graphs = None
        self.weights.clear()
        self.experts.close()
        self.experts = expert_residency(self.reader, self.entry.manifest, 0)
        self.reader.close()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
