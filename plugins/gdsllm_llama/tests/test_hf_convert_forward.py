"""Tiny random LLaMA models from transformers: converted from safetensors (and from a GGUF written like llama.cpp
does), the CPU forward pass must give LlamaForCausalLM's logits for a prompt and 16 cached decode steps."""

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from llama_testing import (
    hf_logits_with_cache,
    llamacpp_permute,
    relative_error,
    store_is_empty,
    tiny_llama,
    write_llama_gguf,
)
from tokenizers import Tokenizer

from gdsllm_core.convert import ConvertOptions, convert
from gdsllm_core.engine.forward import LoadOptions
from gdsllm_core.errors import ContextOverflowError, ConversionError, UnknownArchitectureError
from gdsllm_core.layout.store import ModelStore
from gdsllm_core.layout.writer import ModelWriter
from gdsllm_core.runtime.residency import Placement, TieredResidency
from gdsllm_llama.forward import LlamaForward
from gdsllm_llama.hf_convert import HfSafetensorsConverter
from gdsllm_llama.names import gguf_name

PROMPT = [3, 17, 99, 254, 42, 7, 128, 5, 64]
STEPS = 16
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
VARIANTS = {
    "plain": {},
    "llama3-rope": {"rope_parameters": LLAMA3_ROPE},
    "tied": {"tie_word_embeddings": True},
}


def run_ours(entry, prompt: list[int], fed: list[int]) -> list[torch.Tensor]:
    forward = LlamaForward(entry, LoadOptions())
    try:
        cache = forward.new_cache(64)
        logits = [forward.prefill(torch.tensor(prompt), cache)]
        for token in fed:
            logits.append(forward.decode(torch.tensor([token]), [cache])[0])
        return logits
    finally:
        forward.close()


def assert_logits_match(ours: list[torch.Tensor], reference: list[torch.Tensor], tolerance: float = 1e-4) -> None:
    assert len(ours) == len(reference)
    for step, (actual, expected) in enumerate(zip(ours, reference, strict=True)):
        error = relative_error(actual, expected)
        assert error <= tolerance, f"step {step}: relative error {error:.2e}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_safetensors_logits_match_transformers(tmp_path, variant):
    model = tiny_llama(**VARIANTS[variant])
    model.save_pretrained(tmp_path / "hf")
    reference, fed = hf_logits_with_cache(model, PROMPT, STEPS)
    entry = convert(tmp_path / "hf", ModelStore(tmp_path / "models"), "tiny")
    assert entry.manifest.config["tied_embeddings"] == (variant == "tied")
    assert [e.name for e in entry.manifest.extents][:2] == ["token_embd", "blk.0"]
    assert ("output" in [e.name for e in entry.manifest.extents]) == (variant != "tied")
    assert_logits_match(run_ours(entry, PROMPT, fed), reference)


def test_sharded_safetensors_with_progress(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "hf", max_shard_size="60KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 2
    reference, fed = hf_logits_with_cache(model, PROMPT, STEPS)
    calls = []
    entry = convert(tmp_path / "hf", ModelStore(tmp_path / "models"), "tiny",
                    ConvertOptions(progress=lambda name, done, total: calls.append((name, done, total))))
    n_tensors = entry.manifest.tensor_count()
    assert [done for _, done, _ in calls] == list(range(1, n_tensors + 1))
    assert {total for _, _, total in calls} == {n_tensors}
    assert_logits_match(run_ours(entry, PROMPT, fed), reference)


def test_bf16_checkpoint_keeps_its_dtype(tmp_path):
    reference_model = tiny_llama()
    with torch.no_grad():  # the bf16 values, computed in fp32 (rope buffers stay fp32)
        for param in reference_model.parameters():
            param.copy_(param.bfloat16().float())
    tiny_llama().to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    entry = convert(tmp_path / "hf", ModelStore(tmp_path / "models"), "tiny")
    qtypes = {t.name: t.qtype for e in entry.manifest.extents for t in e.tensors}
    assert qtypes["blk.0.attn_q.weight"] == "BF16" and qtypes["blk.0.attn_norm.weight"] == "F32"
    assert entry.manifest.quant == "BF16"
    reference, fed = hf_logits_with_cache(reference_model, PROMPT, STEPS)
    assert_logits_match(run_ours(entry, PROMPT, fed), reference)


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_quantize_at_conversion_matches_gguf_py(tmp_path, quant):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "hf")
    entry = convert(tmp_path / "hf", ModelStore(tmp_path / "models"), "tiny", ConvertOptions(quant=quant))
    state = model.state_dict()
    hf_names = {gguf_name(name): name for name in state}
    scheduler = TieredResidency(entry, Placement())
    try:
        for extent in entry.manifest.extents:
            views = scheduler.fetch(extent.name)
            for info in extent.tensors:
                weight = state[hf_names[info.name]].float()
                if weight.dim() == 1:
                    assert info.qtype == "F32"
                    continue
                head = info.name in ("token_embd.weight", "output.weight")
                expected_type = "Q8_0" if head else quant.upper()
                assert info.qtype == expected_type, info.name
                expected = gguf_quantize(weight.numpy(), GGMLQuantizationType[expected_type])
                assert views[info.name].numpy().tobytes() == expected.tobytes(), info.name
    finally:
        scheduler.close()
    # the forward pass on quantized weights equals transformers running gguf-py's dequantized weights
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                qtype = GGMLQuantizationType["Q8_0" if name in ("model.embed_tokens.weight", "lm_head.weight")
                                             else quant.upper()]
                rounded = gguf_dequantize(gguf_quantize(param.numpy(), qtype), qtype)
                param.copy_(torch.from_numpy(rounded.reshape(param.shape)))
    reference, fed = hf_logits_with_cache(model, PROMPT, STEPS)
    assert_logits_match(run_ours(entry, PROMPT, fed), reference)


def llamacpp_rope_factors(config) -> np.ndarray:
    """llama.cpp's `rope_freqs.weight` for LLaMA 3.1 scaling (convert_hf_to_gguf.py `generate_extra_tensors`)."""
    rope = config.rope_parameters
    head_dim = config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low_wavelen = rope["original_max_position_embeddings"] / rope["low_freq_factor"]
    high_wavelen = rope["original_max_position_embeddings"] / rope["high_freq_factor"]
    factors = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < high_wavelen:
            factors.append(1)
        elif wavelen > low_wavelen:
            factors.append(rope["factor"])
        else:
            smooth = ((rope["original_max_position_embeddings"] / wavelen - rope["low_freq_factor"])
                      / (rope["high_freq_factor"] - rope["low_freq_factor"]))
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gguf_written_like_llamacpp_matches_transformers(tmp_path, variant):
    """A GGUF written the way llama.cpp's converter writes it (q/k rows permuted for its rope, LLaMA 3.1 scaling
    as a rope_freqs tensor, no output.weight when tied) gives transformers' logits."""
    model = tiny_llama(**VARIANTS[variant])
    config = model.config
    tensors = {}
    for name, param in model.state_dict().items():
        target = gguf_name(name)
        data = param.numpy()
        if target.endswith("attn_q.weight"):
            data = llamacpp_permute(data, config.num_attention_heads)
        elif target.endswith("attn_k.weight"):
            data = llamacpp_permute(data, config.num_key_value_heads)
        if not (variant == "tied" and target == "output.weight"):
            tensors[target] = (data, "F32")
    if variant == "llama3-rope":
        tensors["rope_freqs.weight"] = (llamacpp_rope_factors(config), "F32")
    path = write_llama_gguf(tmp_path / "tiny.gguf", tensors, n_layers=2, dim=64, n_heads=4, n_kv_heads=2,
                            ffn_dim=128, vocab_size=256, rope_theta=10000.0, rms_eps=1e-5)
    reference, fed = hf_logits_with_cache(model, PROMPT, STEPS)
    entry = convert(path, ModelStore(tmp_path / "models"), "tiny")
    assert entry.manifest.config["tied_embeddings"] == (variant == "tied")
    assert_logits_match(run_ours(entry, PROMPT, fed), reference)


def test_batched_decode_equals_decoding_alone(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "hf")
    entry = convert(tmp_path / "hf", ModelStore(tmp_path / "models"), "tiny")
    forward = LlamaForward(entry, LoadOptions())
    prompts = [PROMPT, PROMPT[:3], [200, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]
    try:
        caches = [forward.new_cache(64) for _ in prompts]
        alone = [forward.new_cache(64) for _ in prompts]
        first = [forward.prefill(torch.tensor(p), c) for p, c in zip(prompts, caches, strict=True)]
        for p, c in zip(prompts, alone, strict=True):
            forward.prefill(torch.tensor(p), c)
        tokens = torch.tensor([int(logits.argmax()) for logits in first])
        for _ in range(4):
            batched = forward.decode(tokens, caches)
            single = torch.stack([forward.decode(tokens[i:i + 1], [alone[i]])[0] for i in range(len(prompts))])
            assert relative_error(batched, single) < 1e-5
            tokens = batched.argmax(dim=-1)
        with pytest.raises(ContextOverflowError):
            forward.prefill(torch.arange(70), forward.new_cache(64))
    finally:
        forward.close()


def test_missing_shard_is_refused(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "hf", max_shard_size="60KB")
    shards = sorted((tmp_path / "hf").glob("*.safetensors"))
    shards[1].unlink()
    root = tmp_path / "models"
    with pytest.raises(ConversionError, match=shards[1].name):
        convert(tmp_path / "hf", ModelStore(root), "tiny")
    assert store_is_empty(root)


def test_unknown_architecture_is_refused(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "hf")
    config_path = tmp_path / "hf" / "config.json"
    config = json.loads(config_path.read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    config["model_type"] = "fancy_new"
    config_path.write_text(json.dumps(config))
    root = tmp_path / "models"
    with pytest.raises(UnknownArchitectureError, match="recognises|FancyNew"):
        convert(tmp_path / "hf", ModelStore(root), "tiny")
    assert store_is_empty(root)
    # the converter itself names the architecture too
    with pytest.raises(UnknownArchitectureError, match="FancyNewForCausalLM"), ModelWriter(root, "tiny") as writer:
        HfSafetensorsConverter().convert(tmp_path / "hf", writer, ConvertOptions())
    assert store_is_empty(root)


def test_gguf_requantization_is_refused(tmp_path):
    model = tiny_llama()
    tensors = {gguf_name(n): (p.numpy(), "F32") for n, p in model.state_dict().items()}
    path = write_llama_gguf(tmp_path / "t.gguf", tensors, n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128,
                            vocab_size=256)
    root = tmp_path / "models"
    with pytest.raises(ConversionError, match="re-quantizing"):
        convert(path, ModelStore(root), "t", ConvertOptions(quant="q4_0"))
    assert store_is_empty(root)
    assert convert(path, ModelStore(root), "t").manifest.quant == "F32"


def _train_bpe_tokenizer(vocab_size: int = 256):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<|eot|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", 0)])
    return tokenizer


def test_hf_tokenizer_files_are_carried(tmp_path):
    model = tiny_llama(bos_token_id=0, eos_token_id=1)
    model.save_pretrained(tmp_path / "hf")
    original = _train_bpe_tokenizer()
    original.save(str(tmp_path / "hf" / "tokenizer.json"))
    template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eot|>{% endfor %}"
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    entry = convert(tmp_path / "hf", ModelStore(tmp_path / "models"), "tiny")
    info = entry.manifest.tokenizer
    assert (info.kind, info.file, info.bos_id, info.eos_ids, info.add_bos) == ("hf", "tokenizer.json", 0, [1, 2], True)
    assert info.chat_template == template
    carried = Tokenizer.from_file(str(entry.path / "tokenizer.json"))
    text = "the lazy fox"
    assert carried.encode(text).ids == original.encode(text).ids[1:]  # BOS is the engine's job (add_bos)
    assert original.encode(text).ids[0] == 0


def test_sentencepiece_tokenizer_model_is_carried(tmp_path):
    import io

    import sentencepiece as spm

    tiny_llama().save_pretrained(tmp_path / "hf")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["the quick brown fox jumps over the lazy dog"] * 50),
                                   model_writer=model, model_type="bpe", vocab_size=300, byte_fallback=True,
                                   minloglevel=2)
    (tmp_path / "hf" / "tokenizer.model").write_bytes(model.getvalue())
    entry = convert(tmp_path / "hf", ModelStore(tmp_path / "models"), "tiny")
    info = entry.manifest.tokenizer
    assert (info.kind, info.file, info.add_bos) == ("sentencepiece", "tokenizer.model", True)
    assert (entry.path / "tokenizer.model").read_bytes() == model.getvalue()


def test_without_a_dequant_cache_the_logits_are_the_same(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "hf")
    entry = convert(tmp_path / "hf", ModelStore(tmp_path / "models"), "tiny", ConvertOptions(quant="q4_0"))
    results = []
    for extra in ({}, {"dequant_cache_bytes": 0}):
        forward = LlamaForward(entry, LoadOptions(extra=extra))
        try:
            cache = forward.new_cache(32)
            logits = [forward.prefill(torch.tensor(PROMPT), cache)]
            logits += [forward.decode(torch.tensor([t]), [cache])[0] for t in (1, 2, 3)]
            results.append((torch.stack(logits), forward.stats()["dequantized_layers"]))
        finally:
            forward.close()
    (cached, n_cached), (uncached, n_uncached) = results
    assert torch.equal(cached, uncached)
    assert (n_cached, n_uncached) == (2, 0)
