"""The two-tier expert cache (VRAM tier in front of the host tier), exercised on the CPU: the VRAM tier is
device-agnostic, so with device "cpu" it holds copies in host memory. Checked against a brute-force simulation of
the two tiers, the stored bytes (pread of the weight file) and the reader's own byte count."""

import os

import msgspec
import torch

from gdsllm_core.engine.forward import LoadOptions
from gdsllm_qwen_moe.experts import expert_residency
from gdsllm_qwen_moe.forward import QwenMoeForward
from gdsllm_qwen_moe.weights import AffineWeight


class BruteForceTiers:
    """Two LFU tiers as lists (ties: least recently used; a newcomer never displaces a hotter expert; experts of
    the current step stay): requests refresh every tier holding the expert; after the step the host tier admits
    the storage misses, then the VRAM tier everything it did not serve, both in request order."""

    def __init__(self, host_slots: int, vram_slots: int):
        self.slots = {"host": host_slots, "vram": vram_slots}
        self.held = {"host": [], "vram": []}
        self.last_use = {"host": {}, "vram": {}}
        self.frequency: dict[tuple[int, int], int] = {}
        self.clock = 0
        self.counts = {"vram": 0, "host": 0, "miss": 0}

    def _admit(self, tier: str, name: tuple[int, int], step: list[tuple[int, int]]) -> None:
        held, last_use = self.held[tier], self.last_use[tier]
        while len(held) >= self.slots[tier]:
            others = [n for n in held if n not in step]
            victim = min(others, key=lambda n: (self.frequency[n], last_use[n])) if others else None
            if victim is None or self.frequency[victim] > self.frequency[name]:
                return
            held.remove(victim)
        held.append(name)
        self.clock += 1
        last_use[name] = self.clock

    def step(self, names: list[tuple[int, int]]) -> None:
        served = {}
        for name in names:
            self.frequency[name] = self.frequency.get(name, 0) + 1
            for tier in ("vram", "host"):
                if name in self.held[tier]:
                    self.clock += 1
                    self.last_use[tier][name] = self.clock
            served[name] = "vram" if name in self.held["vram"] else "host" if name in self.held["host"] else "miss"
            self.counts[served[name]] += 1
        for name in names:
            if served[name] == "miss":
                self._admit("host", name, names)
        for name in names:
            if served[name] != "vram":
                self._admit("vram", name, names)


def test_two_tiers_follow_a_brute_force_model_and_count_reads(converted):
    entry = converted["per_expert"]
    expert_bytes = entry.manifest.extent("blk.0.expert.0").nbytes
    forward = QwenMoeForward(entry, LoadOptions(host_cache=0))
    cache = expert_residency(forward.reader, entry.manifest, budget_bytes=3 * expert_bytes, device=torch.device("cpu"),
                        vram_budget_bytes=2 * expert_bytes)
    model = BruteForceTiers(host_slots=3, vram_slots=2)
    rng = torch.Generator().manual_seed(1)
    popularity = 1.0 / torch.arange(1, 9, dtype=torch.float64) ** 1.1
    read_before = forward.reader.bytes_read
    fd = os.open(entry.path / entry.manifest.extents[0].file, os.O_RDONLY)
    try:
        for step in range(80):
            layer = step % 2
            experts = torch.multinomial(popularity, 2, generator=rng).tolist()
            got = cache.get(layer, experts)
            model.step([(layer, e) for e in experts])
            assert cache.vram_keys() == set(model.held["vram"]) and cache.cached_keys() == set(model.held["host"])
            assert cache.vram.cached_bytes <= 2 * expert_bytes and cache.cached_bytes <= 3 * expert_bytes
            for expert in experts:  # whatever tier served it, the weights are the stored bytes
                extent = entry.manifest.extent(f"blk.{layer}.expert.{expert}")
                name = f"{extent.name}.ffn_down.weight"
                info = next(t for t in extent.tensors if t.name == name)
                stored = os.pread(fd, info.nbytes, extent.offset + info.offset)
                weight = got[expert]["ffn_down.weight"]
                data = weight.packed if isinstance(weight, AffineWeight) else weight
                assert data.contiguous().numpy().tobytes() == stored
    finally:
        os.close(fd)
    stats = msgspec.to_builtins(cache.stats())
    assert (stats["vram"]["hits"], stats["host"]["hits"], stats["host"]["misses"]) == \
           (model.counts["vram"], model.counts["host"], model.counts["miss"])
    assert model.counts["vram"] > 0 and model.counts["host"] > 0  # both tiers served something on this trace
    assert stats["storage"]["bytes_read"] == model.counts["miss"] * expert_bytes
    assert forward.reader.bytes_read - read_before == model.counts["miss"] * expert_bytes  # the reader agrees
    assert stats["requests"] == 160 and stats["hit_rate"] == (160 - model.counts["miss"]) / 160
    forward.close()


def test_forward_with_a_vram_tier_counts_per_tier(converted):
    """The tiers change where experts come from, never the logits; stats() reports per tier and per token."""
    entry = converted["per_expert"]
    expert_bytes = entry.manifest.extent("blk.0.expert.0").nbytes
    prompt = torch.tensor([3, 141, 59, 26, 5])
    results = []
    for vram in (0, 6 * expert_bytes):
        forward = QwenMoeForward(entry, LoadOptions(host_cache=4 * expert_bytes,
                                                    extra={"expert_vram_bytes": vram}))
        cache = forward.new_cache(16)
        logits = [forward.prefill(prompt, cache)]
        for _ in range(4):
            logits.append(forward.decode(logits[-1].argmax(-1).reshape(1), [cache]))
        stats = forward.stats()
        experts = stats["expert_cache"]
        assert experts["vram"]["cached_bytes"] <= vram and experts["host"]["cached_bytes"] <= 4 * expert_bytes
        requests = experts["vram"]["hits"] + experts["host"]["hits"] + experts["host"]["misses"]
        assert requests == experts["requests"] > 0
        assert experts["storage"]["bytes_read"] == experts["host"]["misses"] * expert_bytes
        assert stats["expert_bytes_read_per_token"] == experts["storage"]["bytes_read"] / 9
        assert stats["experts_per_token"]["vram_hits"] == experts["vram"]["hits"] / 9
        results.append((torch.stack([row.reshape(-1) for row in logits]), experts))
        forward.close()
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1]["vram"]["hits"] == 0 and results[1][1]["vram"]["hits"] > 0
    assert results[1][1]["host"]["misses"] < results[0][1]["host"]["misses"]  # the extra tier saves reads
