"""Quantization at conversion: Q4_K blocks made here read back through gguf-py's dequantizer, and a model
converted with --quant q4_k computes what transformers computes on those dequantized weights."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from llama_testing import hf_logits_with_cache, relative_error, tiny_llama

from gdsllm_core.convert import ConvertOptions, convert
from gdsllm_core.engine.forward import LoadOptions
from gdsllm_core.errors import UnsupportedQuantError
from gdsllm_core.layout.store import ModelStore
from gdsllm_core.quant import ggml
from gdsllm_core.quant.quantize import quantize
from gdsllm_core.runtime.residency import Placement, TieredResidency
from gdsllm_llama.forward import LlamaForward
from gdsllm_llama.names import gguf_name

Q4_K = GGMLQuantizationType.Q4_K


def rel_norm_error(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.linalg.norm(approx - exact) / np.linalg.norm(exact))


@pytest.mark.parametrize("kind", ["normal", "positive", "outliers"])
def test_q4_k_blocks_read_back_through_gguf_py(kind):
    torch.manual_seed(0)
    weight = torch.randn(32, 1024) * 0.05
    if kind == "positive":
        weight = weight.abs() + 0.2
    elif kind == "outliers":
        weight[::7, ::31] *= 40
    blocks = quantize(weight, "Q4_K")
    assert blocks.shape == (32, 1024 // 256 * 144) and blocks.dtype == np.uint8
    restored = gguf_dequantize(blocks, Q4_K).reshape(32, 1024)
    ours = ggml.dequantize(torch.from_numpy(blocks), "Q4_K").numpy()
    assert np.array_equal(ours, restored)
    # about as accurate as gguf-py's Q4_0 (same bytes per value) on the same data
    q4_0 = gguf_dequantize(gguf_quantize(weight.numpy(), GGMLQuantizationType.Q4_0), GGMLQuantizationType.Q4_0)
    error = rel_norm_error(restored, weight.numpy())
    assert error < 1.15 * rel_norm_error(q4_0.reshape(32, 1024), weight.numpy())
    assert error < 0.12


def test_q4_k_of_zeros_and_bad_shapes():
    assert not gguf_dequantize(quantize(torch.zeros(2, 256), "Q4_K"), Q4_K).any()
    with pytest.raises(UnsupportedQuantError, match="256"):
        quantize(torch.zeros(2, 96), "Q4_K")
    with pytest.raises(UnsupportedQuantError, match="Q3_K"):
        quantize(torch.zeros(2, 256), "q3_k")


def test_convert_with_q4_k_matches_transformers_on_the_same_weights(tmp_path):
    model = tiny_llama(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    model.save_pretrained(tmp_path / "hf")
    entry = convert(tmp_path / "hf", ModelStore(tmp_path / "models"), "tiny", ConvertOptions(quant="q4_k"))
    restored = {}
    scheduler = TieredResidency(entry, Placement())
    try:
        for extent in entry.manifest.extents:
            views = scheduler.fetch(extent.name)
            for info in extent.tensors:
                if len(info.shape) == 2:
                    head = info.name in ("token_embd.weight", "output.weight")
                    assert info.qtype == ("Q8_0" if head else "Q4_K"), info.name
                    data = views[info.name].numpy()
                    restored[info.name] = gguf_dequantize(data, GGMLQuantizationType[info.qtype]).reshape(info.shape)
    finally:
        scheduler.close()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.copy_(torch.from_numpy(restored[gguf_name(name)]))
    prompt = [5, 9, 200, 31, 77]
    reference, fed = hf_logits_with_cache(model, prompt, 8)
    forward = LlamaForward(entry, LoadOptions())
    try:
        cache = forward.new_cache(32)
        ours = [forward.prefill(torch.tensor(prompt), cache)]
        ours += [forward.decode(torch.tensor([token]), [cache])[0] for token in fed]
    finally:
        forward.close()
    for step, (actual, expected) in enumerate(zip(ours, reference, strict=True)):
        assert relative_error(actual, expected) <= 1e-4, f"step {step}"
