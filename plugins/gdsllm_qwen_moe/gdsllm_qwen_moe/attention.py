"""Gated full attention: q and its output gate interleaved per head in q_proj, q/k RMSNorm, partial rotary
(rotate-half over the first `rotary_dim` dims), GQA, sigmoid output gate, a preallocated KV cache per sequence."""

import torch

from gdsllm_qwen_moe.config import QwenMoeConfig
from gdsllm_qwen_moe.weights import Weight, linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight, in fp32; `weight` is the effective multiplier (1 + w for HF norms)."""
    x32 = x.to(torch.float32)
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight).to(x.dtype)


def rotary(x: torch.Tensor, positions: torch.Tensor, config: QwenMoeConfig) -> torch.Tensor:
    """Rotate the first rotary_dim dims of x [..., T, heads, D] by their positions [T] (rotate-half pairing)."""
    dim = config.rotary_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=x.device) / dim))
    freqs = positions.to(torch.float32)[:, None] * inv_freq  # [T, dim/2]
    angles = torch.cat([freqs, freqs], dim=-1)[:, None, :]  # [T, 1, dim]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
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
        q_b = rotary(q[b], positions, config).transpose(0, 1)  # [n_q, T, d]
        cache.keys[:, start:start + length] = rotary(k[b], positions, config).transpose(0, 1)
        cache.values[:, start:start + length] = v[b].transpose(0, 1)
        keys = cache.keys[:, :start + length].repeat_interleave(n_q // n_kv, dim=0)
        values = cache.values[:, :start + length].repeat_interleave(n_q // n_kv, dim=0)
        scores = (q_b @ keys.transpose(1, 2)) * d ** -0.5  # [n_q, T, start+T]
        future = torch.arange(start + length, device=x.device)[None, :] > positions[:, None]
        scores = scores.masked_fill(future, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(values.dtype)
        outputs.append((probs @ values).transpose(0, 1).reshape(length, n_q * d))
    attended = torch.stack(outputs) * torch.sigmoid(gate)
    return linear(attended, w[prefix + "attn_output.weight"])
