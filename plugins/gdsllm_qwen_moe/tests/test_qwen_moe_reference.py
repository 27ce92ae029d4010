"""The converted tiny model against transformers' Qwen3_5MoeForCausalLM (fp32): logits for a prompt and 16 cached
decode steps, batched decode, and selective expert loading proven by counting bytes against HF's own router."""

import json

import pytest
import torch
from qwen_moe_helpers import convert_into, make_hf_model
from safetensors.torch import save_file

from gdsllm_core.engine.forward import LoadOptions
from gdsllm_qwen_moe.experts import expert_residency
from gdsllm_qwen_moe.forward import QwenMoeForward

pytestmark = pytest.mark.reference

PROMPT_LENGTH = 70  # more than one 64-token chunk of the chunked delta rule


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def hf_router_choices(model, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the top-k expert ids transformers' router picks for each token [T, k]."""
    with torch.no_grad():
        logits = model(tokens[None], output_router_logits=True).router_logits
    return [torch.topk(torch.softmax(lg.float(), -1), model.config.num_experts_per_tok, dim=-1).indices
            for lg in logits]


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")  # the name older transformers know too
def test_prompt_and_16_decode_steps_match_transformers(hf_model, converted, layout):
    forward = QwenMoeForward(converted[layout], LoadOptions(host_cache=1 << 20))
    prompt = torch.randint(0, hf_model.config.vocab_size, (PROMPT_LENGTH,), generator=torch.Generator().manual_seed(1))
    cache = forward.new_cache(PROMPT_LENGTH + 16)
    ours = forward.prefill(prompt, cache, all_logits=True)
    with torch.no_grad():
        out = hf_model(prompt[None], use_cache=True)
    assert relative_error(ours, out.logits[0]) < 1e-4
    hf_cache, token = out.past_key_values, out.logits[0, -1].argmax()
    for _ in range(16):  # teacher-forced with transformers' greedy token
        ours = forward.decode(token.reshape(1), [cache])[0]
        with torch.no_grad():
            out = hf_model(token.reshape(1, 1), past_key_values=hf_cache, use_cache=True)
        hf_cache, ref = out.past_key_values, out.logits[0, -1]
        assert relative_error(ours, ref) < 1e-4
        token = ref.argmax()
    assert cache.length == PROMPT_LENGTH + 16
    forward.close()


def test_batched_decode_equals_single(converted):
    entry = converted["per_expert"]
    prompts = [torch.arange(3, 12), torch.tensor([7, 300, 5, 61, 2])]
    steps = torch.tensor([[11, 40], [12, 41], [13, 42]])  # step s feeds steps[s, b] to sequence b
    singles = []
    for b, prompt in enumerate(prompts):
        forward = QwenMoeForward(entry, LoadOptions())
        cache = forward.new_cache(32)
        forward.prefill(prompt, cache)
        singles.append(torch.stack([forward.decode(steps[s, b:b + 1], [cache])[0] for s in range(len(steps))]))
        forward.close()
    forward = QwenMoeForward(entry, LoadOptions())
    caches = [forward.new_cache(32) for _ in prompts]
    for prompt, cache in zip(prompts, caches, strict=True):
        forward.prefill(prompt, cache)
    batched = torch.stack([forward.decode(steps[s], caches) for s in range(len(steps))])  # [S, B, V]
    for b in range(len(prompts)):
        assert relative_error(batched[:, b], singles[b]) < 1e-5
    assert [c.length for c in caches] == [len(p) + len(steps) for p in prompts]


def test_only_routed_experts_are_read(hf_model, converted):
    """With no cache, each layer reads exactly the experts transformers' router picks (union over the prompt,
    top-k per decode token) x the expert extent's size, and nothing else."""
    entry = converted["per_expert"]
    expert_bytes = entry.manifest.extent("blk.0.expert.0").nbytes
    assert {e.nbytes for e in entry.manifest.extents if ".expert." in e.name} == {expert_bytes}
    forward = QwenMoeForward(entry, LoadOptions(host_cache=0))
    read_before = forward.reader.bytes_read
    prompt = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(2))
    cache = forward.new_cache(24)
    logits = forward.prefill(prompt, cache)
    choices = hf_router_choices(hf_model, prompt)
    expected = [len(torch.unique(c)) * expert_bytes for c in choices]
    got = [forward.experts.counters.last_read_by_layer[layer].bytes for layer in range(4)]
    assert got == expected
    assert forward.reader.bytes_read - read_before == sum(expected)  # the reader's own count agrees
    sequence = prompt
    for _ in range(3):
        token = logits.argmax().reshape(1)
        sequence = torch.cat([sequence, token])
        before = forward.reader.bytes_read
        logits = forward.decode(token, [cache])[0]
        top_k = hf_model.config.num_experts_per_tok
        assert [forward.experts.counters.last_read_by_layer[layer].bytes for layer in range(4)] == [top_k * expert_bytes] * 4
        assert forward.reader.bytes_read - before == 4 * top_k * expert_bytes
        assert [sorted(c[-1].tolist()) for c in hf_router_choices(hf_model, sequence)] == \
               [sorted(forward.experts.counters.last_read_by_layer[layer].ids) for layer in range(4)]
    forward.close()


def test_warm_cache_reads_only_misses(hf_model, converted):
    entry = converted["per_expert"]
    expert_bytes = entry.manifest.extent("blk.0.expert.0").nbytes
    forward = QwenMoeForward(entry, LoadOptions(host_cache=32 * expert_bytes))  # every expert fits
    prompt = torch.randint(0, 512, (12,), generator=torch.Generator().manual_seed(3))
    first = forward.new_cache(16)
    logits = forward.prefill(prompt, first)
    choices = hf_router_choices(hf_model, prompt)
    seen = [set(c.flatten().tolist()) for c in choices]
    assert forward.experts.counters.bytes_read == sum(len(s) for s in seen) * expert_bytes
    before = forward.experts.counters.bytes_read
    again = forward.new_cache(16)
    assert torch.allclose(forward.prefill(prompt, again), logits, rtol=0, atol=1e-6)
    assert forward.experts.counters.bytes_read == before  # all hits
    assert forward.experts.counters.hits == sum(len(s) for s in seen)
    token = logits.argmax().reshape(1)
    forward.decode(token, [again])
    new = hf_router_choices(hf_model, torch.cat([prompt, token]))
    misses = sum(len(set(c[-1].tolist()) - s) for c, s in zip(new, seen, strict=True))
    assert forward.experts.counters.bytes_read - before == misses * expert_bytes
    stats = forward.stats()
    assert stats["expert_cache"]["host"]["hits"] + stats["expert_cache"]["host"]["misses"] == \
           2 * sum(len(s) for s in seen) + 4 * hf_model.config.num_experts_per_tok
    assert stats["expert_cache"]["storage"]["bytes_read"] == forward.experts.counters.bytes_read
    forward.close()


def test_cache_evicts_the_least_frequently_used_expert(converted):
    entry = converted["per_expert"]
    expert_bytes = entry.manifest.extent("blk.0.expert.0").nbytes
    forward = QwenMoeForward(entry, LoadOptions(host_cache=0))
    cache = expert_residency(forward.reader, entry.manifest, budget_bytes=2 * expert_bytes)
    for _ in range(3):
        cache.get(0, [0])  # expert 0 is hot
    cache.get(0, [1])
    cache.get(0, [2])  # full: evicts 1 (requested once), not 0 (requested 3 times)
    assert cache.cached_keys() == {(0, 0), (0, 2)}
    cache.get(0, [0])
    assert (cache.counters.hits, cache.counters.misses, cache.counters.evictions) == (3, 3, 1)
    assert cache.counters.bytes_read == 3 * expert_bytes
    forward.close()


def test_cache_follows_a_brute_force_lfu_on_a_random_trace(converted):
    """Over a skewed random trace the cache holds exactly what a brute-force LFU (ties: least recently used; a
    newcomer never displaces a hotter expert; experts of the current step stay) would hold."""
    entry = converted["per_expert"]
    expert_bytes = entry.manifest.extent("blk.0.expert.0").nbytes
    forward = QwenMoeForward(entry, LoadOptions(host_cache=0))
    cache = expert_residency(forward.reader, entry.manifest, budget_bytes=3 * expert_bytes)
    rng = torch.Generator().manual_seed(0)
    weights = 1.0 / torch.arange(1, 9, dtype=torch.float64) ** 1.2
    frequency, last_use, cached, clock = {}, {}, [], 0
    for _ in range(60):
        step = torch.multinomial(weights, 2, generator=rng).tolist()
        cache.get(0, step)
        names = [(0, e) for e in step]
        for name in names:
            frequency[name] = frequency.get(name, 0) + 1
            clock += 1
            if name in cached:
                last_use[name] = clock
        for name in names:
            if name in cached:
                continue
            while len(cached) >= 3:
                others = [n for n in cached if n not in names]
                victim = min(others, key=lambda n: (frequency[n], last_use[n])) if others else None
                if victim is None or frequency[victim] > frequency[name]:
                    break
                cached.remove(victim)
            if len(cached) < 3:
                cached.append(name)
                clock += 1
                last_use[name] = clock
        assert cache.cached_keys() == set(cached)
    forward.close()


def test_multimodal_bf16_checkpoint_with_mtp(hf_model, tmp_path):
    """`model.language_model.*` names, a text_config, bf16 weights, vision and mtp tensors (skipped)."""
    state = {("lm_head.weight" if k == "lm_head.weight" else "model.language_model." + k.removeprefix("model.")):
             v.to(torch.bfloat16) for k, v in hf_model.state_dict().items()}
    fused = {k for k in state if k.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    for key in fused:  # write per-expert tensors, as the hub checkpoints do
        stacked = state.pop(key)
        proj = ("gate_proj", "up_proj") if key.endswith("gate_up_proj") else ("down_proj",)
        for e in range(stacked.shape[0]):
            for i, name in enumerate(proj):
                rows = stacked.shape[1] // len(proj)
                state[f"{key.rsplit('.', 1)[0]}.{e}.{name}.weight"] = stacked[e, i * rows:(i + 1) * rows].clone()
    state["mtp.fc.weight"] = torch.zeros(64, 128, dtype=torch.bfloat16)
    state["mtp.norm.weight"] = torch.zeros(64, dtype=torch.bfloat16)
    state["model.visual.patch_embed.proj.weight"] = torch.zeros(8, 3, dtype=torch.bfloat16)
    folder = tmp_path / "mm"
    folder.mkdir()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    text = {**hf_model.config.to_dict(), "model_type": "qwen3_5_moe_text"}
    (folder / "config.json").write_text(json.dumps({"architectures": ["Qwen3_5MoeForConditionalGeneration"],
                                                    "model_type": "qwen3_5_moe", "text_config": text,
                                                    "tie_word_embeddings": False}))
    entry = convert_into(tmp_path / "store", folder)
    assert entry.manifest.source["skipped"] == {"mtp": 2, "vision": 1}
    assert entry.manifest.quant == "bf16"
    rounded = make_hf_model()
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in hf_model.state_dict().items()})
    prompt = torch.randint(0, 512, (10,), generator=torch.Generator().manual_seed(6))
    forward = QwenMoeForward(entry, LoadOptions())
    ours = forward.prefill(prompt, forward.new_cache(10), all_logits=True)
    with torch.no_grad():
        ref = rounded(prompt[None]).logits[0]
    assert relative_error(ours, ref) < 1e-4
    forward.close()


def test_registered_with_the_core(hf_checkpoints, registered_plugin):
    from gdsllm_core import registry

    assert registry.detect_converter(hf_checkpoints["fused"]) == "qwen3_5_moe"
    assert registry.get_forward_pass("qwen3_5_moe") is QwenMoeForward


def test_prompt_in_chunks_matches_transformers(hf_model, converted):
    """A prompt run 16 tokens at a time (each chunk continuing the caches of the last) gives the same logits."""
    forward = QwenMoeForward(converted["fused"], LoadOptions(host_cache=0, extra={"prefill_chunk": 16}))
    prompt = torch.randint(0, 512, (PROMPT_LENGTH,), generator=torch.Generator().manual_seed(7))
    ours = forward.prefill(prompt, forward.new_cache(PROMPT_LENGTH), all_logits=True)
    with torch.no_grad():
        ref = hf_model(prompt[None]).logits[0]
    assert relative_error(ours, ref) < 1e-4
    assert forward.experts.counters.reads == 4 * 5  # one batched expert read per layer per chunk (70 = 4x16 + 6)
    forward.close()


@pytest.mark.gpu
def test_cuda_device_matches_cpu(converted):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    entry = converted["per_expert"]
    prompt = torch.randint(0, 512, (PROMPT_LENGTH,), generator=torch.Generator().manual_seed(8))
    results = []
    for device in ("cpu", "cuda"):
        forward = QwenMoeForward(entry, LoadOptions(device=device, host_cache=0, extra={  # the same reads on both
            "expert_vram_bytes": 0, "expert_prefetch": False}))
        cache = forward.new_cache(PROMPT_LENGTH + 4)
        logits = [forward.prefill(prompt, cache, all_logits=True).cpu()]
        for token in (5, 6, 7, 8):
            logits.append(forward.decode(torch.tensor([token]), [cache]).cpu())
        results.append((logits, forward.experts.counters.bytes_read))
        forward.close()
    (cpu_logits, cpu_bytes), (gpu_logits, gpu_bytes) = results
    for ours, ref in zip(gpu_logits, cpu_logits, strict=True):
        assert relative_error(ours, ref) < 1e-4
    assert gpu_bytes == cpu_bytes
