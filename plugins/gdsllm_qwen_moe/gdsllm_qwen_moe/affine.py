"""MLX affine quantization in torch: pack, unpack, quantize, dequantize (bit-exact with `mx.quantize`/`mx.dequantize`).

Format (as MLX writes it): each row of codes is one LSB-first bit stream cut into uint32 words; code i of a row
occupies bits [i*b, i*b+b), so 3-, 5- and 6-bit codes may straddle two words. A group of `group_size` consecutive
values shares a scale and a bias: w = f32(f32(q) * scale) + bias (two roundings, no FMA)."""

import functools

import torch

from gdsllm_core.api import UnsupportedQuantError

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 8)  # every width mx.quantize accepts
SUPPORTED_GROUP_SIZES = (32, 64, 128)
_WORD_MASK = 0xFFFFFFFF
_CPU = torch.device("cpu")


def check_format(bits: int, group_size: int, what: str) -> None:
    """Refuse a width or group size MLX does not define, naming the tensor."""
    if bits not in SUPPORTED_BITS:
        raise UnsupportedQuantError(
            f"tensor {what}: affine {bits}-bit is not supported (supported widths: {SUPPORTED_BITS})",
            "re-quantize the checkpoint with a supported width, e.g. mlx_lm.convert -q --q-bits 4")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise UnsupportedQuantError(
            f"tensor {what}: affine group size {group_size} is not supported (supported: {SUPPORTED_GROUP_SIZES})",
            "re-quantize the checkpoint with group size 32, 64 or 128")


def packed_cols(cols: int, bits: int) -> int:
    """uint32 words per row holding `cols` codes of `bits` bits."""
    return cols * bits // 32


@functools.lru_cache(maxsize=64)
def _bit_plan(bits: int, device: torch.device = _CPU) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the 32 codes of a 32-code block (which fills exactly `bits` words): low word, shift, high word index."""
    start = torch.arange(32, dtype=torch.int64, device=device) * bits
    low_word = start // 32
    shift = start % 32
    high_word = torch.clamp(low_word + 1, max=bits - 1)
    return low_word, shift, high_word


def _as_int64_words(packed: torch.Tensor) -> torch.Tensor:
    if packed.dtype == torch.uint32:
        packed = packed.view(torch.int32)
    return packed.to(torch.int64) & _WORD_MASK


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint32 words [..., W] -> integer codes [..., W*32/bits] (int64)."""
    words = _as_int64_words(packed)
    lead = words.shape[:-1]
    words = words.reshape(*lead, -1, bits)  # [..., blocks of 32 codes, bits words]
    low_word, shift, high_word = _bit_plan(bits, words.device)
    low = words[..., low_word] >> shift
    straddles = (shift + bits) > 32
    high = torch.where(straddles, words[..., high_word] << (32 - shift), 0)
    codes = (low | high) & ((1 << bits) - 1)
    return codes.reshape(*lead, -1)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes [..., K] (K a multiple of 32) -> uint32 words [..., K*bits/32]."""
    codes = codes.to(torch.int64)
    lead = codes.shape[:-1]
    if codes.shape[-1] % 32:
        raise ValueError(f"affine packing needs rows of a multiple of 32 values, got {codes.shape[-1]}")
    codes = codes.reshape(*lead, -1, 32)
    low_word, shift, high_word = _bit_plan(bits, codes.device)
    words = torch.zeros(*codes.shape[:-1], bits, dtype=torch.int64, device=codes.device)
    words.index_add_(-1, low_word, (codes << shift) & _WORD_MASK)
    straddles = (shift + bits) > 32
    high = torch.where(straddles, codes >> (32 - shift).clamp(max=63), 0)
    words.index_add_(-1, high_word, high)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return words.reshape(*lead, -1).view(torch.uint32)


def dequantize(packed: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int, group_size: int,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """Packed words [..., W] with scales/biases [..., K/group_size] -> values [..., K] as mx.dequantize computes
    them: in the scales' dtype, f(f(q * scale) + bias), each step rounded; returned in `dtype` if given."""
    compute = scales.dtype if scales.dtype in (torch.float16, torch.bfloat16) else torch.float32
    codes = unpack(packed, bits).to(compute)
    lead = codes.shape[:-1]
    codes = codes.reshape(*lead, -1, group_size)
    values = codes * scales.to(compute).unsqueeze(-1)
    values = values + biases.to(compute).unsqueeze(-1)
    return values.reshape(*lead, -1).to(dtype or scales.dtype)


def quantize(weight: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Values [..., K] -> (packed uint32 [..., K*bits/32], scales, biases [..., K/group_size]) by MLX's rule:
    the group's edge of larger magnitude is hit exactly (so 0 is representable); scales and biases take the input
    dtype."""
    if weight.shape[-1] % group_size:
        raise ValueError(f"affine quantization needs rows of a multiple of {group_size} values, got {weight.shape[-1]}")
    lead = weight.shape[:-1]
    w = weight.to(torch.float32).reshape(*lead, -1, group_size)
    n_bins = float((1 << bits) - 1)
    w_max = w.amax(dim=-1)
    w_min = w.amin(dim=-1)
    delta = torch.clamp((w_max - w_min) / n_bins, min=1e-7)
    if bits == 1:  # MLX keeps the plain min/max rule for one bit
        scale, bias = delta, w_min
    else:
        min_is_edge = w_min.abs() > w_max.abs()
        edge = torch.where(min_is_edge, w_min, w_max)
        step = torch.where(min_is_edge, delta, -delta)
        q0 = torch.round(edge / step)
        has_q0 = q0 != 0
        scale = torch.where(has_q0, edge / torch.where(has_q0, q0, torch.ones_like(q0)), step)
        bias = torch.where(has_q0, edge, torch.zeros_like(edge))
    codes = torch.round((w - bias.unsqueeze(-1)) / scale.unsqueeze(-1))  # the fp32 scale, before rounding to dtype
    codes = torch.clamp(codes, 0, n_bins).to(torch.int64)
    return pack(codes.reshape(*lead, -1), bits), scale.to(weight.dtype), bias.to(weight.dtype)
