"""MLX affine checkpoints and conversion-time affine quantization, against mlx / mlx_lm themselves."""

import numpy as np
import pytest
import torch
from qwen_moe_helpers import convert_into, make_hf_model
from safetensors import safe_open

from gdsllm_core.engine.forward import LoadOptions
from gdsllm_qwen_moe.forward import QwenMoeForward

mx = pytest.importorskip("mlx.core")
pytestmark = pytest.mark.reference


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def test_mlx_lm_quantized_checkpoint_matches_mlx_lm_forward(mlx_quantized, tmp_path):
    folder, model = mlx_quantized
    entry = convert_into(tmp_path, folder)
    tensors = {t.name: t for e in entry.manifest.extents for t in e.tensors}
    widths = {name: t.extra["affine"]["bits"] for name, t in tensors.items() if t.extra.get("affine")}
    assert widths["blk.0.attn_qkv.weight"] == 3 and widths["blk.1.attn_qkv.weight"] == 4
    assert widths["blk.1.expert.5.ffn_down.weight"] == 2 and widths["blk.0.expert.5.ffn_down.weight"] == 4
    assert widths["blk.3.attn_output.weight"] == 6 and widths["token_embd.weight"] == 5
    assert widths["blk.2.ffn_up_shexp.weight"] == 1 and widths["output.weight"] == 8
    assert widths["blk.0.ffn_gate_inp.weight"] == 8
    # one expert's slice of mlx_lm's 3-D switch tensor, stored as is
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        ref = f.get_slice("language_model.model.layers.1.mlp.switch_mlp.down_proj.weight")[5]
    info = tensors["blk.1.expert.5.ffn_down.weight"]
    extent = entry.manifest.extent("blk.1.expert.5")
    with open(entry.path / extent.file, "rb") as weights:
        weights.seek(extent.offset + info.offset)
        stored = np.frombuffer(weights.read(info.nbytes), dtype=np.int32)
    np.testing.assert_array_equal(stored, ref.view(torch.int32).numpy().ravel())

    forward = QwenMoeForward(entry, LoadOptions())
    prompt = np.random.default_rng(0).integers(0, 512, 40)
    mlx_cache = model.make_cache()
    ref_logits = np.array(model(mx.array(prompt)[None], cache=mlx_cache)[0])
    cache = forward.new_cache(48)
    ours = forward.prefill(torch.from_numpy(prompt), cache, all_logits=True).numpy()
    assert relative_error(ours, ref_logits) < 1e-3
    token = int(ref_logits[-1].argmax())
    for _ in range(4):
        ref_step = np.array(model(mx.array([[token]]), cache=mlx_cache)[0, -1])
        ours = forward.decode(torch.tensor([token]), [cache])[0].numpy()
        assert relative_error(ours, ref_step) < 1e-3
        token = int(ref_step.argmax())
    forward.close()


def mlx_round_trip(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """What mlx itself makes of a weight quantized then dequantized."""
    array = mx.array(weight.numpy())
    packed, scales, biases = mx.quantize(array, group_size=group_size, bits=bits)
    return torch.from_numpy(np.array(mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits)))


def test_affine4_conversion_packs_like_mlx_and_runs_the_dequantized_model(tmp_path):
    """`--quant affine4 --group-size 32` on an HF checkpoint: the stored words equal mx.quantize's, and the
    forward pass equals transformers running the weights mx.dequantize gives back (router gates at 8 bits)."""
    model = make_hf_model(seed=4, shared_expert_intermediate_size=64)
    model.save_pretrained(tmp_path / "hf")
    entry = convert_into(tmp_path / "store", tmp_path / "hf", quant="affine4", group_size=32)
    assert entry.manifest.quant == "affine4-g32"

    state = model.state_dict()
    expert_up = state["model.layers.2.mlp.experts.gate_up_proj"][6, 32:]  # expert 6's up_proj rows
    extent = entry.manifest.extent("blk.2.expert.6")
    info = next(t for t in extent.tensors if t.name == "blk.2.expert.6.ffn_up.weight")
    assert info.extra["affine"] == {"bits": 4, "group_size": 32, "cols": 64}
    with open(entry.path / extent.file, "rb") as weights:
        weights.seek(extent.offset + info.offset)
        stored = np.frombuffer(weights.read(info.nbytes), dtype=np.uint32)
    np.testing.assert_array_equal(stored, np.array(mx.quantize(mx.array(expert_up.numpy()), 32, 4)[0]).ravel())

    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim < 2 or "conv1d" in name or "norm" in name:
                continue
            bits = 8 if name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")) else 4
            flat = param.reshape(-1, param.shape[-1])
            param.copy_(mlx_round_trip(flat, bits, 32).reshape(param.shape))
    forward = QwenMoeForward(entry, LoadOptions())
    prompt = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(5))
    ours = forward.prefill(prompt, forward.new_cache(20), all_logits=True)
    with torch.no_grad():
        ref = model(prompt[None]).logits[0]
    assert relative_error(ours.numpy(), ref.numpy()) < 1e-4
    forward.close()


def test_dense_dequantized_at_load_and_bfloat16_activations(mlx_quantized, tmp_path):
    """The GPU's configuration against the fp32 path (itself checked against mlx_lm above): matrices dequantized
    once at load give the same logits; bf16 activations stay within bf16 noise (a tiny random model's routing
    flips at a few positions, so the median over positions is what is bounded)."""
    entry = convert_into(tmp_path, mlx_quantized[0])
    prompt = torch.randint(0, 512, (24,), generator=torch.Generator().manual_seed(10))
    results = []
    for extra in ({}, {"dequantize_dense": True}, {"dtype": "bfloat16", "dequantize_dense": True}):
        forward = QwenMoeForward(entry, LoadOptions(extra=extra))
        cache = forward.new_cache(26)
        logits = [forward.prefill(prompt, cache, all_logits=True)]
        logits += [forward.decode(torch.tensor([t]), [cache]) for t in (3, 4)]
        results.append(torch.cat(logits).numpy())
        forward.close()
    reference, dequantized, bf16 = results
    assert relative_error(dequantized, reference) < 1e-5
    assert bf16.dtype == np.float32
    per_position = [relative_error(ours, ref) for ours, ref in zip(bf16, reference, strict=True)]
    assert np.median(per_position) < 5e-2
    assert np.median([np.corrcoef(ours, ref)[0, 1] for ours, ref in zip(bf16, reference, strict=True)]) > 0.999
