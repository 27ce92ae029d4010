"""GemmaForward: the forward pass of Gemma 3 (text) in plain torch. In fp32 on the CPU it is the reference; on a
CUDA device the same ops run there (`LoadOptions.extra["dtype"]`, default bfloat16 on CUDA).

Per layer: x + post_attention_norm(attention(attn_norm(x))), then + post_ffw_norm(GeGLU(ffn_norm(x))); every norm
scales by its stored multiplier (1 + w). Attention: q/k RMSNorm per head, rope with the layer's own base (local
sliding-window layers and global layers differ), queries scaled by `query_scale`, a sliding layer's query seeing
only its last `sliding_window` positions. Embeddings are scaled by sqrt(dim).

Every extent is read once and dequantized to the compute dtype on the device. `LoadOptions.extra`: "dtype"
("float32" or "bfloat16"), "prefill_chunk" (prompt tokens per pass, default 512)."""

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
from gdsllm_gemma.config import GemmaConfig

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PREFILL_CHUNK = 512  # prompt tokens per pass


@dataclass
class GemmaCache:
    """KV cache of one sequence: k, v [n_layers, n_kv_heads, max_tokens, head_dim]."""

    k: torch.Tensor
    v: torch.Tensor
    max_tokens: int
    length: int = 0


def rms_norm(x: torch.Tensor, multiplier: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm in fp32, scaled by the stored multiplier (1 + w), cast back to x's dtype."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * multiplier).to(x.dtype)


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


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_position: int, scale: float,
           window: int) -> torch.Tensor:
    """Causal GQA attention of T new queries [T, H, hd] over the cache k, v [KV, L, hd] (the queries are the last T
    of the L positions), each query seeing at most its last `window` positions (0: all); returns [T, H * hd]."""
    n_new, n_heads, head_dim = q.shape
    n_kv, n_total = k.shape[0], k.shape[1]
    grouped = q.transpose(0, 1).reshape(n_kv, n_heads // n_kv * n_new, head_dim)  # [KV, G*T, hd]
    scores = torch.matmul(grouped.float() * scale, k.float().transpose(1, 2))  # [KV, G*T, L]
    query_pos = torch.arange(first_position, first_position + n_new, device=q.device).repeat(n_heads // n_kv)
    key_pos = torch.arange(n_total, device=q.device)
    hidden = key_pos[None, :] > query_pos[:, None]
    if window:
        hidden |= key_pos[None, :] <= query_pos[:, None] - window
    scores = scores.masked_fill(hidden, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)  # [KV, G*T, hd]
    return out.reshape(n_heads, n_new, head_dim).transpose(0, 1).reshape(n_new, n_heads * head_dim)


class GemmaForward:
    """`ForwardPass` for architecture "gemma3"."""

    def __init__(self, entry: ModelEntry, options: LoadOptions):
        self.entry = entry
        self.config = GemmaConfig.from_dict(entry.manifest.config)
        self.device = torch.device(options.device or "cpu")
        default_dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        dtype_name = options.extra.get("dtype", default_dtype)
        if dtype_name not in COMPUTE_DTYPES:
            raise BadRequestError(f"compute dtype {dtype_name!r} is not supported", "use float32 or bfloat16")
        self.dtype = COMPUTE_DTYPES[dtype_name]
        self.prefill_chunk = int(options.extra.get("prefill_chunk", PREFILL_CHUNK))
        self.vocab_size = self.config.vocab_size
        self.max_context = min(options.max_context or self.config.context_length, self.config.context_length)
        self.inv_freq = {local: self.config.inv_freq(local) for local in (False, True)}
        extents = entry.manifest.extents
        buffers = [torch.empty(e.nbytes, dtype=torch.uint8) for e in extents]
        with ExtentReader(entry.path, entry.manifest) as reader:
            reader.read(extents, buffers)
            self.backend = reader.backend.name
        self.resident_bytes = sum(e.nbytes for e in extents)
        self.weights: dict[str, torch.Tensor] = {}
        for extent, buffer in zip(extents, buffers, strict=True):
            infos = {t.name: t for t in extent.tensors}
            for name, raw in extent_views(extent, buffer).items():
                values = ggml.dequantize(raw, infos[name].qtype).reshape(infos[name].shape)
                keep = torch.float32 if values.dim() == 1 else self.dtype  # norms stay fp32
                self.weights[name] = values.to(self.device, keep)
        if self.config.tied_embeddings:
            self.weights["output.weight"] = self.weights["token_embd.weight"]
        self.embed_scale = torch.tensor(self.config.embed_scale, dtype=self.dtype)
        self.tokens_processed = 0

    def new_cache(self, max_tokens: int) -> GemmaCache:
        if max_tokens > self.max_context:
            raise ContextOverflowError(f"a cache of {max_tokens} tokens exceeds the model's context of "
                                       f"{self.max_context}", "lower num_ctx")
        c = self.config
        shape = (c.n_layers, c.n_kv_heads, max_tokens, c.head_dim)
        return GemmaCache(k=torch.zeros(shape, dtype=self.dtype, device=self.device),
                          v=torch.zeros(shape, dtype=self.dtype, device=self.device), max_tokens=max_tokens)

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, cache: GemmaCache, all_logits: bool = False) -> torch.Tensor:
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
    def decode(self, tokens: torch.Tensor, caches: list[GemmaCache]) -> torch.Tensor:
        return self._logits(self._run(tokens.reshape(-1).to(self.device, torch.int64), caches, [1] * len(caches)))

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weights["output.weight"]).float()
        cap = self.config.final_logit_softcap
        return torch.tanh(logits / cap) * cap if cap else logits

    def _run(self, tokens: torch.Tensor, caches: list[GemmaCache], counts: list[int]) -> torch.Tensor:
        """Hidden states after the final norm [N, D] for rows grouped by sequence (`counts[s]` rows of caches[s])."""
        for cache, count in zip(caches, counts, strict=True):
            if cache.length + count > cache.max_tokens:
                raise ContextOverflowError(f"{cache.length + count} tokens do not fit the sequence's cache of "
                                           f"{cache.max_tokens}", "shorten the prompt or raise num_ctx")
        positions = torch.cat([torch.arange(c.length, c.length + n) for c, n in zip(caches, counts, strict=True)])
        ropes = {local: rope_tables(inv_freq, positions.to(self.device), self.dtype)
                 for local, inv_freq in self.inv_freq.items()}
        x = self.weights["token_embd.weight"][tokens] * self.embed_scale
        for layer in range(self.config.n_layers):
            x = self._layer(layer, x, ropes[self.config.sliding_layers[layer]], caches, counts)
        for cache, count in zip(caches, counts, strict=True):
            cache.length += count
        self.tokens_processed += tokens.numel()
        return rms_norm(x, self.weights["output_norm.weight"], self.config.rms_eps)

    def _layer(self, layer: int, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], caches: list[GemmaCache],
               counts: list[int]) -> torch.Tensor:
        c, w, p = self.config, self.weights, f"blk.{layer}."
        cos, sin = rope
        h = rms_norm(x, w[p + "attn_norm.weight"], c.rms_eps)
        q = F.linear(h, w[p + "attn_q.weight"]).reshape(-1, c.n_heads, c.head_dim)
        k = F.linear(h, w[p + "attn_k.weight"]).reshape(-1, c.n_kv_heads, c.head_dim)
        v = F.linear(h, w[p + "attn_v.weight"]).reshape(-1, c.n_kv_heads, c.head_dim)
        q = apply_rope(rms_norm(q, w[p + "attn_q_norm.weight"], c.rms_eps), cos, sin)
        k = apply_rope(rms_norm(k, w[p + "attn_k_norm.weight"], c.rms_eps), cos, sin)
        outputs, row = [], 0
        for cache, count in zip(caches, counts, strict=True):
            start, end = cache.length, cache.length + count
            cache.k[layer, :, start:end] = k[row:row + count].transpose(0, 1)
            cache.v[layer, :, start:end] = v[row:row + count].transpose(0, 1)
            outputs.append(attend(q[row:row + count], cache.k[layer, :, :end], cache.v[layer, :, :end], start,
                                  c.query_scale, c.window(layer)))
            row += count
        attention = F.linear(torch.cat(outputs), w[p + "attn_output.weight"])
        x = x + rms_norm(attention, w[p + "post_attention_norm.weight"], c.rms_eps)
        h = rms_norm(x, w[p + "ffn_norm.weight"], c.rms_eps)
        mlp = F.linear(F.gelu(F.linear(h, w[p + "ffn_gate.weight"]), approximate="tanh")
                       * F.linear(h, w[p + "ffn_up.weight"]), w[p + "ffn_down.weight"])
        return x + rms_norm(mlp, w[p + "post_ffw_norm.weight"], c.rms_eps)

    def stats(self) -> dict:
        on_gpu = self.device.type == "cuda"
        return {"backend": self.backend, "device": str(self.device),
                "tiers": {"vram": self.resident_bytes if on_gpu else 0, "host": 0 if on_gpu else self.resident_bytes,
                          "storage": 0}, "tokens": self.tokens_processed}

    def close(self) -> None:
        self.weights.clear()
