"""Dequantize GGML tensors in torch on the CPU, vectorised over all blocks at once.

Input: the raw bytes of a tensor as GGUF stores them, uint8 [rows, row_bytes] (plain F32/F16/BF16 tensors may also
come already typed). Output: float32 [rows, cols]. The arithmetic follows gguf-py's `gguf.quants` step by step
(the same float32 products and sums, in the same order, no fused multiply-add), so results are bit-exact with
`gguf.quants.dequantize`. Block layouts are those of ggml's `ggml-common.h`; QK_K = 256 for the K- and I-quants.
The I-quants' lattices (grids of 4 or 8 magnitudes per index) are gguf-py's own tables, read once.
"""

from collections.abc import Callable
from functools import cache

import numpy as np
import torch
from gguf import quants as gguf_quants

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


# IQ4_NL / IQ4_XS: the 16 non-linear 4-bit levels (ggml's kvalues_iq4nl)
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
# MXFP4: the 16 e2m1 values, doubled (ggml's kvalues_mxfp4; the e8m0 scale is halved to match)
MXFP4_LEVELS = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)
IQ1_DELTA = 0.125  # IQ1_S / IQ1_M: the shift of every grid value, its sign stored per group


def _levels(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


@cache
def _grid_table(qtype: str) -> torch.Tensor:
    """An I-quant's lattice as float32 [points, values per point], from gguf-py (ggml's iq*_grid tables)."""
    kind = getattr(gguf_quants, qtype)
    kind.init_grid()
    return torch.from_numpy(np.ascontiguousarray(kind.grid.reshape(kind.grid_shape)))


def _grid(qtype: str, index: torch.Tensor) -> torch.Tensor:
    """Grid points for integer indices [...]: float32 [..., values per point]."""
    return _grid_table(qtype).to(index.device)[index.long()]


@cache
def _sign_table() -> torch.Tensor:
    """ggml's ksigns_iq2xs as float32 [128, 8] of +-1: 7 stored sign bits, the 8th makes the count of minuses even."""
    index = torch.arange(128)
    parity = torch.zeros_like(index)
    for bit in range(7):
        parity ^= (index >> bit) & 1
    bits = index | (parity << 7)
    return 1.0 - 2.0 * ((bits[:, None] >> torch.arange(8)) & 1).float()


def _signs_7bit(index: torch.Tensor) -> torch.Tensor:
    """+-1 float32 [..., 8] for 7-bit sign indices [...]."""
    return _sign_table().to(index.device)[index.long()]


def _sign_bits(packed: torch.Tensor) -> torch.Tensor:
    """+-1 float32 [n, bytes * 8] from sign bytes [n, bytes], bit i of byte j -> value 8j + i."""
    bits = _bits(packed, 1, 1).reshape(packed.shape[0], -1)
    return torch.where(bits == 0, 1.0, -1.0)


def _shifts(values: tuple[int, ...] | range, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(tuple(values), dtype=like.dtype, device=like.device)


def _u16(packed: torch.Tensor) -> torch.Tensor:
    """Little-endian uint16 words of bytes [n, 2k] as int32 [n, k]."""
    pairs = packed.reshape(packed.shape[0], -1, 2).to(torch.int32)
    return pairs[..., 0] | (pairs[..., 1] << 8)


def _u32(packed: torch.Tensor) -> torch.Tensor:
    """Little-endian uint32 words of bytes [n, 4k] as int64 [n, k]."""
    quads = packed.reshape(packed.shape[0], -1, 4).to(torch.int64)
    return quads[..., 0] | (quads[..., 1] << 8) | (quads[..., 2] << 16) | (quads[..., 3] << 24)


def _iq2_xxs(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16(blocks, 0)
    words = _u32(blocks[:, 2:66]).reshape(n, 8, 2)  # per 32 values: 4 grid indices, then signs and scale
    aux = words[..., 1]
    db = (d * (0.5 + (aux >> 28).float()) * 0.25).reshape(n, 8, 1, 1)
    signs = _signs_7bit((aux[..., None] >> _shifts((0, 7, 14, 21), aux)) & 0x7F)  # [n, 8, 4, 8]
    index = blocks[:, 2:66].reshape(n, 8, 8)[..., :4]
    return (db * _grid("IQ2_XXS", index) * signs).reshape(n, QK_K)


def _iq2_xs(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16(blocks, 0)
    qs = _u16(blocks[:, 2:66])  # [n, 32]: 9-bit grid index, 7-bit sign index
    scales = _nibbles(blocks[:, 66:74], 1).reshape(n, 16).float()
    db = (d * (0.5 + scales) * 0.25).reshape(n, 16, 1, 1)
    grid = _grid("IQ2_XS", qs & 511).reshape(n, 16, 2, 8)
    signs = _signs_7bit(qs >> 9).reshape(n, 16, 2, 8)
    return (db * grid * signs).reshape(n, QK_K)


def _iq2_s(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16(blocks, 0)
    qh = _bits(blocks[:, 66:74], 1, 2).reshape(n, 32).to(torch.int32)
    index = blocks[:, 2:34].to(torch.int32) | (qh << 8)
    signs = _sign_bits(blocks[:, 34:66]).reshape(n, 16, 2, 8)
    scales = _nibbles(blocks[:, 74:82], 1).reshape(n, 16).float()
    db = (d * (0.5 + scales) * 0.25).reshape(n, 16, 1, 1)
    return (db * _grid("IQ2_S", index).reshape(n, 16, 2, 8) * signs).reshape(n, QK_K)


def _iq3_xxs(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16(blocks, 0)
    aux = _u32(blocks[:, 66:98])  # [n, 8]: 4 x 7-bit sign indices and a 4-bit scale per 32 values
    db = (d * (0.5 + (aux >> 28).float()) * 0.5).reshape(n, 8, 1, 1)
    signs = _signs_7bit((aux[..., None] >> _shifts((0, 7, 14, 21), aux)) & 0x7F)  # [n, 8, 4, 8]
    grid = _grid("IQ3_XXS", blocks[:, 2:66]).reshape(n, 8, 4, 8)
    return (db * grid * signs).reshape(n, QK_K)


def _iq3_s(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16(blocks, 0)
    qh = _bits(blocks[:, 66:74], 1, 1).reshape(n, 64).to(torch.int32)
    index = blocks[:, 2:66].to(torch.int32) | (qh << 8)
    signs = _sign_bits(blocks[:, 74:106]).reshape(n, 8, 4, 8)
    scales = _nibbles(blocks[:, 106:110], 1).reshape(n, 8)
    db = (d * (1 + 2 * scales).float()).reshape(n, 8, 1, 1)
    return (db * _grid("IQ3_S", index).reshape(n, 8, 4, 8) * signs).reshape(n, QK_K)


def _iq1_s(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16(blocks, 0)
    qh = _u16(blocks[:, 34:50])  # [n, 8]: 4 x 3 high index bits, a 3-bit scale, the delta's sign
    dl = (d * (2 * ((qh >> 12) & 7) + 1).float()).reshape(n, 8, 1, 1)
    delta = torch.where((qh & 0x8000) == 0, IQ1_DELTA, -IQ1_DELTA).reshape(n, 8, 1, 1)
    high = (qh[..., None] >> _shifts((0, 3, 6, 9), qh)) & 7
    index = blocks[:, 2:34].to(torch.int32).reshape(n, 8, 4) | (high << 8)
    return (dl * (_grid("IQ1_S", index) + delta)).reshape(n, QK_K)


def _iq1_m(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales = _u16(blocks[:, 48:56])  # [n, 4]: 12 bits of 3-bit scales each, the fp16 d in the top nibbles
    d_bits = ((scales & 0xF000) >> _shifts((12, 8, 4, 0), scales)).sum(dim=-1)
    d = torch.stack([d_bits & 0xFF, d_bits >> 8], dim=-1).to(torch.uint8).view(torch.float16).float().reshape(n, 1)
    sub = ((scales[..., None] >> _shifts((0, 3, 6, 9), scales)) & 7).reshape(n, 16)
    dl = (d * (2 * sub + 1).float()).reshape(n, 8, 2, 1, 1)
    qh = _nibbles(blocks[:, 32:48], 1).reshape(n, 32).to(torch.int32)
    index = blocks[:, :32].to(torch.int32) | ((qh & 7) << 8)
    delta = torch.where((qh & 8) == 0, IQ1_DELTA, -IQ1_DELTA).reshape(n, 8, 2, 2, 1)
    grid = _grid("IQ1_M", index).reshape(n, 8, 2, 2, 8)
    return (dl * (grid + delta)).reshape(n, QK_K)


def _iq4_nl(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)
    q = _nibbles(blocks[:, 2:], 16).reshape(blocks.shape[0], 32)
    return d * _levels(IQ4_LEVELS, blocks.device)[q.long()]


def _iq4_xs(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16(blocks, 0)
    scales_h = _u16(blocks[:, 2:4])  # [n, 1]: 2 high bits per sub-block
    high = (scales_h >> _shifts(range(0, 16, 2), scales_h)) & 3
    low = _nibbles(blocks[:, 4:8], 1).reshape(n, 8).to(torch.int32)
    dl = (d * ((low | (high << 4)) - 32).float()).reshape(n, 8, 1)
    q = _nibbles(blocks[:, 8:], 16).reshape(n, 8, 32)
    return (dl * _levels(IQ4_LEVELS, blocks.device)[q.long()]).reshape(n, QK_K)


def _e8m0_half(e: torch.Tensor) -> torch.Tensor:
    """Half of 2^(e - 127) for e8m0 exponents [n, 1] as float32 (ggml_e8m0_to_fp32_half)."""
    e = e.to(torch.int32)
    bits = torch.where(e < 2, 0x00200000 << e, (e - 1) << 23)
    return bits.view(torch.float32)


def _mxfp4(blocks: torch.Tensor) -> torch.Tensor:
    d = _e8m0_half(blocks[:, :1])
    q = _nibbles(blocks[:, 1:], 16).reshape(blocks.shape[0], 32)
    return d * _levels(MXFP4_LEVELS, blocks.device)[q.long()]


_BLOCK_DEQUANT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
    "IQ4_NL": _iq4_nl, "IQ4_XS": _iq4_xs, "IQ3_S": _iq3_s, "IQ3_XXS": _iq3_xxs, "IQ2_XXS": _iq2_xxs,
    "IQ2_XS": _iq2_xs, "IQ2_S": _iq2_s, "IQ1_S": _iq1_s, "IQ1_M": _iq1_m, "MXFP4": _mxfp4,
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
