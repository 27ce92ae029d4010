"""Shared CPU building blocks of decoder math (plain torch, fp32): the reference every GPU path is tested against.

Rope convention: HF's half-split (`rotate_half`: each head's rotary dims split in two halves)."""

import math

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last dimension."""
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


def rope_tables(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [N, 2 * len(inv_freq)] for integer positions [N]."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, hd] rotated by position (cos/sin [N, hd]); HF's half-split convention."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_position: int) -> torch.Tensor:
    """Causal GQA attention of T new queries [H, T, hd] over the cache k, v [KV, L, hd] (the queries are the
    last T of the L positions, starting at `first_position`); returns [T, H * hd]."""
    n_heads, n_new, head_dim = q.shape
    n_kv, n_total = k.shape[0], k.shape[1]
    grouped = q.reshape(n_kv, n_heads // n_kv * n_new, head_dim)  # [KV, G*T, hd]: heads of a KV group together
    scores = torch.matmul(grouped, k.transpose(1, 2)) * (1.0 / math.sqrt(head_dim))  # [KV, G*T, L]
    if n_new > 1:
        query_pos = torch.arange(first_position, first_position + n_new).repeat(n_heads // n_kv)[:, None]
        scores = scores.masked_fill(torch.arange(n_total)[None, :] > query_pos, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v).reshape(n_heads, n_new, head_dim)  # [H, T, hd]
    return out.transpose(0, 1).reshape(n_new, n_heads * head_dim)


def attend_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, caches: list,
                  counts: list[int]) -> torch.Tensor:
    """Attention of rows grouped by sequence (`counts[s]` consecutive rows belong to `caches[s]`, placed after what
    it holds): q [N, H, hd], k, v [N, KV, hd] after rope. Writes the new keys/values into each cache's `layer`
    (lengths are advanced by the caller); returns [N, H * hd]."""
    outputs, row = [], 0
    for cache, count in zip(caches, counts, strict=True):
        start, end = cache.length, cache.length + count
        cache.k[layer, :, start:end] = k[row:row + count].transpose(0, 1)
        cache.v[layer, :, start:end] = v[row:row + count].transpose(0, 1)
        outputs.append(attend(q[row:row + count].transpose(0, 1), cache.k[layer, :, :end], cache.v[layer, :, :end],
                              start))
        row += count
    return torch.cat(outputs)
