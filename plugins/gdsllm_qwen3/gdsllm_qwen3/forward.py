"""QwenForward: the forward pass of Qwen2, Qwen3 and Qwen3-MoE in plain torch. In fp32 on the CPU it is the
reference; on a CUDA device the same ops run there (`LoadOptions.extra["dtype"]`, default bfloat16 on CUDA).

Residency: the dense extents (embeddings, each layer's attention, norms and dense FFN or router, the head) are read
once in one batch and dequantized to the compute dtype on the device. Experts are read when the router picks them,
one extent (= one read) per expert, through `ExpertStore` (a host cache under `LoadOptions.host_cache` bytes).

`LoadOptions.extra`: "dtype" ("float32" or "bfloat16"), "prefill_chunk" (prompt tokens per pass, default 512)."""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gdsllm_core.api import (
    BadRequestError,
    ContextOverflowError,
    ExtentReader,
    LoadOptions,
    ModelEntry,
    extent_views,
    ggml,
)
from gdsllm_qwen3.config import QwenConfig
from gdsllm_qwen3.experts import ExpertStore

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_HOST_CACHE = 4 << 30  # bytes of experts kept in host RAM when LoadOptions.host_cache is None
PREFILL_CHUNK = 512  # prompt tokens per pass: a chunk's experts are read once (the union of its routes)


@dataclass
class QwenCache:
    """KV cache of one sequence: k, v [n_layers, n_kv_heads, max_tokens, head_dim]."""

    k: torch.Tensor
    v: torch.Tensor
    max_tokens: int
    length: int = 0


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, in fp32, as transformers' Qwen2RMSNorm / Qwen3RMSNorm."""
    x32 = x.float()
    return (weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)


def rope_tables(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """cos, sin [N, head_dim] for integer positions [N] (computed in fp32)."""
    freqs = positions.float()[:, None] * inv_freq[None, :].to(positions.device)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, hd] rotated by position (cos/sin [N, hd]); the half-split (NEOX) convention."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_position: int) -> torch.Tensor:
    """Causal GQA attention of T new queries [T, H, hd] over the cache k, v [KV, L, hd] (the queries are the last T
    of the L positions); returns [T, H * hd]."""
    n_new, n_heads, head_dim = q.shape
    n_kv = k.shape[0]
    grouped = q.transpose(0, 1).reshape(n_kv, n_heads // n_kv * n_new, head_dim)  # [KV, G*T, hd]
    scores = torch.matmul(grouped.float(), k.float().transpose(1, 2)) / math.sqrt(head_dim)  # [KV, G*T, L]
    if n_new > 1:
        query_pos = torch.arange(first_position, first_position + n_new, device=q.device).repeat(n_heads // n_kv)
        key_pos = torch.arange(k.shape[1], device=q.device)
        scores = scores.masked_fill(key_pos[None, :] > query_pos[:, None], float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)  # [KV, G*T, hd]
    return out.reshape(n_heads, n_new, head_dim).transpose(0, 1).reshape(n_new, n_heads * head_dim)


def route(h: torch.Tensor, router: torch.Tensor, top_k: int, normalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts (fp32), top-k, renormalised when `normalise`: (weights [N, k], expert ids [N, k])."""
    probs = torch.softmax(F.linear(h, router).float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if normalise:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(h.dtype), ids


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


class QwenForward:
    """`ForwardPass` for architectures "qwen2", "qwen3" and "qwen3moe"."""

    def __init__(self, entry: ModelEntry, options: LoadOptions):
        self.entry = entry
        self.config = QwenConfig.from_dict(entry.manifest.config)
        self.device = torch.device(options.device or "cpu")
        default_dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        dtype_name = options.extra.get("dtype", default_dtype)
        if dtype_name not in COMPUTE_DTYPES:
            raise BadRequestError(f"compute dtype {dtype_name!r} is not supported", "use float32 or bfloat16")
        self.dtype = COMPUTE_DTYPES[dtype_name]
        self.prefill_chunk = int(options.extra.get("prefill_chunk", PREFILL_CHUNK))
        self.vocab_size = self.config.vocab_size
        self.max_context = min(options.max_context or self.config.context_length, self.config.context_length)
        self.inv_freq = self.config.inv_freq()
        self.reader = ExtentReader(entry.path, entry.manifest)
        dense = [e for e in entry.manifest.extents if ".expert." not in e.name]
        buffers = [torch.empty(e.nbytes, dtype=torch.uint8) for e in dense]
        self.reader.read(dense, buffers)
        self.dense_bytes = sum(e.nbytes for e in dense)
        self.weights: dict[str, torch.Tensor] = {}
        for extent, buffer in zip(dense, buffers, strict=True):
            infos = {t.name: t for t in extent.tensors}
            for name, raw in extent_views(extent, buffer).items():
                values = ggml.dequantize(raw, infos[name].qtype).reshape(infos[name].shape)
                keep = torch.float32 if values.dim() == 1 else self.dtype  # norms and biases stay fp32
                self.weights[name] = values.to(self.device, keep)
        if self.config.tied_embeddings:
            self.weights["output.weight"] = self.weights["token_embd.weight"]
        budget = DEFAULT_HOST_CACHE if options.host_cache is None else int(options.host_cache)
        self.experts = ExpertStore(self.reader, entry.manifest, budget, self.device, self.dtype)
        self.tokens_processed = 0

    # caches -------------------------------------------------------------------------------------------------
    def new_cache(self, max_tokens: int) -> QwenCache:
        if max_tokens > self.max_context:
            raise ContextOverflowError(f"a cache of {max_tokens} tokens exceeds the model's context of "
                                       f"{self.max_context}", "lower num_ctx")
        c = self.config
        shape = (c.n_layers, c.n_kv_heads, max_tokens, c.head_dim)
        return QwenCache(k=torch.zeros(shape, dtype=self.dtype, device=self.device),
                         v=torch.zeros(shape, dtype=self.dtype, device=self.device), max_tokens=max_tokens)

    # passes -------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, cache: QwenCache, all_logits: bool = False) -> torch.Tensor:
        tokens = tokens.reshape(-1).to(self.device, torch.int64)
        if tokens.numel() == 0:
            raise BadRequestError("prefill needs at least one token")
        outputs = []
        for start in range(0, tokens.numel(), self.prefill_chunk):
            chunk = tokens[start:start + self.prefill_chunk]
            hidden = self._run(chunk, [cache], [chunk.numel()])
            outputs.append(hidden if all_logits else hidden[-1:])
        logits = self._logits(torch.cat(outputs) if all_logits else outputs[-1])
        return logits if all_logits else logits[0]

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, caches: list[QwenCache]) -> torch.Tensor:
        return self._logits(self._run(tokens.reshape(-1).to(self.device, torch.int64), caches, [1] * len(caches)))

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weights["output.weight"]).float()

    def _run(self, tokens: torch.Tensor, caches: list[QwenCache], counts: list[int]) -> torch.Tensor:
        """Hidden states after the final norm [N, D] for rows grouped by sequence (`counts[s]` rows of caches[s])."""
        for cache, count in zip(caches, counts, strict=True):
            if cache.length + count > cache.max_tokens:
                raise ContextOverflowError(f"{cache.length + count} tokens do not fit the sequence's cache of "
                                           f"{cache.max_tokens}", "shorten the prompt or raise num_ctx")
        positions = torch.cat([torch.arange(c.length, c.length + n) for c, n in zip(caches, counts, strict=True)])
        cos, sin = rope_tables(self.inv_freq, positions.to(self.device), self.dtype)
        x = self.weights["token_embd.weight"][tokens]
        for layer in range(self.config.n_layers):
            x = self._layer(layer, x, cos, sin, caches, counts)
        for cache, count in zip(caches, counts, strict=True):
            cache.length += count
        self.tokens_processed += tokens.numel()
        return rms_norm(x, self.weights["output_norm.weight"], self.config.rms_eps)

    def _layer(self, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, caches: list[QwenCache],
               counts: list[int]) -> torch.Tensor:
        c, w, p = self.config, self.weights, f"blk.{layer}."
        h = rms_norm(x, w[p + "attn_norm.weight"], c.rms_eps)
        q = F.linear(h, w[p + "attn_q.weight"], w.get(p + "attn_q.bias")).reshape(-1, c.n_heads, c.head_dim)
        k = F.linear(h, w[p + "attn_k.weight"], w.get(p + "attn_k.bias")).reshape(-1, c.n_kv_heads, c.head_dim)
        v = F.linear(h, w[p + "attn_v.weight"], w.get(p + "attn_v.bias")).reshape(-1, c.n_kv_heads, c.head_dim)
        if c.qk_norm:
            q = rms_norm(q, w[p + "attn_q_norm.weight"], c.rms_eps)
            k = rms_norm(k, w[p + "attn_k_norm.weight"], c.rms_eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        outputs, row = [], 0
        for cache, count in zip(caches, counts, strict=True):
            start, end = cache.length, cache.length + count
            cache.k[layer, :, start:end] = k[row:row + count].transpose(0, 1)
            cache.v[layer, :, start:end] = v[row:row + count].transpose(0, 1)
            outputs.append(attend(q[row:row + count], cache.k[layer, :, :end], cache.v[layer, :, :end], start))
            row += count
        x = x + F.linear(torch.cat(outputs), w[p + "attn_output.weight"])
        h = rms_norm(x, w[p + "ffn_norm.weight"], c.rms_eps)
        if c.is_sparse(layer):
            return x + self._moe(layer, h)
        return x + swiglu(h, w[p + "ffn_gate.weight"], w[p + "ffn_up.weight"], w[p + "ffn_down.weight"])

    def _moe(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """The MoE block over h [N, D]: each picked expert (read once for all rows) on the rows routed to it."""
        c = self.config
        weights, ids = route(h, self.weights[f"blk.{layer}.ffn_gate_inp.weight"], c.n_experts_used, c.norm_topk_prob)
        out = torch.zeros_like(h)
        for expert, (gate, up, down) in self.experts.stream(layer, sorted(set(ids.reshape(-1).tolist()))):
            rows, slot = (ids == expert).nonzero(as_tuple=True)
            out.index_add_(0, rows, swiglu(h[rows], gate, up, down) * weights[rows, slot, None])
        return out

    # reporting ----------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        experts = self.experts.as_dict()
        tokens = self.tokens_processed
        on_gpu = self.device.type == "cuda"
        return {"backend": self.reader.backend.name, "device": str(self.device),
                "tiers": {"vram": self.dense_bytes if on_gpu else 0,
                          "host": experts["cached_bytes"] + (0 if on_gpu else self.dense_bytes),
                          "storage": experts["bytes_read"]},
                "dense_resident_bytes": self.dense_bytes, "expert_cache": experts, "tokens": tokens,
                "expert_bytes_read_per_token": experts["bytes_read"] / tokens if tokens else 0.0}

    def close(self) -> None:
        self.weights.clear()
        self.experts.close()
        self.reader.close()
