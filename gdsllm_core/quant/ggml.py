"""Dequantize GGML tensors in torch on the CPU, vectorised over all blocks at once.

Input: the raw bytes of a tensor as GGUF stores them, uint8 [rows, row_bytes] (plain F32/F16/BF16 tensors may also
come already typed). Output: float32 [rows, cols]. The arithmetic follows gguf-py's `gguf.quants` step by step
(the same float32 products and sums, in the same order, no fused multiply-add), so results are bit-exact with
`gguf.quants.dequantize`. Block layouts are those of ggml's `ggml-common.h`; QK_K = 256 for the K-quants.
"""

from collections.abc import Callable

import torch

from gdsllm_core.errors import UnsupportedQuantError
from gdsllm_core.layout.qtypes import block_geometry

QK_K = 256


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 at byte `start` of every block, as float32 [n_blocks, 1]."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(packed: torch.Tensor, group: int) -> torch.Tensor:
    """Split bytes [n, k*group] into low then high nibbles per group of `group` bytes: [n, k, 2, group]."""
    n = packed.shape[0]
    shifts = torch.tensor([0, 4], dtype=torch.uint8, device=packed.device).view(1, 1, 2, 1)
    return (packed.reshape(n, -1, 1, group) >> shifts) & 0x0F


def _bits(packed: torch.Tensor, group: int, width: int) -> torch.Tensor:
    """Fields of `width` bits, lowest first, per group of `group` bytes: [n, k, 8 // width, group]."""
    n = packed.shape[0]
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=packed.device).view(1, 1, -1, 1)
    return (packed.reshape(n, -1, 1, group) >> shifts) & ((1 << width) - 1)


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)
    q = _nibbles(blocks[:, 2:], 16).reshape(blocks.shape[0], 32).float() - 8
    return d * q


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _nibbles(blocks[:, 4:], 16).reshape(blocks.shape[0], 32).float()
    return d * q + m


def _q5_high_bits(qh: torch.Tensor) -> torch.Tensor:
    """The 32 fifth bits of a Q5_0/Q5_1 block (a little-endian uint32), bit i -> value i: [n, 32]."""
    return _bits(qh, 1, 1).reshape(qh.shape[0], 32)


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16(blocks, 0)
    qh = _q5_high_bits(blocks[:, 2:6])
    ql = _nibbles(blocks[:, 6:], 16).reshape(n, 32)
    q = (ql | (qh << 4)).float() - 16
    return d * q


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    qh = _q5_high_bits(blocks[:, 4:8])
    ql = _nibbles(blocks[:, 8:], 16).reshape(n, 32)
    q = (ql | (qh << 4)).float()
    return d * q + m


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)
    q = blocks[:, 2:].contiguous().view(torch.int8).float()
    return q * d


def _q2_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales, qs = blocks[:, :16], blocks[:, 16:80]
    d, dmin = _f16(blocks, 80), _f16(blocks, 82)
    dl = (d * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    q = _bits(qs, 32, 2).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    hmask, qs, scales = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
    d = _f16(blocks, 108)
    low = _nibbles(scales[:, :8], 8).reshape(n, 16)
    high = _bits(scales[:, 8:12], 4, 2).reshape(n, 16)
    sc = (low | (high << 4)).float() - 32
    dl = (d * sc).reshape(n, 16, 1)
    ql = _bits(qs, 32, 2).reshape(n, 16, 16)
    qh = _bits(hmask, 32, 1).reshape(n, 16, 16) ^ 1  # the offset of 4 applies when the mask bit is 0
    q = ql.float() - (qh << 2).float()
    return (dl * q).reshape(n, QK_K)


def _k_scale_min(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: per 32-value sub-block, the scale d * sc and the offset dmin * m, float32 [n, 8, 1] each
    (fp16 d and dmin at bytes 0 and 2, then eight 6-bit scales and mins packed in 12 bytes)."""
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    packed = blocks[:, 4:16].reshape(n, 3, 4)
    sd, m, m_d = packed[:, 0], packed[:, 1], packed[:, 2]
    sc = torch.cat([sd & 0x3F, (m_d & 0x0F) | ((sd >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return (d * sc.float()).reshape(n, 8, 1), (dmin * mn.float()).reshape(n, 8, 1)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    dl, ml = _k_scale_min(blocks)
    q = _nibbles(blocks[:, 16:], 32).reshape(n, 8, 32).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    dl, ml = _k_scale_min(blocks)
    qh = _bits(blocks[:, 16:48], 32, 1).reshape(n, 8, 32)
    ql = _nibbles(blocks[:, 48:], 32).reshape(n, 8, 32)
    q = (ql | (qh << 4)).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    ql = _nibbles(blocks[:, :128], 64).reshape(n, 8, 32)
    qh = _bits(blocks[:, 128:192], 32, 2).reshape(n, 8, 32)
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(blocks, 208) * scales).reshape(n, 16, 1)
    q = ((ql | (qh << 4)).float() - 32).reshape(n, 16, 16)
    return (d * q).reshape(n, QK_K)


_BLOCK_DEQUANT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}
_PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
SUPPORTED_TYPES = (*_PLAIN, *_BLOCK_DEQUANT)
# GGML type name -> (values per block, bytes per block), from gguf-py's table
BLOCK_GEOMETRY: dict[str, tuple[int, int]] = {qtype: block_geometry(qtype) for qtype in SUPPORTED_TYPES}


def check_supported(qtype: str, what: str = "tensor") -> None:
    """Raise UnsupportedQuantError naming `what` and `qtype` unless this module can dequantize it."""
    if qtype not in BLOCK_GEOMETRY:
        raise UnsupportedQuantError(
            f"{what} has tensor type {qtype}, which gdsllm cannot dequantize "
            f"(supported: {', '.join(SUPPORTED_TYPES)})",
            "use a GGUF quantized to one of the supported types (e.g. Q4_K_M, Q8_0) or convert from safetensors")


def dequantize(raw: torch.Tensor, qtype: str, chunk_rows: int = 4096) -> torch.Tensor:
    """float32 [rows, cols] from GGML bytes uint8 [rows, row_bytes] (or a typed F32/F16/BF16 tensor).

    Works in chunks of `chunk_rows` rows to bound the temporary memory; the result is on `raw`'s device."""
    check_supported(qtype)
    if qtype in _PLAIN:
        if raw.dtype == torch.uint8:
            raw = raw.contiguous().view(_PLAIN[qtype])
        return raw.float()
    if raw.dtype != torch.uint8 or raw.dim() != 2:
        raise ValueError(f"{qtype} data must be uint8 [rows, row_bytes], got {raw.dtype} {list(raw.shape)}")
    block_values, block_bytes = BLOCK_GEOMETRY[qtype]
    rows, row_bytes = raw.shape
    if row_bytes % block_bytes:
        raise ValueError(f"{qtype} rows hold whole {block_bytes}-byte blocks; got {row_bytes} bytes per row")
    cols = row_bytes // block_bytes * block_values
    out = torch.empty(rows, cols, dtype=torch.float32, device=raw.device)
    kernel = _BLOCK_DEQUANT[qtype]
    for start in range(0, rows, chunk_rows):
        part = raw[start:start + chunk_rows]
        blocks = part.contiguous().view(-1, block_bytes)
        out[start:start + part.shape[0]] = kernel(blocks).view(part.shape[0], cols)
    return out
