"""The I-quants and MXFP4 on the CPU (gdsllm_core.quant.ggml) against gguf-py's dequantization, bit for bit: on
blocks written by llama.cpp's llama-quantize (the committed fixture, see data/make_llama_quantize_blocks.py) and on
random blocks, which reach every grid point and sign pattern."""

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize as gguf_dequantize

from gdsllm_core.errors import UnsupportedQuantError
from gdsllm_core.quant import ggml

FIXTURE = Path(__file__).parent / "data" / "llama_quantize_blocks.gguf"
NEW_TYPES = ("IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M", "MXFP4")
# how far llama-quantize's blocks may land from the f32 weights they were made from (relative L2 error): a wrong
# block reading lands near 1 or beyond
MAX_QUANT_ERROR = {"IQ4_NL": 0.12, "IQ4_XS": 0.12, "MXFP4": 0.16, "IQ3_S": 0.2, "IQ3_XXS": 0.25, "IQ2_S": 0.38,
                   "IQ2_XS": 0.4, "IQ2_XXS": 0.45, "IQ1_S": 0.6, "IQ1_M": 0.6}


def assert_bits_equal(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert actual.shape == expected.shape, what
    same = actual.view(np.uint32) == expected.astype(np.float32).view(np.uint32)
    if not same.all():
        row, col = np.argwhere(~same)[0]
        raise AssertionError(f"{what}: {int((~same).sum())} values differ, first at [{row}, {col}]: "
                             f"{actual[row, col]!r} vs {expected[row, col]!r}")


def fixture_tensors() -> dict[str, np.ndarray]:
    return {tensor.name: np.array(tensor.data) for tensor in GGUFReader(FIXTURE).tensors}


@pytest.mark.parametrize("qtype", NEW_TYPES)
def test_llama_quantize_blocks_bit_exact(qtype):
    tensors = fixture_tensors()
    raw, source = tensors[qtype], tensors[f"{qtype}.source"]
    expected = gguf_dequantize(raw, GGMLQuantizationType[qtype]).reshape(source.shape)
    actual = ggml.dequantize(torch.from_numpy(raw), qtype).numpy()
    assert_bits_equal(actual, expected, qtype)
    error = np.linalg.norm(actual - source) / np.linalg.norm(source)
    assert error < MAX_QUANT_ERROR[qtype], f"{qtype}: {error:.3f} from the weights llama-quantize started from"


def random_blocks(qtype: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [rows, row_bytes] of random codes with a finite scale of either sign in every block."""
    block_values, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    n_blocks = rows * cols // block_values
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    scale = (rng.standard_normal(n_blocks) * 0.05).astype(np.float16).view(np.uint16)
    if qtype == "IQ1_M":  # the fp16 scale is spread over the top nibbles of the last four uint16 words
        words = blocks[:, 48:56].copy().view(np.uint16)
        for k, shift in enumerate((0, 4, 8, 12)):
            words[:, k] = (words[:, k] & 0x0FFF) | (((scale >> shift) & 0xF) << 12)
        blocks[:, 48:56] = words.view(np.uint8)
    elif qtype == "MXFP4":  # an e8m0 exponent byte: 2^(e - 127), kept well inside float32
        blocks[:, 0] = rng.integers(100, 150, size=n_blocks, dtype=np.uint8)
    else:
        blocks[:, :2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("qtype", NEW_TYPES)
def test_random_blocks_bit_exact(qtype):
    rng = np.random.default_rng(NEW_TYPES.index(qtype))
    raw = random_blocks(qtype, rows=64, cols=1024, rng=rng)
    expected = gguf_dequantize(raw, GGMLQuantizationType[qtype]).reshape(64, 1024)
    actual = ggml.dequantize(torch.from_numpy(raw), qtype, chunk_rows=24).numpy()
    assert_bits_equal(actual, expected, qtype)


@pytest.mark.parametrize("qtype", ["TQ1_0", "TQ2_0", "NVFP4", "Q8_1", "Q8_K"])
def test_other_types_still_refused(qtype):
    with pytest.raises(UnsupportedQuantError, match=qtype):
        ggml.check_supported(qtype, "tensor blk.0.ffn_up.weight")
