"""Tiny random Gemma 3 text models from transformers, converted from the HF folder and from the GGUFs llama.cpp's
converter writes (f16, Q8_0): the CPU forward pass gives transformers' fp32 logits within 1e-4 relative, for a
prompt longer than the sliding window and 16 cached decode steps. A GGUF's reference is transformers running the
GGUF's own weights (dequantized by gguf-py, norms less llama.cpp's + 1)."""

import pytest
import torch
from gemma_testing import VARIANTS

from gdsllm_core import testing
from gdsllm_core.convert import convert
from gdsllm_core.engine.forward import LoadOptions
from gdsllm_core.layout.store import ModelStore
from gdsllm_gemma.forward import GemmaForward

PROMPT = [3, 17, 99, 254, 42, 7, 128, 5, 64, 300, 511]
STEPS = 16
TOLERANCE = 1e-4


def run_ours(entry, prompt: list[int], fed: list[int]) -> list[torch.Tensor]:
    forward = GemmaForward(entry, LoadOptions())
    try:
        cache = forward.new_cache(64)
        logits = [forward.prefill(torch.tensor(prompt), cache)]
        logits += [forward.decode(torch.tensor([token]), [cache])[0] for token in fed]
        return logits
    finally:
        forward.close()


def assert_logits_match(ours: list[torch.Tensor], reference: list[torch.Tensor]) -> None:
    assert len(ours) == len(reference)
    for step, (actual, expected) in enumerate(zip(ours, reference, strict=True)):
        error = testing.relative_error(actual, expected)
        assert error <= TOLERANCE, f"step {step}: relative error {error:.2e}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_folder_logits_match_transformers(variant, hf_models, tmp_path):
    model, folder = hf_models[variant]
    reference, fed = testing.hf_logits_with_cache(model, PROMPT, STEPS)
    entry = convert(folder, ModelStore(tmp_path), "gemma")
    config = entry.manifest.config
    assert entry.manifest.architecture == "gemma3"
    assert config["sliding_layers"] == [t == "sliding_attention" for t in model.config.layer_types]
    assert True in config["sliding_layers"] and False in config["sliding_layers"]
    assert "output" not in [e.name for e in entry.manifest.extents]  # tied head
    assert_logits_match(run_ours(entry, PROMPT, fed), reference)


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_llamacpp_gguf_logits_match_transformers(outtype, hf_models, ggufs, tmp_path):
    from transformers import AutoModelForCausalLM

    same_weights = testing.hf_checkpoint_from_gguf(ggufs[outtype], hf_models["gguf"][1], tmp_path / "hf",
                                                   norm_shift=1.0)
    model = AutoModelForCausalLM.from_pretrained(same_weights, dtype=torch.float32).eval()
    reference, fed = testing.hf_logits_with_cache(model, PROMPT, STEPS)
    entry = convert(ggufs[outtype], ModelStore(tmp_path / "store"), "gemma")
    assert entry.manifest.quant == outtype.upper()
    assert entry.manifest.config["sliding_layers"] == [True] * 5 + [False]
    assert_logits_match(run_ours(entry, PROMPT, fed), reference)
    original = testing.hf_logits_with_cache(hf_models["gguf"][0], PROMPT, 0)[0][0]
    assert testing.relative_error(run_ours(entry, PROMPT, [])[0], original) < 0.05
