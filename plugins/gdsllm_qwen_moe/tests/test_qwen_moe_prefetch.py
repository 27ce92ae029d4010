"""Next-layer expert read-ahead (`LoadOptions.extra["expert_prefetch"]`): the same logits and cache contents as
without it, its predictions against transformers' own router and norm modules, and its reads counted by a reader
wrapper (synchronous reads vs read-ahead) independently of the cache's statistics."""

from collections import Counter

import msgspec
import pytest
import torch

from gdsllm_core.engine.forward import LoadOptions
from gdsllm_core.errors import BadRequestError
from gdsllm_core.runtime.experts import DENSE_TOKENS
from gdsllm_qwen_moe.forward import QwenMoeForward

pytestmark = pytest.mark.reference
EVERY_PREDICTION = 64  # a read-ahead limit above any union of top-k here: every predicted expert is read ahead


class CountingReader:
    """Wraps the forward's ExtentReader: `submit_each` is what the cache reads for a step's misses, `submit` its
    read-ahead."""

    def __init__(self, reader, cache=None, budget: int = 0):
        self.reader, self.cache, self.budget = reader, cache, budget
        self.sync: list[str] = []
        self.ahead: list[str] = []
        self.ahead_batches: list[int] = []

    def submit_each(self, extents, destinations):
        self.sync += [e.name for e in extents]
        return self.reader.submit_each(extents, destinations)

    def submit(self, extents, destinations):
        if self.cache is not None:  # what the cache holds when read-ahead starts: its budget, nothing else pending
            assert self.cache.cached_bytes <= self.budget and self.cache.pending_bytes == 0
        self.ahead += [e.name for e in extents]
        self.ahead_batches.append(len(extents))
        return self.reader.submit(extents, destinations)


def run(entry, prefetch: bool, host_cache: int, limit: int = 0):
    """A prompt (two prefill chunks), 5 decode steps, then 2 sequences decoded together for 3 steps: the logits,
    the forward (still open) and its counting reader."""
    extra = {"prefill_chunk": 8, "expert_prefetch": prefetch, "expert_prefetch_limit": limit or EVERY_PREDICTION}
    forward = QwenMoeForward(entry, LoadOptions(host_cache=host_cache, extra=extra))
    counting = CountingReader(forward.reader, forward.experts, host_cache)
    forward.experts.reader = counting
    logits = []
    cache = forward.new_cache(32)
    prompt = torch.randint(0, 512, (13,), generator=torch.Generator().manual_seed(11))
    logits.append(forward.prefill(prompt, cache, all_logits=True))
    token = logits[-1][-1].argmax().reshape(1)
    for _ in range(5):
        logits.append(forward.decode(token, [cache]))
        token = logits[-1].argmax(-1)
        assert forward.experts.cached_bytes <= host_cache
    caches = [forward.new_cache(16) for _ in range(2)]
    for prompt, c in zip((torch.tensor([5, 9, 77]), torch.tensor([300, 2])), caches, strict=True):
        logits.append(forward.prefill(prompt, c))
    tokens = torch.tensor([17, 401])
    for _ in range(3):
        logits.append(forward.decode(tokens, caches))
        tokens = logits[-1].argmax(-1)
    return logits, forward, counting


@pytest.mark.parametrize("experts_cached", [0, 5, 32])
def test_prefetch_changes_nothing_but_who_reads(converted, experts_cached):
    """Logits equal exactly, the cache ends up the same, every byte is a miss or read-ahead waste, and the
    synchronous reads are the misses less the read-ahead that was used."""
    entry = converted["per_expert"]
    expert_bytes = entry.manifest.extent("blk.0.expert.0").nbytes
    off_logits, off, off_reads = run(entry, False, experts_cached * expert_bytes)
    on_logits, on, on_reads = run(entry, True, experts_cached * expert_bytes)
    for a, b in zip(off_logits, on_logits, strict=True):
        assert torch.equal(a, b)
    assert on.experts.cached_keys() == off.experts.cached_keys()
    stats, off_stats = msgspec.to_builtins(on.experts.stats()), msgspec.to_builtins(off.experts.stats())
    assert (stats["host"]["hits"], stats["host"]["misses"]) == (off_stats["host"]["hits"], off_stats["host"]["misses"])
    ahead = stats["prefetch"]
    assert off_reads.ahead == [] and off_stats["prefetch"]["prefetched"] == 0
    assert ahead["prefetched"] == len(on_reads.ahead) > 0
    assert ahead["hits"] > 0 and ahead["hits"] + ahead["waste"] == ahead["prefetched"]
    # read-ahead used = what the run without it read synchronously and this one did not
    used = Counter(off_reads.sync) - Counter(on_reads.sync)
    assert not Counter(on_reads.sync) - Counter(off_reads.sync)
    assert used.total() == ahead["hits"] == len(off_reads.sync) - len(on_reads.sync)
    assert not used - Counter(on_reads.ahead)
    assert len(on_reads.sync) == stats["host"]["misses"] - ahead["hits"] == ahead["sync_misses"]
    total = (len(on_reads.sync) + len(on_reads.ahead)) * expert_bytes
    assert total == on.reader.bytes_read - on.dense_bytes  # the reader's own count agrees
    assert total == stats["storage"]["bytes_read"] == (stats["host"]["misses"] + ahead["waste"]) * expert_bytes
    assert ahead["bytes_read"] == len(on_reads.ahead) * expert_bytes
    assert on.stats()["expert_cache"]["prefetch"] == ahead
    off.close()
    on.close()


def hf_next_router_choices(hf_model, sequences: list[torch.Tensor], last_only: bool) -> list[set[int]]:
    """For layers 1..L-1: the union over the step's tokens of the top-k that layer's router (transformers' module)
    picks for the residual stream entering the previous layer's MoE block, normalised by the layer's own
    post-attention norm module. `last_only`: a decode step (the last token of each sequence)."""
    layers = hf_model.model.layers
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
    hooks = [layer.post_attention_layernorm.register_forward_pre_hook(
        lambda module, args, i=i: captured[i].append(args[0][0])) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for sequence in sequences:
                hf_model(sequence[None])
    finally:
        for hook in hooks:
            hook.remove()
    choices = []
    for i in range(len(layers) - 1):
        nxt = layers[i + 1]
        picked = set()
        for residual in captured[i]:
            rows = residual[-1:] if last_only else residual
            with torch.no_grad():
                probs = torch.softmax(torch.nn.functional.linear(nxt.post_attention_layernorm(rows), nxt.mlp.gate.weight), -1)
            picked |= set(torch.topk(probs, hf_model.config.num_experts_per_tok, dim=-1).indices.flatten().tolist())
        choices.append(picked)
    return choices


def test_prefetched_experts_are_the_next_routers_top_k(hf_model, converted):
    """With no cache, each layer i+1 reads ahead exactly what transformers' layer-(i+1) router and norm pick from
    the residual stream entering layer i's MoE block; for a prompt, decode steps and a batched decode step."""
    forward = QwenMoeForward(converted["per_expert"], LoadOptions(host_cache=0, extra={
        "expert_prefetch": True, "expert_prefetch_limit": EVERY_PREDICTION}))
    reads = CountingReader(forward.reader)
    forward.experts.reader = reads
    layers = forward.config.num_hidden_layers

    def read_ahead() -> list[set[int]]:
        got = [set(forward.experts.counters.last_prefetch_by_layer[i].read) for i in range(1, layers)]
        assert got == [set(forward.experts.counters.last_prefetch_by_layer[i].predicted) for i in range(1, layers)]
        return got

    prompt = torch.randint(0, 512, (3,), generator=torch.Generator().manual_seed(12))
    cache = forward.new_cache(16)
    token = forward.prefill(prompt, cache).argmax().reshape(1)
    assert read_ahead() == hf_next_router_choices(hf_model, [prompt], last_only=False)
    sequence = prompt
    for _ in range(3):
        sequence = torch.cat([sequence, token])
        token = forward.decode(token, [cache]).argmax(-1)
        assert read_ahead() == hf_next_router_choices(hf_model, [sequence], last_only=True)
    other = torch.tensor([40, 41, 42, 43])
    other_cache = forward.new_cache(16)
    forward.prefill(other[:-1], other_cache)
    forward.decode(torch.cat([token, other[-1:]]), [cache, other_cache])
    sequence = torch.cat([sequence, token])
    assert read_ahead() == hf_next_router_choices(hf_model, [sequence, other], last_only=True)
    assert forward.experts.counters.prefetched == len(reads.ahead)
    forward.close()


def test_predictions_come_most_likely_first():
    """The read-ahead list is ordered by the routing weight the rows give each expert (summed), computed here from
    softmax, top-k and renormalisation directly, so a limit keeps the likeliest experts."""
    from gdsllm_qwen_moe.experts import predict_experts

    generator = torch.Generator().manual_seed(3)
    router, x = torch.randn(64, 16, generator=generator), torch.randn(3, 16, generator=generator)
    top = torch.softmax(x @ router.T, dim=-1).topk(4, dim=-1)
    weights = top.values / top.values.sum(dim=-1, keepdim=True)
    score: dict[int, float] = {}
    for ids, row in zip(top.indices.tolist(), weights.tolist(), strict=True):
        for expert, weight in zip(ids, row, strict=True):
            score[expert] = score.get(expert, 0.0) + weight
    want = sorted(score, key=lambda e: (-score[e], e))
    assert predict_experts(x, router, 4, 100) == want
    assert predict_experts(x, router, 4, 5) == want[:5]


def test_decode_reads_ahead_before_computing_its_own_experts(converted, monkeypatch):
    """In decode (up to DENSE_TOKENS rows) the next layer's read-ahead is submitted right behind the layer's own
    reads, before any of its experts is computed (the disk goes straight on to the next layer); for a longer prompt
    chunk, after them."""
    from gdsllm_qwen_moe import experts

    log: list[tuple[str, int]] = []
    original_ffn = experts.expert_ffn
    streaming = {}  # the layer whose experts are being handed out

    def ffn(x, ew, *args):
        log.append(("compute", streaming["layer"]))
        return original_ffn(x, ew, *args)

    monkeypatch.setattr(experts, "expert_ffn", ffn)
    monkeypatch.setattr(experts, "expert_ffn_grouped", lambda *args: False)  # every expert through `ffn`
    forward = QwenMoeForward(converted["per_expert"], LoadOptions(host_cache=0, extra={"expert_prefetch": True}))
    original_stream = forward.experts.stream_groups

    def stream_groups(layer, selected):
        streaming["layer"] = layer
        return original_stream(layer, selected)

    forward.experts.stream_groups = stream_groups
    reads = CountingReader(forward.reader)
    forward.experts.reader = reads
    original_submit = reads.submit

    def submit(extents, destinations):
        log.append(("ahead", int(extents[0].name.split(".")[1])))
        return original_submit(extents, destinations)

    reads.submit = submit
    cache = forward.new_cache(32)
    prompt = torch.arange(3, 3 + 2 * DENSE_TOKENS)  # more rows than DENSE_TOKENS
    token = forward.prefill(prompt, cache).argmax().reshape(1)
    layers = forward.config.num_hidden_layers
    for mode in ("prefill", "decode"):
        computes = {layer: log.index(("compute", layer)) for layer in range(layers - 1)}
        for layer in range(layers - 1):
            if ("ahead", layer + 1) not in log:
                continue  # every expert predicted was cached or on its way
            ahead = log.index(("ahead", layer + 1))
            assert (ahead < computes[layer]) == (mode == "decode"), (mode, layer, log)
        log.clear()
        if mode == "prefill":
            forward.decode(token, [cache])
    forward.close()


def test_read_ahead_limit_and_budget(converted):
    """With a budget of 3 experts and at most 1 expert read ahead per layer: logits unchanged, each read-ahead is
    one expert started with the cache within budget and nothing else in flight."""
    entry = converted["per_expert"]
    expert_bytes = entry.manifest.extent("blk.0.expert.0").nbytes
    off_logits, off, _ = run(entry, False, 3 * expert_bytes)
    on_logits, on, reads = run(entry, True, 3 * expert_bytes, limit=1)
    for a, b in zip(off_logits, on_logits, strict=True):
        assert torch.equal(a, b)
    assert reads.ahead_batches and set(reads.ahead_batches) == {1}
    assert all(len(v.predicted) == 1 for v in on.experts.counters.last_prefetch_by_layer.values())
    assert len(on.experts.cached_keys()) * expert_bytes <= 3 * expert_bytes and on.experts.pending_bytes == 0
    off.close()
    on.close()
    with pytest.raises(BadRequestError, match="expert_prefetch_limit"):
        QwenMoeForward(entry, LoadOptions(extra={"expert_prefetch": True, "expert_prefetch_limit": 0}))


def test_streaming_bench_compares_prefetch_on_and_off(tmp_path):
    """`python -m gdsllm_qwen_moe.bench --prefetch-limits 6` (tiny shapes, host cache off, on the CPU where
    read-ahead is off by default): per cold step, the bytes read are the routed experts plus the wasted read-ahead,
    and the routed experts are read ahead or synchronously."""
    from gdsllm_qwen_moe import bench

    result = bench.main(["--root", str(tmp_path), "--tiny", "--layers", "4", "--device", "cpu", "--steps", "2",
                         "--ceiling-gb", "0.0005", "--zipf-tokens", "2", "--budget-gb", "0.0004",
                         "--prefetch-limits", "6"])
    layers, top_k, expert_bytes = 4, 4, result["expert_bytes"]
    assert result["prefetch"]["enabled"] is False
    for row in result["cold"]["steps"]:
        assert row["prefetch"]["prefetched"] == 0 and row["bytes_per_layer"] * layers == layers * top_k * expert_bytes
    for row in result["cold_prefetch_6"]["steps"]:
        ahead = row["prefetch"]
        assert 0 < ahead["prefetched"] <= (layers - 1) * 6  # layers 1..3, at most 6 each
        assert ahead["hits"] + ahead["sync_misses"] == layers * top_k
        assert row["bytes_per_layer"] * layers == (layers * top_k + ahead["waste"]) * expert_bytes
        assert row["requested_bytes_per_layer"] * layers == layers * top_k * expert_bytes  # waste left out
    assert result["prefetch_6_speedup"] > 0


def test_gdsllm_bench_reports_prefetch_figures(converted):
    from gdsllm_core.bench import bench_forward, format_report

    entry = converted["per_expert"]
    expert_bytes = entry.manifest.extent("blk.0.expert.0").nbytes
    forward = QwenMoeForward(entry, LoadOptions(host_cache=4 * expert_bytes, extra={"expert_prefetch": True}))
    try:
        result = bench_forward(forward, entry, 4, 2)
        counters = forward.experts.counters
    finally:
        forward.close()
    whole = result["expert_cache"]["prefetch"]
    assert (whole["prefetched"], whole["hits"], whole["waste"]) == \
           (counters.prefetched, counters.prefetch_hits, counters.prefetch_waste)
    decode = result["batches"][0]["tg_expert_cache"]
    assert decode["bytes_read"] == (decode["misses"] + decode["prefetch"]["waste"]) * expert_bytes
    assert decode["prefetch"]["hits"] + decode["prefetch"]["sync_misses"] == decode["misses"]
    rows = dict(format_report({"model": "tiny", "device": "cpu", "pp": 4, "tg": 2, **result}))
    assert rows["expert read-ahead, whole run"].startswith(f"{counters.prefetched} experts read ahead")
