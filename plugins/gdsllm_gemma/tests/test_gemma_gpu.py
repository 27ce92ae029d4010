"""The forward pass on the GPU (bf16) stays within bf16 tolerance of the fp32 CPU reference."""

import pytest
import torch
from gemma_testing import VARIANTS

from gdsllm_core import testing
from gdsllm_core.convert import convert
from gdsllm_core.engine.forward import LoadOptions
from gdsllm_core.layout.store import ModelStore
from gdsllm_gemma.forward import GemmaForward

PROMPT = [3, 17, 99, 254, 42, 7, 128, 5, 64, 300, 511]
BF16_TOLERANCE = 3e-2  # relative to the largest logit: bf16 weights and activations through a few layers


def logits(entry, device: str, fed: list[int]) -> list[torch.Tensor]:
    forward = GemmaForward(entry, LoadOptions(device=device))
    try:
        cache = forward.new_cache(32)
        out = [forward.prefill(torch.tensor(PROMPT), cache)]
        out += [forward.decode(torch.tensor([t]), [cache])[0] for t in fed]
        return [x.float().cpu() for x in out]
    finally:
        forward.close()


@pytest.mark.gpu
@pytest.mark.parametrize("arch", list(VARIANTS))
def test_gpu_matches_cpu_reference(arch, hf_models, tmp_path):
    model, folder = hf_models[arch]
    _reference, fed = testing.hf_logits_with_cache(model, PROMPT, 8)
    entry = convert(folder, ModelStore(tmp_path), arch)
    for step, (gpu, cpu) in enumerate(zip(logits(entry, "cuda", fed), logits(entry, "cpu", fed), strict=True)):
        assert testing.relative_error(gpu, cpu) < BF16_TOLERANCE, f"step {step}"
