"""Tiny random Qwen2 / Qwen3 / Qwen3-MoE models from transformers, converted from the HF folder and from the GGUFs
llama.cpp's converter writes (f16, Q8_0): the CPU forward pass gives transformers' fp32 logits within 1e-4
relative, for a prompt and 16 cached decode steps. A GGUF's reference is transformers running the GGUF's own
weights (dequantized by gguf-py): its rounding is the file's, not the forward pass's."""

import pytest
import torch
from qwen3_testing import ARCHS

from gdsllm_core import testing
from gdsllm_core.convert import convert
from gdsllm_core.engine.forward import LoadOptions
from gdsllm_core.layout.store import ModelStore
from gdsllm_qwen3.forward import QwenForward

PROMPT = [3, 17, 99, 254, 42, 7, 128, 5, 64, 300, 511]
STEPS = 16
TOLERANCE = 1e-4


def run_ours(entry, prompt: list[int], fed: list[int], **extra) -> list[torch.Tensor]:
    forward = QwenForward(entry, LoadOptions(extra=extra))
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


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_folder_logits_match_transformers(arch, hf_models, tmp_path):
    model, folder = hf_models[arch]
    reference, fed = testing.hf_logits_with_cache(model, PROMPT, STEPS)
    entry = convert(folder, ModelStore(tmp_path), arch)
    assert entry.manifest.architecture == arch
    names = [e.name for e in entry.manifest.extents]
    if arch == "qwen3moe":  # one extent per expert
        assert [n for n in names if n.startswith("blk.1.expert.")] == [f"blk.1.expert.{e}" for e in range(8)]
    assert ("output" in names) == (arch != "qwen2")
    assert_logits_match(run_ours(entry, PROMPT, fed), reference)


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
@pytest.mark.parametrize("arch", ARCHS)
def test_llamacpp_gguf_logits_match_transformers(arch, outtype, hf_models, ggufs, tmp_path):
    from transformers import AutoModelForCausalLM

    gguf = ggufs[arch, outtype]
    same_weights = testing.hf_checkpoint_from_gguf(gguf, hf_models[arch][1], tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(same_weights, dtype=torch.float32).eval()
    reference, fed = testing.hf_logits_with_cache(model, PROMPT, STEPS)
    entry = convert(gguf, ModelStore(tmp_path / "store"), arch)
    assert entry.manifest.architecture == arch
    assert entry.manifest.quant == outtype.upper()
    if outtype == "q8_0":
        assert any(t.qtype == "Q8_0" for e in entry.manifest.extents for t in e.tensors)
    assert_logits_match(run_ours(entry, PROMPT, fed), reference)
    # the file's rounding is small: the original fp32 model's logits are close too
    assert testing.relative_error(run_ours(entry, PROMPT, [])[0],
                                  testing.hf_logits_with_cache(hf_models[arch][0], PROMPT, 0)[0][0]) < 0.05
