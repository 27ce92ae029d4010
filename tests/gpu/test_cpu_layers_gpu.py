"""CPU-computed host-tier layers (gdsllm_llama.cpu_layers) inside the GPU forward pass: logits and greedy tokens
against the same placement with every layer on the GPU, through a CPU prefill, CPU decode, a GPU prefill and a
batch too large for the CPU (the KV hand-over both ways); bytes copied per step; auto placement; the host budget."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from gdsllm_core.engine.forward import LoadOptions  # noqa: E402

LAYERS = 6


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A random Q4_0 LLaMA (benchmarks/synth_llama_gguf.py: 6 layers, d 256, ffn 512, 4 heads / 2 KV heads)."""
    import gdsllm_llama.plugin
    from gdsllm_core import plugins
    from gdsllm_core.convert import convert
    from gdsllm_core.layout.store import ModelStore

    plugins.ensure_registered(gdsllm_llama.plugin, "llama")
    folder = tmp_path_factory.mktemp("cpu-layers")
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "synth_llama_gguf.py"
    gguf = folder / "synth.gguf"
    subprocess.run([sys.executable, str(script), str(gguf), "--type", "Q4_0", "--layers", str(LAYERS), "--d", "256",
                    "--ffn", "512", "--vocab", "1000", "--heads", "4", "--kv-heads", "2"], check=True,
                   capture_output=True)
    return convert(gguf, ModelStore(folder / "models"), "synth")


def forward_of(entry, cpu_layers, host_cache=None):
    from gdsllm_llama.forward_gpu import LlamaForwardGPU

    return LlamaForwardGPU(entry, LoadOptions(device="cuda", max_context=256, host_cache=host_cache,
                                              extra={"max_vram_layers": 2, "cpu_layers": cpu_layers}))


def assert_logits_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """bf16 products on the CPU against fp16 ones on the GPU; the same greedy token where the margin is clear."""
    error = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert error <= 0.03 * scale, f"{what}: logits differ by {error:.4f} (max |logit| {scale:.2f})"
    top2 = want.topk(2).values
    if (top2[0] - top2[1]).item() > 4 * error:
        assert got.argmax().item() == want.argmax().item(), what


def conversation(forward) -> tuple[list[torch.Tensor], list[dict]]:
    """Prefill 8 tokens; 5 greedy steps; prefill 20 more; 3 steps; a step of 17 sequences; 2 more steps. Every
    step feeds the all-GPU run's greedy tokens (fixed below), so both runs see the same inputs."""
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 1000, (28,), generator=generator)
    forced = torch.randint(3, 1000, (11,), generator=generator).tolist()
    others = [torch.randint(3, 1000, (4,), generator=generator) for _ in range(16)]
    cache = forward.new_cache(128)
    logits, steps = [forward.prefill(prompt[:8].cuda(), cache).float().cpu()], []

    def step(token: int) -> None:
        logits.append(forward.decode(torch.tensor([token], device="cuda"), [cache])[0].float().cpu())
        steps.append(dict(forward.stats()))

    for token in forced[:5]:
        step(token)
    logits.append(forward.prefill(prompt[8:].cuda(), cache).float().cpu())
    for token in forced[5:8]:
        step(token)
    caches = [cache] + [forward.new_cache(64) for _ in others]
    for other, other_cache in zip(others, caches[1:], strict=True):
        forward.prefill(other.cuda(), other_cache)
    batch = torch.tensor([forced[8]] + [int(o[0]) for o in others], device="cuda")
    logits.append(forward.decode(batch, caches)[0].float().cpu())
    steps.append(dict(forward.stats()))
    for token in forced[9:]:
        step(token)
    return logits, steps


def test_cpu_layers_match_the_all_gpu_path(synth, monkeypatch):
    import gdsllm_core.runtime.residency

    monkeypatch.setattr(gdsllm_core.runtime.residency, "COPY_CHUNK_BYTES", 64 << 10)  # ring copies in many pieces
    layer_bytes = synth.manifest.extent("blk.2").nbytes
    runs = {}
    for cpu_layers in (0, 2):
        forward = forward_of(synth, cpu_layers)
        try:
            runs[cpu_layers] = conversation(forward)
            placement = forward.residency.placement()
            runs_on_cpu = forward.stats().get("cpu_layer_runs", 0)
        finally:
            forward.close()
    # a fixed count runs on the CPU for steps of up to 16 rows: 10 one-sequence steps, the 8-token prefill and the
    # 16 prefills of 4 tokens, 2 layers each; the 20-token prefill and the 17-row step stream all 4 layers
    assert runs_on_cpu == 2 * (10 + 1 + 16)
    assert placement["cpu"] == ["blk.3", "blk.5"] and placement["host"] == ["blk.2", "blk.4"]
    (want, want_steps), (got, got_steps) = runs[0], runs[2]
    for index, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_logits_close(g, w, f"output {index}")
    host_bytes = [s["last_step"]["bytes_from_host"] for s in got_steps]
    assert host_bytes[3] == 2 * layer_bytes  # a steady one-sequence step copies only the 2 streamed layers
    assert want_steps[3]["last_step"]["bytes_from_host"] == 4 * layer_bytes
    assert host_bytes[8] >= 4 * layer_bytes  # the 17-row step streams all 4 host layers


def test_auto_keeps_tiny_layers_streamed(synth):
    """A tiny layer copies in microseconds while a CPU pass costs far more: auto places none on the CPU."""
    forward = forward_of(synth, "auto")
    try:
        assert "cpu" not in forward.residency.placement() and forward.cpu_layers is None
    finally:
        forward.close()


def test_cpu_copies_count_against_the_host_budget(synth):
    from gdsllm_llama.cpu_layers import packed_layer_nbytes

    layer_bytes = synth.manifest.extent("blk.2").nbytes
    packed = packed_layer_nbytes(synth.manifest.extent("blk.2"))
    pinned_only = forward_of(synth, 2, host_cache=4 * layer_bytes)
    try:  # the pinned tier fills the budget: no room for CPU copies
        assert "cpu" not in pinned_only.residency.placement()
    finally:
        pinned_only.close()
    one_more = forward_of(synth, 2, host_cache=4 * layer_bytes + packed)
    try:
        residency = one_more.residency
        assert residency.placement()["cpu"] == ["blk.4"]  # room for one packed layer
        assert residency._pinned.nbytes + residency.cpu_bytes <= 4 * layer_bytes + packed
    finally:
        one_more.close()
