"""Byte sizes of the tensor types a manifest may hold, and the 4 KiB alignment rule."""

import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from gdsllm_core.errors import UnsupportedQuantError

ALIGNMENT = 4096  # cuFile and O_DIRECT need file offsets, sizes and buffers on 4 KiB boundaries

PLAIN_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "U8": torch.uint8, "I8": torch.int8, "I32": torch.int32, "U32": torch.uint32, "F64": torch.float64,
}
FLOAT_QTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}  # checkpoint float dtype -> qtype


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


def block_geometry(qtype: str) -> tuple[int, int]:
    """(values per block, bytes per block) of a GGML type."""
    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    except KeyError:
        raise UnsupportedQuantError(f"unknown tensor type {qtype!r}") from None


def tensor_nbytes(qtype: str, shape: list[int] | tuple[int, ...]) -> int:
    """Bytes a tensor of `shape` (torch order, logical) takes when stored as `qtype`."""
    count = 1
    for dim in shape:
        count *= int(dim)
    if qtype in PLAIN_DTYPES:
        return count * PLAIN_DTYPES[qtype].itemsize
    block_values, block_bytes = block_geometry(qtype)
    if shape and shape[-1] % block_values:
        raise UnsupportedQuantError(
            f"a {qtype} tensor needs rows that are a multiple of {block_values} values, got shape {list(shape)}")
    return count // block_values * block_bytes


def raw_row_bytes(qtype: str, n_cols: int) -> int:
    return tensor_nbytes(qtype, [n_cols])
