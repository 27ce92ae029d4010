"""Launchers for `affine.cu` (MLX affine weights): `dequantize` to a float matrix (every width MLX writes), the
fused decode `gemv` (batch 1..8, optionally scaling each row of the result) and `swiglu_gemv` (an MLP's gated
activation from its gate and up matrices in one launch). Weights are `packed` uint32 words [rows, cols*bits/32]
(int32 or uint32 tensors) with `scales`/`biases` [rows, cols/group_size] in f32, f16 or bf16, as the MLX format
stores them. Shapes, dtypes and alignment are checked (ValueError) before launching on torch's current stream."""

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


def _check_x(x: torch.Tensor, packed: torch.Tensor, cols: int) -> None:
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_BATCH or x.shape[1] != cols:
        raise ValueError(f"x must be [B <= {MAX_BATCH}, {cols}], got {tuple(x.shape)}")
    if x.dtype not in FLOAT_CODES or not x.is_contiguous() or x.device != packed.device or x.data_ptr() % 16:
        raise ValueError(f"x must be a contiguous 16-byte aligned f32/f16/bf16 tensor on {packed.device}")


def _check_gemv(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int,
                group_size: int) -> tuple[int, int]:
    rows, cols = _check(packed, scales, biases, bits, group_size)
    if bits not in GEMV_BITS:
        raise ValueError(f"affine {bits}-bit has no GEMV kernel (supported: {GEMV_BITS}); dequantize instead")
    _check_x(x, packed, cols)
    if bits % 4 == 0 and packed.data_ptr() % 16:
        raise ValueError("packed words must start on a 16-byte boundary")
    return rows, cols


def _output(out: torch.Tensor | None, batch: int, rows: int, x: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(batch, rows, dtype=x.dtype, device=x.device)
    if out.dtype != x.dtype or tuple(out.shape) != (batch, rows) or not out.is_contiguous() or out.device != x.device:
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {(batch, rows)} on {x.device}")
    return out


def gemv(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int,
         group_size: int, coefficients: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, cols] (B <= 8; f32, f16 or bf16) @ W.T -> [B, rows] in x's dtype, W dequantized on the fly; with
    `coefficients` ([B] in x's dtype, any stride) row b of the result scaled by coefficients[b]; into `out` when
    given."""
    rows, cols = _check_gemv(x, packed, scales, biases, bits, group_size)
    batch = x.shape[0]
    if coefficients is not None and (coefficients.dim() != 1 or coefficients.shape[0] != batch
                                     or coefficients.dtype != x.dtype or coefficients.device != x.device):
        raise ValueError(f"coefficients must be [{batch}] {x.dtype} on {x.device}, got {coefficients.dtype} "
                         f"{tuple(coefficients.shape)}")
    y = _output(out, batch, rows, x)
    r = rows_per_warp(rows)
    blocks = (rows + WARPS * r - 1) // (WARPS * r)
    launch("affine.cu", f"affine_gemv<{bits},{FLOAT_CODES[scales.dtype]},{FLOAT_CODES[x.dtype]},{batch},{r}>",
           (blocks,), (32 * WARPS,),
           (ptr(packed), ptr(scales), ptr(biases), ptr(x), ptr(y), np.int32(rows), np.int32(cols),
            np.int32(group_size), ptr(coefficients),
            np.int32(0 if coefficients is None else coefficients.stride(0))))
    return y


def swiglu_gemv(x: torch.Tensor, gate: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                up: tuple[torch.Tensor, torch.Tensor, torch.Tensor], bits: int, group_size: int) -> torch.Tensor:
    """silu(x @ G.T) * (x @ U.T) -> [B, rows] in x's dtype, for two affine matrices (packed, scales, biases) of one
    shape, width, group size and scale dtype: one launch where three products and two elementwise ops were."""
    rows, cols = _check_gemv(x, *gate, bits, group_size)
    if _check_gemv(x, *up, bits, group_size) != (rows, cols) or up[1].dtype != gate[1].dtype:
        raise ValueError(f"gate and up must share a shape and scale dtype, got {tuple(gate[0].shape)} "
                         f"{gate[1].dtype} and {tuple(up[0].shape)} {up[1].dtype}")
    batch = x.shape[0]
    y = torch.empty(batch, rows, dtype=x.dtype, device=x.device)
    r = rows_per_warp(rows)
    blocks = (rows + WARPS * r - 1) // (WARPS * r)
    launch("affine.cu", f"affine_swiglu<{bits},{FLOAT_CODES[gate[1].dtype]},{FLOAT_CODES[x.dtype]},{batch},{r}>",
           (blocks,), (32 * WARPS,),
           (*(ptr(t) for t in gate), *(ptr(t) for t in up), ptr(x), ptr(y), np.int32(rows), np.int32(cols),
            np.int32(group_size)))
    return y
