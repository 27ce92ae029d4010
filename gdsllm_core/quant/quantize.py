"""Quantize float tensors to GGML block formats at conversion time (through gguf-py's reference quantizers,
which are bit-exact with ggml's C reference)."""

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize as gguf_quantize

from gdsllm_core.errors import UnsupportedQuantError

QUANTIZABLE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def quantize(weight: torch.Tensor, qtype: str) -> np.ndarray:
    """float [rows, cols] -> GGML blocks uint8 [rows, row_bytes] of `qtype` (cols a multiple of 32)."""
    qtype = qtype.upper()
    if qtype not in QUANTIZABLE:
        raise UnsupportedQuantError(f"quantizing to {qtype} is not supported (supported: {', '.join(QUANTIZABLE)})",
                                    "pick --quant q8_0 or q4_0, or keep the checkpoint's own dtype")
    if weight.dim() != 2 or weight.shape[-1] % 32:
        raise UnsupportedQuantError(f"{qtype} needs a 2-D tensor with rows of a multiple of 32 values, "
                                    f"got shape {list(weight.shape)}")
    data = weight.detach().to(torch.float32).contiguous().numpy()
    return gguf_quantize(data, GGMLQuantizationType[qtype])
