"""Launchers for `affine.cu` (MLX affine weights): `dequantize` to a float matrix (every width MLX writes), the
fused decode `gemv` (batch 1..8, optionally scaling each row of the result) and `swiglu_gemv` (an MLP's gated
activation from its gate and up matrices in one launch). Weights are `packed` uint32 words [rows, cols*bits/32]
(int32 or uint32 tensors) with `scales`/`biases` [rows, cols/group_size] in f32, f16 or bf16, as the MLX format
stores them. Shapes, dtypes and alignment are checked (ValueError) before launching on torch's current stream."""

import numpy as np
import torch

from gdsllm_kernels import launch, ptr

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


Affine = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # packed, scales, biases


def _signature(matrix: Affine) -> tuple:
    return tuple((tuple(t.shape), t.dtype, t.device, t.is_contiguous(), t.data_ptr() % 16 == 0) for t in matrix)


def _check_group(matrices: list[Affine], bits: int, group_size: int, x: torch.Tensor) -> tuple[int, int]:
    """(rows, cols) shared by every matrix, the first checked in full, the others against it."""
    if not matrices:
        raise ValueError("a grouped launch needs at least one matrix")
    rows, cols = _check_gemv(x, *matrices[0], bits, group_size)
    first = _signature(matrices[0])
    for matrix in matrices[1:]:
        if _signature(matrix) != first:
            raise ValueError("grouped matrices must share shapes, dtypes, device and alignment: "
                             f"{_signature(matrix)} differs from {first}")
    return rows, cols


def _table(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)


def swiglu_gemv_grouped(x: torch.Tensor, gates: list[Affine], ups: list[Affine], bits: int,
                        group_size: int) -> torch.Tensor:
    """`swiglu_gemv` of x [B, cols] for each pair (gates[e], ups[e]) in one launch -> [E, B, rows]; every matrix of
    one shape, width, group size and scale dtype."""
    rows, cols = _check_group(gates + ups, bits, group_size, x)
    if len(gates) != len(ups):
        raise ValueError(f"{len(gates)} gate matrices for {len(ups)} up matrices")
    batch, experts = x.shape[0], len(gates)
    y = torch.empty(experts, batch, rows, dtype=x.dtype, device=x.device)
    y_step = batch * rows * y.element_size()
    table = _table([[t.data_ptr() for t in (*gate, *up)] + [x.data_ptr(), y.data_ptr() + e * y_step]
                    for e, (gate, up) in enumerate(zip(gates, ups, strict=True))], x.device)
    r = rows_per_warp(rows)
    launch("affine.cu", f"affine_swiglu_grouped<{bits},{FLOAT_CODES[gates[0][1].dtype]},{FLOAT_CODES[x.dtype]},"
           f"{batch},{r}>", ((rows + WARPS * r - 1) // (WARPS * r), experts), (32 * WARPS,),
           (ptr(table), np.int32(rows), np.int32(cols), np.int32(group_size)))
    return y


def gemv_grouped(xs: torch.Tensor, matrices: list[Affine], bits: int, group_size: int,
                 coefficients: list[torch.Tensor] | None, outs: list[torch.Tensor]) -> None:
    """`gemv` of xs[e] [B, cols] by matrices[e] into outs[e] [B, rows] for every e in one launch, row b of each
    scaled by coefficients[e][b] when given (each [B], one stride for all)."""
    experts = len(matrices)
    if xs.dim() != 3 or xs.shape[0] != experts or not xs.is_contiguous():
        raise ValueError(f"xs must be a contiguous [{experts}, B, cols] tensor, got {tuple(xs.shape)}")
    rows, cols = _check_group(matrices, bits, group_size, xs[0])
    if len(outs) != experts:
        raise ValueError(f"{len(outs)} outputs for {experts} matrices")
    batch = xs.shape[1]
    for out in outs:
        _output(out, batch, rows, xs)
    stride = 0
    if coefficients is not None:
        strides = {c.stride(0) for c in coefficients}
        if len(coefficients) != experts or len(strides) != 1 or any(
                c.dim() != 1 or c.shape[0] != batch or c.dtype != xs.dtype or c.device != xs.device
                for c in coefficients):
            raise ValueError(f"coefficients must be {experts} tensors of [{batch}] {xs.dtype} with one stride")
        stride = strides.pop()
    x_step = batch * cols * xs.element_size()
    table = _table([[t.data_ptr() for t in matrix] + [xs.data_ptr() + e * x_step, outs[e].data_ptr(),
                                                       0 if coefficients is None else coefficients[e].data_ptr()]
                    for e, matrix in enumerate(matrices)], xs.device)
    r = rows_per_warp(rows)
    launch("affine.cu", f"affine_gemv_grouped<{bits},{FLOAT_CODES[matrices[0][1].dtype]},{FLOAT_CODES[xs.dtype]},"
           f"{batch},{r}>", ((rows + WARPS * r - 1) // (WARPS * r), experts), (32 * WARPS,),
           (ptr(table), np.int32(rows), np.int32(cols), np.int32(group_size), np.int32(stride)))
