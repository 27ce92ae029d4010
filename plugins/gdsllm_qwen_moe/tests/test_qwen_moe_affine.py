"""Affine (de)quantization against MLX's own mx.quantize / mx.dequantize: bit-exact for every width and group size
MLX supports, in fp32, bf16 and fp16."""

import numpy as np
import pytest
import torch

from gdsllm_core.errors import UnsupportedQuantError
from gdsllm_qwen_moe import affine

mx = pytest.importorskip("mlx.core")
pytestmark = pytest.mark.reference

DTYPES = {"float32": (torch.float32, "float32"), "bfloat16": (torch.bfloat16, "bfloat16"),
          "float16": (torch.float16, "float16")}


def to_numpy(array) -> np.ndarray:
    """An mx array as numpy (half types widened to float32, exactly)."""
    if array.dtype in (mx.bfloat16, mx.float16):
        array = array.astype(mx.float32)
    return np.array(array)


def sample(rows: int, cols: int, group_size: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    x[0, :group_size] = 0.0  # an all-zero group (q0 == 0 branch)
    x[1, :group_size] = np.abs(x[1, :group_size])  # a group with no negative value
    x[2, :group_size] = 3.0  # a constant group
    return x


@pytest.mark.parametrize("bits", affine.SUPPORTED_BITS)
def test_quantize_and_dequantize_equal_mlx_bit_exactly(bits):
    for group_size in affine.SUPPORTED_GROUP_SIZES:
        for torch_dtype, mx_dtype in DTYPES.values():
            x = sample(48, 256, group_size, seed=bits * 1000 + group_size)
            ref_packed, ref_scales, ref_biases = mx.quantize(mx.array(x).astype(getattr(mx, mx_dtype)),
                                                             group_size=group_size, bits=bits)
            ref_values = mx.dequantize(ref_packed, ref_scales, ref_biases, group_size=group_size, bits=bits)
            what = f"bits={bits} group={group_size} {mx_dtype}"

            packed, scales, biases = affine.quantize(torch.from_numpy(x).to(torch_dtype), bits, group_size)
            assert scales.dtype == torch_dtype, what
            np.testing.assert_array_equal(packed.view(torch.int32).numpy().view(np.uint32), np.array(ref_packed),
                                          err_msg=what)
            np.testing.assert_array_equal(scales.float().numpy(), to_numpy(ref_scales), err_msg=what)
            np.testing.assert_array_equal(biases.float().numpy(), to_numpy(ref_biases), err_msg=what)

            mlx_scales = torch.from_numpy(to_numpy(ref_scales)).to(torch_dtype)
            mlx_biases = torch.from_numpy(to_numpy(ref_biases)).to(torch_dtype)
            values = affine.dequantize(torch.from_numpy(np.array(ref_packed)), mlx_scales, mlx_biases, bits, group_size)
            assert values.dtype == torch_dtype, what
            np.testing.assert_array_equal(values.float().numpy(), to_numpy(ref_values), err_msg=what)


@pytest.mark.parametrize("bits", affine.SUPPORTED_BITS)
def test_pack_matches_mlx_words_on_3d_expert_tensors(bits):
    """Codes with 0 and the top code in every group: MLX then picks scale -1 and bias = top (scale 1, bias 0 for
    one bit, where it keeps the plain min/max rule), so its words are exactly pack(top - codes) (pack(codes))."""
    top = (1 << bits) - 1
    codes = torch.randint(0, top + 1, (3, 5, 128), generator=torch.Generator().manual_seed(bits))
    codes[..., 0], codes[..., 1] = 0, top
    ref_packed = np.array(mx.quantize(mx.array(codes.numpy().astype(np.float32)), group_size=128, bits=bits)[0])
    expected = codes if bits == 1 else top - codes
    packed = affine.pack(expected, bits)
    np.testing.assert_array_equal(packed.view(torch.int32).numpy().view(np.uint32), ref_packed)
    assert torch.equal(affine.unpack(packed, bits), expected)


@pytest.mark.parametrize(("bits", "group_size"), [(7, 64), (16, 64), (4, 16), (4, 256)])
def test_widths_and_groups_mlx_does_not_define_are_refused(bits, group_size):
    with pytest.raises(UnsupportedQuantError, match="blk.0.attn_q"):
        affine.check_format(bits, group_size, "blk.0.attn_q.weight")


@pytest.mark.parametrize("block_values", [64 * 5, 1 << 24])  # 5 rows at a time (uneven), or all at once
def test_affine_linear_equals_mlx_quantized_matmul(block_values, monkeypatch):
    from gdsllm_qwen_moe import weights

    monkeypatch.setattr(weights, "DEQUANT_BLOCK_VALUES", block_values)
    rng = np.random.default_rng(9)
    w = mx.array(rng.standard_normal((48, 64)).astype(np.float32))
    x = rng.standard_normal((3, 64)).astype(np.float32)
    packed, scales, biases = mx.quantize(w, group_size=32, bits=6)
    ref = np.array(mx.quantized_matmul(mx.array(x), packed, scales, biases, transpose=True, group_size=32, bits=6))
    weight = weights.AffineWeight(torch.from_numpy(np.array(packed).view(np.int32)), torch.from_numpy(np.array(scales)),
                                  torch.from_numpy(np.array(biases)), bits=6, group_size=32)
    ours = weights.linear(torch.from_numpy(x), weight).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_biases_of_another_float_type_are_stored_as_the_scales(tmp_path):
    """A checkpoint whose biases are float32 beside bfloat16 scales: the biases are cast to bfloat16 and the
    manifest records them as BF16 (so their byte count matches their type)."""
    from gdsllm_core.layout import ModelWriter
    from gdsllm_qwen_moe.convert import affine_entries

    packed, scales, biases = affine.quantize(torch.randn(8, 128), 4, 64)
    scales, biases = scales.to(torch.bfloat16), biases.float()
    with ModelWriter(tmp_path, "m") as writer:
        extent = writer.add_extent("blk.0", affine_entries("blk.0.w.weight", packed, scales, biases, 4, 64, 128))
        writer.abort()
    stored = {t.name: t for t in extent.tensors}["blk.0.w.biases"]
    assert stored.qtype == "BF16" and stored.nbytes == biases.numel() * 2
