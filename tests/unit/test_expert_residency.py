"""Core's expert residency on a toy MoE written straight into a store (no plugin): each expert one extent holding
two SwiGLU matrices. Checked against the stored bytes, a dense weighted sum over every expert, the reader's own
byte count and least-frequently-used eviction worked out by hand."""

import msgspec
import pytest
import torch
import torch.nn.functional as F

from gdsllm_core.layout.manifest import TokenizerInfo
from gdsllm_core.layout.store import ModelStore
from gdsllm_core.layout.writer import ModelWriter
from gdsllm_core.runtime.experts import (
    DENSE_TOKENS,
    ExpertResidency,
    ExpertStats,
    predicted,
    prediction_scores,
    routed_experts,
    routing_table,
    top_k_routing,
)
from gdsllm_core.storage.reader import ExtentReader

LAYERS, EXPERTS, HIDDEN, FFN = 2, 6, 32, 16


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(model entry, {(layer, expert): (up_gate [2F, H], down [H, F])}) of a toy MoE in the store."""
    generator = torch.Generator().manual_seed(0)
    weights = {}
    root = tmp_path_factory.mktemp("toy_moe")
    with ModelWriter(root, "toy") as writer:
        for layer in range(LAYERS):
            for expert in range(EXPERTS):
                up_gate = torch.randn(2 * FFN, HIDDEN, generator=generator)
                down = torch.randn(HIDDEN, FFN, generator=generator)
                weights[layer, expert] = (up_gate, down)
                writer.add_extent(f"layer{layer}/expert{expert}", [("up_gate", "F32", [2 * FFN, HIDDEN], up_gate),
                                                                   ("down", "F32", [HIDDEN, FFN], down)])
        writer.finish(architecture="toy-moe", config={}, tokenizer=TokenizerInfo(kind="none", file=""))
    return ModelStore(root).get("toy"), weights


def residency(entry, budget_experts: int, vram_experts: int = 0) -> tuple[ExpertResidency, ExtentReader, int]:
    reader = ExtentReader(entry.path, entry.manifest, threads=2)
    extents = {(layer, expert): entry.manifest.extent(f"layer{layer}/expert{expert}")
               for layer in range(LAYERS) for expert in range(EXPERTS)}
    size = extents[0, 0].nbytes
    return ExpertResidency(reader, extents, lambda extent, views: views, budget_experts * size, torch.device("cpu"),
                           vram_experts * size), reader, size


def mlp(x, weights, coefficients, out):
    up_gate, down = weights["up_gate"], weights["down"]
    gate, up = (x @ up_gate.T).chunk(2, dim=-1)
    y = (F.silu(gate) * up) @ down.T * coefficients
    return y if out is None else out.copy_(y)


def test_routing_helpers_against_a_plain_softmax():
    logits = torch.randn(5, EXPERTS, generator=torch.Generator().manual_seed(1))
    probs = torch.softmax(logits, dim=-1)
    weights, ids = top_k_routing(logits, 2, normalize=False)
    assert torch.equal(ids, probs.topk(2).indices) and torch.allclose(weights, probs.topk(2).values)
    normalized, _ = top_k_routing(logits, 2)
    assert torch.allclose(normalized.sum(-1), torch.ones(5))
    table = routing_table(normalized, ids, EXPERTS)
    assert torch.allclose(table.gather(1, ids), normalized) and (table > 0).sum() == 10
    scores, top = prediction_scores(normalized, ids, EXPERTS, 3)
    assert torch.allclose(scores, table.sum(0).topk(3).values)
    assert predicted(scores, top) == [e for e, s in zip(top.tolist(), scores.tolist(), strict=True) if s > 0]


@pytest.mark.parametrize("rows", [3, DENSE_TOKENS + 5])  # streamed on every row / gathered per expert
def test_routed_experts_equal_a_dense_sum_and_read_each_routed_expert_once(toy, rows):
    entry, weights = toy
    cache, reader, size = residency(entry, budget_experts=0)
    x = torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(rows))
    logits = torch.randn(rows, EXPERTS, generator=torch.Generator().manual_seed(rows + 1))
    routing, ids = top_k_routing(logits, 2)
    table = routing_table(routing, ids, EXPERTS)
    out, shared = routed_experts(x, ids, table, cache, 1, mlp, while_reading=lambda: "shared")
    reference = sum(mlp(x, {"up_gate": weights[1, e][0], "down": weights[1, e][1]}, table[:, e, None], None)
                    for e in range(EXPERTS))
    assert ((out - reference).abs().max() / reference.abs().max()).item() < 1e-6 and shared == "shared"
    routed = sorted(set(ids.reshape(-1).tolist()))
    assert cache.counters.last_read_by_layer[1].ids == routed
    assert cache.counters.bytes_read == reader.bytes_read == len(routed) * size  # one read per routed expert
    reader.close()


def test_tiers_follow_lfu_and_statistics_are_typed(toy):
    entry, weights = toy
    cache, reader, size = residency(entry, budget_experts=2, vram_experts=1)
    for _ in range(3):
        cache.get(0, [0])  # expert 0 is hot
    got = cache.get(0, [1, 2])  # the host tier (2 experts) cannot keep both newcomers and the hot one
    assert torch.equal(got[2]["down"], weights[0, 2][1])  # handed out from what was read
    assert cache.vram_keys() == {(0, 0)}
    assert cache.cached_keys() == {(0, 0), (0, 1)}  # 2, requested as rarely as 1, does not displace it
    cache.prefetch(0, [3, 0])  # 0 is cached: only 3 is read ahead
    assert cache.counters.last_prefetch_by_layer[0].read == [3]
    cache.get(0, [3])
    stats = cache.stats()
    assert isinstance(stats, ExpertStats)
    assert (stats.vram.hits, stats.host.hits, stats.host.misses) == (2, 0, 4)  # 0 twice from VRAM; 0,1,2,3 read
    assert stats.requests == 6 and stats.prefetch.prefetched == stats.prefetch.hits == 1
    assert stats.storage.bytes_read == reader.bytes_read == 4 * size
    assert msgspec.to_builtins(stats)["host"]["misses"] == 4
    cache.close()
    reader.close()
