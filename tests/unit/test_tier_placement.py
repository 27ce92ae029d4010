"""How the GPU residency places layers that do not all fit in VRAM (`place_streamed_layers`): the ring's buffers
come out of the VRAM room first, layers fill VRAM, then pinned host RAM, then storage, in order; the deeper ring
is taken only where some layer lands in host RAM (CPU-computed layers are host-tier ones)."""

from dataclasses import dataclass

from gdsllm_core.runtime.residency import RING_SLOTS, RING_SLOTS_WITH_CPU, place_streamed_layers

MB = 1 << 20


@dataclass
class Layer:
    name: str
    nbytes: int


LAYERS = [Layer(f"blk.{i}", 100 * MB) for i in range(12)]
CPU_DEPTHS = [RING_SLOTS_WITH_CPU, RING_SLOTS]


def counts(tiers: dict[str, str]) -> dict[str, int]:
    return {tier: list(tiers.values()).count(tier) for tier in ("vram", "host", "storage")}


def test_layers_fill_vram_then_host_then_storage_beside_the_ring():
    slots, tiers = place_streamed_layers(LAYERS, (RING_SLOTS + 3) * 100 * MB, 4 * 100 * MB, 12, [RING_SLOTS])
    assert slots == RING_SLOTS and counts(tiers) == {"vram": 3, "host": 4, "storage": 5}
    assert [tiers[layer.name] for layer in LAYERS] == ["vram"] * 3 + ["host"] * 4 + ["storage"] * 5


def test_max_layers_caps_vram_like_ngl():
    _, tiers = place_streamed_layers(LAYERS, 1 << 40, 1 << 40, 2, [RING_SLOTS])
    assert counts(tiers) == {"vram": 2, "host": 10, "storage": 0}


def test_the_deeper_ring_only_serves_host_tier_layers():
    room = (RING_SLOTS_WITH_CPU + 2) * 100 * MB
    slots, tiers = place_streamed_layers(LAYERS, room, 5 * 100 * MB, 12, CPU_DEPTHS)
    assert slots == RING_SLOTS_WITH_CPU and counts(tiers) == {"vram": 2, "host": 5, "storage": 5}
    slots, tiers = place_streamed_layers(LAYERS, room, 0, 12, CPU_DEPTHS)  # nothing in host RAM: the plain ring,
    assert slots == RING_SLOTS and counts(tiers)["vram"] == 2 + RING_SLOTS_WITH_CPU - RING_SLOTS  # more resident


def test_a_budget_too_small_for_the_deep_ring_falls_back_and_then_fails():
    slots, _ = place_streamed_layers(LAYERS, RING_SLOTS * 100 * MB, 1 << 40, 12, CPU_DEPTHS)
    assert slots == RING_SLOTS
    assert place_streamed_layers(LAYERS, RING_SLOTS * 100 * MB - 1, 1 << 40, 12, CPU_DEPTHS) is None
