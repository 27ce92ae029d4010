"""`gated_attention_step` (the static-shape form the decode graphs replay) against `gated_attention` (the eager form,
itself checked against transformers): same outputs and cache contents for a batch of sequences at different
positions, whatever span past them is attended to (one larger than the cache: the whole cache)."""

import pytest
import torch

from gdsllm_qwen_moe.attention import KVCache, gated_attention, gated_attention_step
from gdsllm_qwen_moe.bench import tiny_shapes


def random_weights(config, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden, d = config.hidden_size, config.head_dim
    n_q, n_kv = config.num_attention_heads, config.num_key_value_heads
    shapes = {"attn_q.weight": (2 * n_q * d, hidden), "attn_k.weight": (n_kv * d, hidden),
              "attn_v.weight": (n_kv * d, hidden), "attn_output.weight": (hidden, n_q * d),
              "attn_q_norm.weight": (d,), "attn_k_norm.weight": (d,)}
    return {f"blk.3.{name}": torch.randn(shape, generator=g) * (1.0 if "norm" in name else hidden ** -0.5)
            for name, shape in shapes.items()}


def filled_cache(config, length: int, seed: int) -> KVCache:
    """A cache of 40 slots whose first `length` hold random keys / values (the rest zero, as allocated)."""
    cache = KVCache(config, 40, torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    cache.keys[:, :length] = torch.randn(cache.keys[:, :length].shape, generator=g)
    cache.values[:, :length] = torch.randn(cache.values[:, :length].shape, generator=g)
    return cache


@pytest.mark.parametrize("span", [16, 32, 40, 64])
def test_step_matches_the_eager_attention(span):
    config = tiny_shapes(4)
    w = random_weights(config, 0)
    starts = [5, 13]
    x = torch.randn(2, 1, config.hidden_size, generator=torch.Generator().manual_seed(1))
    eager = [filled_cache(config, n, seed) for n, seed in zip(starts, (2, 3), strict=True)]
    step = [filled_cache(config, n, seed) for n, seed in zip(starts, (2, 3), strict=True)]
    ref = gated_attention(x, w, "blk.3.", config, eager, starts)
    ours = gated_attention_step(x, w, "blk.3.", config, step, torch.tensor(starts), span)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(step, eager, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)  # written at the right slot only
    assert not torch.equal(eager[0].keys[:, 5], torch.zeros_like(eager[0].keys[:, 5]))  # the step wrote something
