"""KV caches of one sequence, shaped by the model's `KvSpec`: the CPU one (fp32, grown by doubling) and the GPU one
(fp16, allocated once, addressed by the decode kernels through the driver's sequence table)."""

from dataclasses import dataclass

import torch

from gdsllm_core.errors import ContextOverflowError

MIN_CACHE_TOKENS = 256  # first capacity of a CPU cache


@dataclass(frozen=True)
class KvSpec:
    """What one sequence's KV cache holds: `n_layers` layers (indexed by decoder layer), `n_kv_heads` heads of
    `head_dim` each, for keys and values alike."""

    n_layers: int
    n_kv_heads: int
    head_dim: int

    def gpu_bytes(self, tokens: int) -> int:
        """Bytes of a GPU cache (fp16 keys and values) for `tokens` positions."""
        return 2 * self.n_layers * tokens * self.n_kv_heads * self.head_dim * 2


def _overflow(needed: int, max_tokens: int) -> ContextOverflowError:
    return ContextOverflowError(f"{needed} tokens do not fit the sequence's cache of {max_tokens}",
                                "shorten the prompt or raise num_ctx")


class CpuKvCache:
    """k, v fp32 [n_layers, n_kv_heads, capacity, head_dim], grown by doubling up to `max_tokens`."""

    def __init__(self, spec: KvSpec, max_tokens: int):
        self.max_tokens = max_tokens
        self.length = 0
        shape = (spec.n_layers, spec.n_kv_heads, min(max_tokens, MIN_CACHE_TOKENS), spec.head_dim)
        self.k = torch.zeros(shape, dtype=torch.float32)
        self.v = torch.zeros(shape, dtype=torch.float32)

    def reserve(self, n_new: int) -> None:
        """Room for `n_new` more positions; ContextOverflowError past `max_tokens`."""
        needed = self.length + n_new
        if needed > self.max_tokens:
            raise _overflow(needed, self.max_tokens)
        capacity = self.k.shape[2]
        if needed <= capacity:
            return
        while capacity < needed:
            capacity = min(capacity * 2, self.max_tokens)
        for name in ("k", "v"):
            old = getattr(self, name)
            grown = torch.zeros(old.shape[0], old.shape[1], capacity, old.shape[3], dtype=old.dtype)
            grown[:, :, :self.length] = old[:, :, :self.length]
            setattr(self, name, grown)


class GpuKvCache:
    """k, v fp16 [n_layers, max_tokens, n_kv_heads, head_dim] on the GPU, allocated once. Each step the driver
    writes `length` and the caches' addresses into its device table of sequences."""

    def __init__(self, spec: KvSpec, max_tokens: int, device: torch.device):
        self.max_tokens = max_tokens
        self.length = 0
        shape = (spec.n_layers, max_tokens, spec.n_kv_heads, spec.head_dim)
        self.k = torch.empty(shape, dtype=torch.float16, device=device)
        self.v = torch.empty(shape, dtype=torch.float16, device=device)

    def reserve(self, n_new: int) -> None:
        if self.length + n_new > self.max_tokens:
            raise _overflow(self.length + n_new, self.max_tokens)
