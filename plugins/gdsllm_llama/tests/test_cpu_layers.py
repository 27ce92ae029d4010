"""CPU-computed layers (gdsllm_llama.cpu_layers): Q4_0/Q4_1 blocks packed for torch's CPU int4 kernel against
gguf-py's dequantization, packed layers against the fp32 CPU reference forward, the KV hand-over between the GPU
layout and the CPU caches, and the placement arithmetic (gdsllm_core.runtime.cpu_plan)."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from llama_testing import random_blocks, write_llama_gguf

from gdsllm_core.convert import convert
from gdsllm_core.engine.forward import LoadOptions
from gdsllm_core.errors import BadRequestError
from gdsllm_core.layout.store import ModelStore
from gdsllm_core.runtime.cpu_plan import plan_cpu_layers, simulate_step_seconds, spread
from gdsllm_core.runtime.residency import cpu_layers_option
from gdsllm_llama.cpu_layers import (
    LAYER_OVERHEAD_S,
    CpuLayers,
    PackedLayer,
    PackedMatrix,
    can_run_on_cpu,
    packed_layer_nbytes,
)
from gdsllm_llama.forward import LlamaForward, rms_norm

if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
    pytest.skip("this torch has no CPU int4 kernel", allow_module_level=True)

DIM, FFN, HEADS, KV_HEADS, VOCAB, LAYERS = 64, 128, 4, 2, 256, 2


def reference_matrix(raw: np.ndarray, qtype: str) -> torch.Tensor:
    rows = raw.shape[0]
    return torch.from_numpy(gguf_dequantize(raw, GGMLQuantizationType[qtype]).reshape(rows, -1)).double()


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_packed_matmul_matches_gguf_dequantize(qtype):
    """40 rows (padded to 48 for the kernel) of 256 values, 3 input rows: x @ W^T against gguf-py's weights. The
    kernel rounds scales and results to bf16 (8 significant bits): each output is within 1 % of max |output|."""
    rng = np.random.default_rng(3)
    raw = random_blocks(qtype, 40, 256, rng)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(1))
    want = x.bfloat16().double() @ reference_matrix(raw, qtype).T
    got = x @ PackedMatrix.from_blocks([(torch.from_numpy(raw), qtype)])
    assert got.shape == (3, 40) and got.dtype == torch.float32
    error = (got.double() - want).abs().max().item()
    assert error <= 0.01 * want.abs().max().item(), f"{qtype}: max error {error:.4g}"


def test_packed_matmul_exact_scales_round_only_the_result():
    """With bf16-representable scales the only rounding left is the bf16 result: every output within 2^-8 of
    itself (plus a summation allowance), which a wrong nibble order or block layout could not meet."""
    rng = np.random.default_rng(5)
    raw = random_blocks("Q4_0", 32, 128, rng)
    scales = raw.reshape(-1, 18)[:, :2].copy().view(np.float16).astype(np.float32)
    exact = torch.from_numpy(scales).bfloat16().float().numpy().astype(np.float16)
    raw.reshape(-1, 18)[:, :2] = exact.view(np.uint8).reshape(-1, 2)
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(2)).bfloat16().float()
    want = x.double() @ reference_matrix(raw, "Q4_0").T
    got = (x @ PackedMatrix.from_blocks([(torch.from_numpy(raw), "Q4_0")])).double()
    assert ((got - want).abs() <= want.abs() * 2**-8 + 1e-3 * want.abs().max()).all()


def test_stacked_parts_keep_their_rows():
    rng = np.random.default_rng(7)
    parts = [(random_blocks("Q4_0", 16, 64, rng), "Q4_0"), (random_blocks("Q4_1", 32, 64, rng), "Q4_1")]
    x = torch.randn(1, 64)
    got = x @ PackedMatrix.from_blocks([(torch.from_numpy(raw), qtype) for raw, qtype in parts])
    want = torch.cat([x.bfloat16().double() @ reference_matrix(raw, qtype).T for raw, qtype in parts], dim=-1)
    assert (got.double() - want).abs().max() <= 0.01 * want.abs().max()


def tiny_gguf(path, qtype: str = "Q4_0"):
    rng = np.random.default_rng(11)
    kv = KV_HEADS * DIM // HEADS
    shapes = {"attn_q": (DIM, DIM), "attn_k": (kv, DIM), "attn_v": (kv, DIM), "attn_output": (DIM, DIM),
              "ffn_gate": (FFN, DIM), "ffn_up": (FFN, DIM), "ffn_down": (DIM, FFN)}
    tensors = {"token_embd.weight": (random_blocks("Q8_0", VOCAB, DIM, rng), "Q8_0"),
               "output.weight": (random_blocks("Q8_0", VOCAB, DIM, rng), "Q8_0"),
               "output_norm.weight": (rng.uniform(0.5, 1.5, DIM).astype(np.float32), "F32")}
    for i in range(LAYERS):
        for name, shape in shapes.items():
            tensors[f"blk.{i}.{name}.weight"] = (random_blocks(qtype, *shape, rng), qtype)
        for norm in ("attn_norm", "ffn_norm"):
            tensors[f"blk.{i}.{norm}.weight"] = (rng.uniform(0.5, 1.5, DIM).astype(np.float32), "F32")
    return write_llama_gguf(path, tensors, n_layers=LAYERS, dim=DIM, n_heads=HEADS, n_kv_heads=KV_HEADS,
                            ffn_dim=FFN, vocab_size=VOCAB, context_length=512)


@pytest.fixture(scope="module", params=["Q4_0", "Q4_1"])
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"cpu-layers-{request.param}")
    entry = convert(tiny_gguf(folder / "tiny.gguf", request.param), ModelStore(folder / "models"), "tiny")
    forward = LlamaForward(entry, LoadOptions(device="cpu"))
    yield entry, forward
    forward.close()


def packed_layers(entry, forward) -> dict[int, PackedLayer]:
    return {i: PackedLayer.from_views(entry.manifest.extent(f"blk.{i}"), forward.residency.fetch(f"blk.{i}"))
            for i in range(LAYERS)}


def assert_logits_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    error = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert error <= 0.03 * scale, f"{what}: logits differ by {error:.4f} (max |logit| {scale:.2f})"
    top2 = want.topk(2).values
    if (top2[0] - top2[1]).item() > 4 * error:  # a clear margin: the same greedy token
        assert got.argmax().item() == want.argmax().item(), what


def test_packed_layers_match_reference_forward(tiny):
    """The reference forward run once with its fp32 layers and once with the packed ones (the same
    `layer_forward`): prompt logits and 4 teacher-forced decode steps within bf16 tolerance."""
    entry, reference = tiny
    assert all(can_run_on_cpu(entry.manifest.extent(f"blk.{i}")) for i in range(LAYERS))
    hybrid = LlamaForward(entry, LoadOptions(device="cpu"))
    try:
        layers = packed_layers(entry, hybrid)
        for i, layer in layers.items():
            assert layer.nbytes == packed_layer_nbytes(entry.manifest.extent(f"blk.{i}"))
        hybrid._layers.update(layers)  # the reference's per-layer weight cache, filled with the packed layers
        prompt, steps = torch.tensor([1, 17, 200, 5, 99]), [42, 7, 250, 3]
        caches = [reference.new_cache(32), hybrid.new_cache(32)]
        want, got = reference.prefill(prompt, caches[0]), hybrid.prefill(prompt, caches[1])
        assert_logits_close(got, want, "prefill")
        for token in steps:
            want = reference.decode(torch.tensor([token]), [caches[0]])[0]
            got = hybrid.decode(torch.tensor([token]), [caches[1]])[0]
            assert_logits_close(got, want, f"decode {token}")
    finally:
        hybrid.close()


class FakeGpuCache:
    """The GPU cache's layout on the CPU: k, v [n_layers, max_tokens, KV, hd] fp16, `length`, `max_tokens`."""

    def __init__(self, max_tokens: int):
        self.max_tokens, self.length = max_tokens, 0
        shape = (LAYERS, max_tokens, KV_HEADS, DIM // HEADS)
        self.k = torch.zeros(shape, dtype=torch.float16)
        self.v = torch.zeros(shape, dtype=torch.float16)


class FakeResidency:
    copy_chunk_bytes = 0

    def __init__(self):
        self.counters = {"cpu_layer_runs": 0, "cpu_compute_ns": 0}
        self.active: list[frozenset[str]] = []
        self.gbps: float | None = None  # the copy speed decoding measured (None: not yet)

    def placement(self) -> dict[str, list[str]]:
        return {"host": []}

    def set_cpu_active(self, names: frozenset[str]) -> None:
        self.active.append(names)

    def recent_copy_gbps(self) -> float | None:
        return self.gbps

    def record_cpu_layer(self, nanoseconds: int) -> None:
        self.counters["cpu_layer_runs"] += 1
        self.counters["cpu_compute_ns"] += nanoseconds

    def layer_tiers(self) -> list[str]:
        return ["ring"] * LAYERS

    ring_slots = 3


def test_kv_moves_between_gpu_layout_and_cpu_layers(tiny):
    """A 300-token prompt prefilled by the reference and written into a GPU-layout cache (as the GPU prefill leaves
    it), then one decode step with both layers on the CPU (their KV rows come over first, into a CPU cache grown
    past its first 256 positions), then a step too large for the CPU (2 rows, only 1 measured): the CPU-computed
    rows go back into the GPU layout."""
    entry, reference = tiny
    config = reference.config
    prompt, token = torch.randint(0, VOCAB, (300,), generator=torch.Generator().manual_seed(4)), 11
    ref_cache = reference.new_cache(320)
    reference.prefill(prompt, ref_cache)
    gpu = FakeGpuCache(320)
    T = prompt.numel()
    gpu.k[:, :T] = ref_cache.k[:, :, :T].transpose(1, 2).half()
    gpu.v[:, :T] = ref_cache.v[:, :, :T].transpose(1, 2).half()
    gpu.length = T
    scheduler = FakeResidency()
    cpu = CpuLayers(config, scheduler, packed_layers(entry, reference), seconds={1: 1e-4}, copy_s=1e-3, gpu_s=0.0,
                    layer_bytes=entry.manifest.extent("blk.0").nbytes, fixed_count=LAYERS)
    active = cpu.begin_step([gpu], 1)
    assert active == {0, 1} and scheduler.active[-1] == {"blk.0", "blk.1"}
    h = reference.embed(torch.tensor([token])).clone()
    for layer in sorted(active):
        cpu.run_layer(layer, h)
    logits = rms_norm(h, reference._dense["output_norm"], config.rms_eps) @ reference._dense["output"]
    want = reference.decode(torch.tensor([token]), [ref_cache])[0]
    assert_logits_close(logits[0], want, "decode on the CPU layers")
    assert scheduler.counters["cpu_layer_runs"] == 2
    gpu.length += 1
    other = FakeGpuCache(320)
    assert cpu.begin_step([gpu, other], 1) == frozenset() and scheduler.active[-1] == frozenset()
    for layer in range(LAYERS):  # position T came back from the CPU caches, close to the reference's keys
        want_k = ref_cache.k[layer, :, T]
        assert (gpu.k[layer, T].float() - want_k).abs().max() <= 0.03 * want_k.abs().max()
        assert torch.equal(gpu.k[layer, :T], ref_cache.k[layer, :, :T].transpose(0, 1).half())


def test_auto_replans_from_speeds_measured_while_decoding(tiny):
    """Auto placement plans from the load-time figures, then from what decoding measures once a speed drifts by
    more than 15 %: slow copies send both layers to the CPU, fast copies none; a small drift changes nothing."""
    entry, reference = tiny
    scheduler = FakeResidency()
    cpu = CpuLayers(reference.config, scheduler, packed_layers(entry, reference), seconds={1: 3e-3}, copy_s=1e-3,
                    gpu_s=0.0, layer_bytes=10**6)
    assert cpu.plan(1) == frozenset()  # 3.9 ms a CPU layer against 1 ms a copy: stream both
    scheduler.gbps = 0.1  # copies measured at 10 ms
    assert cpu.plan(1) == {0, 1}
    scheduler.gbps = 0.105  # within 15 % of the figure that plan used
    cpu.seconds_in_use[1] = 3.1e-3
    assert cpu.plan(1) == {0, 1}
    scheduler.gbps = 1000.0  # copies now take a microsecond
    assert cpu.plan(1) == frozenset()
    assert cpu.stats()["plans"] == {1: 0}


SEVEN_B = ["vram"] * 8 + ["ring"] * 24  # LLaMA-7B with 8 layers in VRAM, 24 streamed


def test_streaming_alone_is_copy_bound():
    assert simulate_step_seconds(SEVEN_B, 2.15e-3, 4e-3, 0.1e-3) == pytest.approx(24 * 2.15e-3, rel=0.03)


def test_a_cpu_layer_longer_than_the_ring_leaves_the_copy_stream_idle():
    """A 20 ms CPU layer: 3 ring slots keep only 2 copies queued through it, 8 slots keep 7."""
    tiers = [*SEVEN_B[:20], "cpu", *SEVEN_B[21:]]
    shallow, deep = (simulate_step_seconds(tiers, 2.15e-3, 20e-3, 0.1e-3, slots) for slots in (3, 8))
    assert shallow - deep > 5e-3 and deep >= 23 * 2.15e-3


def test_simulation_matches_the_h100_runs():
    """Decode ms/token measured on the H100 (2026-11-25, 7B Q4_0, 8 layers in VRAM, 3 ring slots, whole-layer
    copies of 2.15 ms, 3.45 ms a CPU layer alone): benchmarks/cpu_layers_probe.py's sweep (16 layers placed on the
    CPU, k of them computed there) and `gdsllm bench --cpu-layers auto` of the first call (9 of 24, 2.09 ms copies,
    49.16 ms). With the wait of h's device-to-host copy for the copy operation in progress, the simulation lands
    within 12 % of each and picks the sweep's best count; without that wait it cannot fit them."""
    placed = [8, 10, 11, 13, 14, 16, 17, 19, 20, 22, 23, 25, 26, 28, 29, 31]
    measured = {0: 50.97, 4: 45.0, 6: 45.5, 8: 43.3, 10: 57.2, 12: 64.1, 14: 61.7, 16: 70.4}

    def step_ms(chosen: list[int], copy_s: float, cpu_s: float, dma_wait_s: float) -> float:
        tiers = ["cpu" if i in set(chosen) else tier for i, tier in enumerate(SEVEN_B)]
        return simulate_step_seconds(tiers, copy_s, cpu_s + LAYER_OVERHEAD_S, 0.114e-3, 3, dma_wait_s) * 1e3

    simulated = {k: step_ms(spread(placed, k), 2.15e-3, 3.45e-3, 2.15e-3) for k in measured}
    for k, ms in simulated.items():
        assert ms == pytest.approx(measured[k], rel=0.12), (k, ms)
    assert min(simulated, key=simulated.get) == min(measured, key=measured.get) == 8
    assert step_ms(spread(list(range(8, 32)), 9), 2.09e-3, 3.3e-3, 2.09e-3) == pytest.approx(49.16, rel=0.12)
    no_wait = [step_ms(spread(placed, k), 2.15e-3, 3.45e-3, 0.0) for k in (10, 12)]
    assert all(ms < 0.85 * measured[k] for ms, k in zip(no_wait, (10, 12), strict=True))


def test_plan_takes_fewer_cpu_layers_as_the_batch_grows():
    """CPU seconds per layer measured on the H100 for 1, 2, 4, 8, 16 rows, a copy at 2.13 ms in 16 MiB pieces
    (0.31 ms), 6 ring slots: the count falls with the rows and is none at 16, where one CPU layer outlasts the
    queued copies. Whole-layer copies through a 3-slot ring make CPU layers worth less."""
    candidates = list(range(8, 32))

    def count(cpu_s: float, slots: int = 6, dma_wait_s: float = 0.31e-3) -> int:
        return len(plan_cpu_layers(SEVEN_B, candidates, 2.13e-3, cpu_s + LAYER_OVERHEAD_S, 0.114e-3, slots,
                                   dma_wait_s=dma_wait_s))

    counts = [count(cpu_s) for cpu_s in (3.45e-3, 4.53e-3, 6.30e-3, 10.35e-3, 18.86e-3)]
    assert counts[0] >= 6 and counts == sorted(counts, reverse=True) and counts[-1] == 0
    assert count(6.30e-3, slots=3, dma_wait_s=2.13e-3) < counts[2]
    assert plan_cpu_layers(SEVEN_B, candidates, 2.13e-3, 1.0, 0.114e-3) == []
    assert len(plan_cpu_layers(SEVEN_B, candidates, 2.13e-3, 1e-3, 0.114e-3, 6, limit=3)) == 3


def test_spread_interleaves_cpu_layers():
    names = [f"blk.{i}" for i in range(8, 32)]
    assert spread(names, 12) == [f"blk.{i}" for i in range(9, 32, 2)]
    assert spread(names, 0) == [] and spread(names, 30) == names
    picked = spread(names, 5)
    gaps = np.diff([int(n.split(".")[1]) for n in picked])
    assert len(set(picked)) == 5 and gaps.min() >= 4 and gaps.max() <= 5


def test_cpu_layers_option():
    assert cpu_layers_option(None) == 0 and cpu_layers_option("auto") == "auto" and cpu_layers_option("AUTO") == "auto"
    assert cpu_layers_option("12") == 12 and cpu_layers_option(0) == 0
    for bad in ("-1", "some", 1.5j):
        with pytest.raises(BadRequestError, match="cpu_layers"):
            cpu_layers_option(bad)


def test_other_types_stay_streamed(tmp_path):
    """A layer holding a Q8_0 matrix is not computable on the CPU (it stays streamed)."""
    entry = convert(tiny_gguf(tmp_path / "q8.gguf", "Q8_0"), ModelStore(tmp_path / "models"), "q8")
    assert not can_run_on_cpu(entry.manifest.extent("blk.0"))
