"""Gated full attention: q and its output gate interleaved per head in q_proj, q/k RMSNorm, partial rotary
(rotate-half over the first `rotary_dim` dims), GQA, sigmoid output gate, a preallocated KV cache per sequence."""

import torch

from gdsllm_qwen_moe.config import QwenMoeConfig
from gdsllm_qwen_moe.weights import Weight, linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight, in fp32; `weight` is the effective multiplier (1 + w for HF norms)."""
    x32 = x.to(torch.float32)
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight).to(x.dtype)


def rope_tables(positions: torch.Tensor, config: QwenMoeConfig,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, 1, rotary_dim] in `dtype` for positions [T], shared by the queries and keys of a step."""
    dim = config.rotary_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    freqs = positions.to(torch.float32)[:, None] * inv_freq  # [T, dim/2]
    angles = torch.cat([freqs, freqs], dim=-1)[:, None, :]  # [T, 1, dim]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim dims of x [..., T, heads, D] by the `rope_tables` of its positions (rotate-half
    pairing); the other dims pass through."""
    dim = cos.shape[-1]
    rot, rest = x[..., :dim], x[..., dim:]
    half = dim // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    return torch.cat([rot * cos + rotated * sin, rest], dim=-1)


class KVCache:
    """Keys and values of one full-attention layer for one sequence: [kv_heads, max_tokens, head_dim]."""

    def __init__(self, config: QwenMoeConfig, max_tokens: int, dtype: torch.dtype, device: torch.device):
        shape = (config.num_key_value_heads, max_tokens, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)


def _project(x: torch.Tensor, w: dict[str, Weight], prefix: str, config: QwenMoeConfig):
    """x [B, T, hidden] -> q [B, T, n_q, d] and k [B, T, n_kv, d] (RMS-normed, not yet rotated), v [B, T, n_kv, d],
    the output gate [B, T, n_q * d]."""
    batch, length, _ = x.shape
    n_q, n_kv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q_and_gate = linear(x, w[prefix + "attn_q.weight"]).reshape(batch, length, n_q, 2 * d)
    q, gate = q_and_gate[..., :d], q_and_gate[..., d:].reshape(batch, length, n_q * d)
    q = rms_norm(q, w[prefix + "attn_q_norm.weight"], config.rms_norm_eps)
    k = rms_norm(linear(x, w[prefix + "attn_k.weight"]).reshape(batch, length, n_kv, d),
                 w[prefix + "attn_k_norm.weight"], config.rms_norm_eps)
    v = linear(x, w[prefix + "attn_v.weight"]).reshape(batch, length, n_kv, d)
    return q, k, v, gate


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, future: torch.Tensor) -> torch.Tensor:
    """q [n_q, T, d] over keys/values [n_kv, S, d], `future` [T, S] masked out -> [T, n_q * d]. GQA without copying
    the cache: the query heads of one KV head side by side, [n_kv, group*T, d]."""
    n_q, length, d = q.shape
    n_kv, span = keys.shape[0], keys.shape[1]
    grouped = q.reshape(n_kv, n_q // n_kv * length, d)
    scores = (grouped @ keys.transpose(1, 2)).reshape(n_q, length, span) * d ** -0.5
    probs = torch.softmax(scores.masked_fill(future, float("-inf")).float(), dim=-1).to(values.dtype)
    attended = (probs.reshape(n_kv, -1, span) @ values).reshape(n_q, length, d)
    return attended.transpose(0, 1).reshape(length, n_q * d)


def gated_attention(x: torch.Tensor, w: dict[str, Weight], prefix: str, config: QwenMoeConfig,
                    caches: list[KVCache], starts: list[int]) -> torch.Tensor:
    """x [B, T, hidden]: B sequences, each continuing its cache at position starts[b]; returns [B, T, hidden]."""
    length = x.shape[1]
    q, k, v, gate = _project(x, w, prefix, config)
    outputs = []
    for b, (start, cache) in enumerate(zip(starts, caches, strict=True)):  # each attends to its own cache
        positions = torch.arange(start, start + length, device=x.device)
        cos, sin = rope_tables(positions, config, q.dtype)
        cache.keys[:, start:start + length] = rotary(k[b], cos, sin).transpose(0, 1)
        cache.values[:, start:start + length] = v[b].transpose(0, 1)
        future = torch.arange(start + length, device=x.device)[None, :] > positions[:, None]
        outputs.append(_attend(rotary(q[b], cos, sin).transpose(0, 1), cache.keys[:, :start + length],
                               cache.values[:, :start + length], future))
    return linear(torch.stack(outputs) * torch.sigmoid(gate), w[prefix + "attn_output.weight"])


def gated_attention_step(x: torch.Tensor, w: dict[str, Weight], prefix: str, config: QwenMoeConfig,
                         caches: list[KVCache], positions: torch.Tensor, span: int) -> torch.Tensor:
    """One token per sequence with shapes that do not depend on the positions (what a CUDA graph can replay):
    x [B, 1, hidden], `positions` [B] on x's device (where each token goes in its cache), each sequence attending
    to the first `span` slots of its cache (span > every position; fewer in a smaller cache), the slots past its
    position masked."""
    q, k, v, gate = _project(x, w, prefix, config)
    slots = torch.arange(span, device=x.device)
    outputs = []
    for b, cache in enumerate(caches):
        position, attended = positions[b:b + 1], min(span, cache.keys.shape[1])
        cos, sin = rope_tables(position, config, q.dtype)
        cache.keys.index_copy_(1, position, rotary(k[b], cos, sin).transpose(0, 1))
        cache.values.index_copy_(1, position, v[b].transpose(0, 1))
        outputs.append(_attend(rotary(q[b], cos, sin).transpose(0, 1), cache.keys[:, :attended],
                               cache.values[:, :attended], slots[None, :attended] > position[:, None]))
    return linear(torch.stack(outputs) * torch.sigmoid(gate), w[prefix + "attn_output.weight"])
