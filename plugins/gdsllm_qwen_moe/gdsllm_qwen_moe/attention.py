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


def gated_attention(x: torch.Tensor, w: dict[str, Weight], prefix: str, config: QwenMoeConfig,
                    caches: list[KVCache], starts: list[int]) -> torch.Tensor:
    """x [B, T, hidden]: B sequences, each continuing its cache at position starts[b]; returns [B, T, hidden]."""
    batch, length, _ = x.shape
    n_q, n_kv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q_and_gate = linear(x, w[prefix + "attn_q.weight"]).reshape(batch, length, n_q, 2 * d)
    q, gate = q_and_gate[..., :d], q_and_gate[..., d:].reshape(batch, length, n_q * d)
    q = rms_norm(q, w[prefix + "attn_q_norm.weight"], config.rms_norm_eps)
    k = rms_norm(linear(x, w[prefix + "attn_k.weight"]).reshape(batch, length, n_kv, d),
                 w[prefix + "attn_k_norm.weight"], config.rms_norm_eps)
    v = linear(x, w[prefix + "attn_v.weight"]).reshape(batch, length, n_kv, d)
    outputs = []
    for b in range(batch):  # sequences differ in length; each attends to its own cache
        start, cache = starts[b], caches[b]
        positions = torch.arange(start, start + length, device=x.device)
        cos, sin = rope_tables(positions, config, q.dtype)
        q_b = rotary(q[b], cos, sin).transpose(0, 1)  # [n_q, T, d]
        cache.keys[:, start:start + length] = rotary(k[b], cos, sin).transpose(0, 1)
        cache.values[:, start:start + length] = v[b].transpose(0, 1)
        keys, values = cache.keys[:, :start + length], cache.values[:, :start + length]  # [n_kv, start+T, d]
        # GQA without copying the cache: the query heads of one KV head side by side, [n_kv, group*T, d]
        grouped = q_b.reshape(n_kv, n_q // n_kv * length, d)
        scores = (grouped @ keys.transpose(1, 2)).reshape(n_q, length, -1) * d ** -0.5  # [n_q, T, start+T]
        future = torch.arange(start + length, device=x.device)[None, :] > positions[:, None]
        scores = scores.masked_fill(future, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(values.dtype)
        attended_b = (probs.reshape(n_kv, -1, start + length) @ values).reshape(n_q, length, d)
        outputs.append(attended_b.transpose(0, 1).reshape(length, n_q * d))
    attended = torch.stack(outputs) * torch.sigmoid(gate)
    return linear(attended, w[prefix + "attn_output.weight"])
