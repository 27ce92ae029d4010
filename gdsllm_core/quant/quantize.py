"""Quantize float tensors to GGML block formats at conversion time.

Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 go through gguf-py's reference quantizers (bit-exact with ggml's C reference).
Q4_K is quantized here (gguf-py has no K-quant quantizer): per 32-value sub-block a scale and a min from its range,
both quantized to 6 bits against the super-block's fp16 `d` / `dmin`, then 4-bit codes against the quantized
scale and min. Simpler than llama.cpp's iterative search (`make_qkx2_quants`), so slightly less accurate, but the
bytes are a valid Q4_K that any GGML reader (gguf-py, llama.cpp) dequantizes.
"""

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize as gguf_quantize

from gdsllm_core.errors import UnsupportedQuantError
from gdsllm_core.layout.qtypes import block_geometry

QUANTIZABLE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K")
QK_K = 256


def block_values(qtype: str) -> int:
    """Values per block: a row must hold a whole number of blocks."""
    return block_geometry(qtype.upper())[0]


def quantize(weight: torch.Tensor, qtype: str) -> np.ndarray:
    """float [rows, cols] -> GGML blocks uint8 [rows, row_bytes] of `qtype` (cols a multiple of the block size)."""
    qtype = qtype.upper()
    if qtype not in QUANTIZABLE:
        raise UnsupportedQuantError(f"quantizing to {qtype} is not supported (supported: {', '.join(QUANTIZABLE)})",
                                    "pick --quant q8_0, q4_0 or q4_k, or keep the checkpoint's own dtype")
    if weight.dim() != 2 or weight.shape[-1] % block_values(qtype):
        raise UnsupportedQuantError(f"{qtype} needs a 2-D tensor with rows of a multiple of {block_values(qtype)} "
                                    f"values, got shape {list(weight.shape)}")
    if qtype == "Q4_K":
        return quantize_q4_k(weight)
    data = weight.detach().to(torch.float32).contiguous().numpy()
    return gguf_quantize(data, GGMLQuantizationType[qtype])


def _to_fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _codes(x: torch.Tensor, ls: torch.Tensor, lm: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor):
    """4-bit codes of sub-blocks x [blocks, 8, 32] for 6-bit scale/min codes ls, lm [blocks, 8]; and the
    squared error per sub-block of what the dequantizer will make of them."""
    step = d[:, None] * ls.float()  # the dequantizer's d * sc
    offset = dmin[:, None] * lm.float()  # the dequantizer's dmin * m
    safe_step = torch.where(step > 0, step, torch.ones_like(step))
    q = torch.clamp(torch.round((x + offset[..., None]) / safe_step[..., None]), 0, 15)
    q = torch.where(step[..., None] > 0, q, torch.zeros_like(q))
    error = (step[..., None] * q - offset[..., None] - x).pow(2).sum(dim=-1)
    return q.to(torch.uint8), error


def _best_codes(x: torch.Tensor, scale_ratio: torch.Tensor, min_ratio: torch.Tensor, d: torch.Tensor,
                dmin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sub-block, the best of rounding the 6-bit scale and min to nearest or up (rounding up keeps small
    sub-blocks next to a large one from collapsing to a zero scale)."""
    best = None
    for scale_round in (torch.round, torch.ceil):
        for min_round in (torch.round, torch.ceil):
            ls = torch.clamp(scale_round(scale_ratio), 0, 63).to(torch.uint8)
            lm = torch.clamp(min_round(min_ratio), 0, 63).to(torch.uint8)
            q, error = _codes(x, ls, lm, d, dmin)
            if best is None:
                best = [ls, lm, q, error]
                continue
            better = error < best[3]
            best = [torch.where(better, ls, best[0]), torch.where(better, lm, best[1]),
                    torch.where(better[..., None], q, best[2]), torch.minimum(error, best[3])]
    return best[0], best[1], best[2]


def quantize_q4_k(weight: torch.Tensor) -> np.ndarray:
    """float [rows, cols] (cols % 256 == 0) -> Q4_K blocks uint8 [rows, cols / 256 * 144]."""
    rows, cols = weight.shape
    x = weight.detach().to(torch.float32).reshape(-1, 8, 32)  # [blocks, sub-blocks, values]
    n = x.shape[0]
    low = torch.clamp(x.amin(dim=-1), max=0.0)  # a sub-block's min, never above 0 (stored negated)
    high = x.amax(dim=-1)
    scales = (high - low) / 15
    mins = -low
    d = (scales.amax(dim=-1) / 63).to(torch.float16).float()  # [blocks]
    dmin = (mins.amax(dim=-1) / 63).to(torch.float16).float()
    safe_d = torch.where(d > 0, d, torch.ones_like(d))
    safe_dmin = torch.where(dmin > 0, dmin, torch.ones_like(dmin))
    ls, lm, q = _best_codes(x, scales / safe_d[:, None], mins / safe_dmin[:, None], d, dmin)
    packed_scales = torch.cat([
        (ls[:, :4] & 0x3F) | ((ls[:, 4:] >> 4) << 6),
        (lm[:, :4] & 0x3F) | ((lm[:, 4:] >> 4) << 6),
        (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4),
    ], dim=-1)  # [blocks, 12]
    pairs = q.reshape(n, 4, 2, 32)  # sub-blocks 2k (low nibbles) and 2k+1 (high nibbles) share 32 bytes
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, 128)
    blocks = torch.cat([_to_fp16_bytes(d), _to_fp16_bytes(dmin), packed_scales, qs], dim=-1)  # [blocks, 144]
    return blocks.reshape(rows, cols // QK_K * 144).numpy()
