"""Launchers for `affine.cu` (MLX affine weights): `dequantize` to a float matrix (every width MLX writes) and the
fused decode `gemv` (batch 1..8). Weights are `packed` uint32 words [rows, cols*bits/32] (int32 or uint32 tensors)
with `scales`/`biases` [rows, cols/group_size] in f32, f16 or bf16, as the MLX format stores them. Shapes, dtypes
and alignment are checked (ValueError) before launching on torch's current stream."""

import numpy as np
import torch

from gdsllm_core.kernels import launch, ptr

FLOAT_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # ST / OT / XT in affine.cu
DEQUANT_BITS = (1, 2, 3, 4, 5, 6, 8)
GEMV_BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
MAX_BATCH = 8
WARPS = 4  # AFFINE_WARPS in affine.cu
DEQUANT_THREADS = 256


def _check(packed: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int, group_size: int) -> tuple[int, int]:
    """(rows, cols) of an affine matrix the kernels can read."""
    if bits not in DEQUANT_BITS:
        raise ValueError(f"affine {bits}-bit has no GPU kernel (supported: {DEQUANT_BITS})")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"affine group size {group_size} has no GPU kernel (supported: {GROUP_SIZES})")
    if packed.dtype not in (torch.int32, torch.uint32) or packed.dim() != 2 or not packed.is_contiguous():
        raise ValueError(f"packed words must be a contiguous 2-D int32/uint32 tensor, got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    rows, words = packed.shape
    if words % bits:
        raise ValueError(f"{words} words per row is not a whole number of 32-value chunks at {bits} bits")
    cols = words * 32 // bits
    if cols % group_size:
        raise ValueError(f"rows of {cols} values are not a whole number of groups of {group_size}")
    for name, t in (("scales", scales), ("biases", biases)):
        if t.dtype not in FLOAT_CODES or not t.is_contiguous() or tuple(t.shape) != (rows, cols // group_size):
            raise ValueError(f"{name} must be contiguous f32/f16/bf16 of shape {(rows, cols // group_size)}, got "
                             f"{t.dtype} {tuple(t.shape)}")
    if scales.dtype != biases.dtype:
        raise ValueError(f"scales ({scales.dtype}) and biases ({biases.dtype}) must share a dtype")
    if not all(t.is_cuda and t.device == packed.device for t in (packed, scales, biases)):
        raise ValueError("packed, scales and biases must be on the same CUDA device")
    return rows, cols


def dequantize(packed: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int, group_size: int,
               dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The float matrix [rows, cols], as the CPU reference computes it (in the scales' dtype, each step rounded),
    in `dtype` (default: the scales' dtype), written into `out` when given."""
    rows, cols = _check(packed, scales, biases, bits, group_size)
    dtype = dtype or scales.dtype
    if dtype not in FLOAT_CODES:
        raise ValueError(f"cannot dequantize to {dtype} (f32, f16 or bf16)")
    if out is None:
        out = torch.empty(rows, cols, dtype=dtype, device=packed.device)
    elif out.dtype != dtype or tuple(out.shape) != (rows, cols) or not out.is_contiguous() or out.device != packed.device:
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {(rows, cols)} on {packed.device}")
    chunks = rows * cols // 32
    if chunks:
        launch("affine.cu", f"affine_dequant<{bits},{FLOAT_CODES[scales.dtype]},{FLOAT_CODES[dtype]}>",
               ((chunks + DEQUANT_THREADS - 1) // DEQUANT_THREADS,), (DEQUANT_THREADS,),
               (ptr(packed), ptr(scales), ptr(biases), ptr(out), np.int32(cols), np.int32(group_size),
                np.int64(chunks)))
    return out


def rows_per_warp(rows: int) -> int:
    """2 rows per warp (more loads in flight) unless that leaves too few blocks to fill the GPU."""
    return 2 if rows >= 2048 else 1


def gemv(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int,
         group_size: int) -> torch.Tensor:
    """x [B, cols] (B <= 8; f32, f16 or bf16) @ W.T -> [B, rows] in x's dtype, W dequantized on the fly."""
    rows, cols = _check(packed, scales, biases, bits, group_size)
    if bits not in GEMV_BITS:
        raise ValueError(f"affine {bits}-bit has no GEMV kernel (supported: {GEMV_BITS}); dequantize instead")
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_BATCH or x.shape[1] != cols:
        raise ValueError(f"x must be [B <= {MAX_BATCH}, {cols}], got {tuple(x.shape)}")
    if x.dtype not in FLOAT_CODES or not x.is_contiguous() or x.device != packed.device or x.data_ptr() % 16:
        raise ValueError(f"x must be a contiguous 16-byte aligned f32/f16/bf16 tensor on {packed.device}")
    if bits % 4 == 0 and packed.data_ptr() % 16:
        raise ValueError("packed words must start on a 16-byte boundary")
    batch = x.shape[0]
    y = torch.empty(batch, rows, dtype=x.dtype, device=x.device)
    r = rows_per_warp(rows)
    blocks = (rows + WARPS * r - 1) // (WARPS * r)
    launch("affine.cu", f"affine_gemv<{bits},{FLOAT_CODES[scales.dtype]},{FLOAT_CODES[x.dtype]},{batch},{r}>",
           (blocks,), (32 * WARPS,),
           (ptr(packed), ptr(scales), ptr(biases), ptr(x), ptr(y), np.int32(rows), np.int32(cols),
            np.int32(group_size)))
    return y
