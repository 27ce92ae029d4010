"""gdsllm_core.quant.ggml against gguf-py's reference dequantization, bit for bit."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import dequantize as gguf_dequantize
from llama_testing import random_blocks, store_is_empty, write_llama_gguf

from gdsllm_core.convert import convert
from gdsllm_core.errors import GdsllmError, UnknownArchitectureError, UnsupportedQuantError
from gdsllm_core.layout.store import ModelStore
from gdsllm_core.quant import ggml
from gdsllm_core.runtime.residency import Placement, TieredResidency
from gdsllm_llama.gguf_convert import unpermute_rows

ALL_TYPES = [qtype for qtype in ggml.SUPPORTED_TYPES if qtype != "IQ1_M"]  # IQ1_M: tests/unit/test_quant_iq.py


def assert_bits_equal(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert actual.shape == expected.shape, what
    same = actual.view(np.uint32) == expected.astype(np.float32).view(np.uint32)
    if not same.all():
        row, col = np.argwhere(~same)[0]
        raise AssertionError(f"{what}: {int((~same).sum())} values differ, first at [{row}, {col}]: "
                             f"{actual[row, col]!r} vs {expected[row, col]!r}")


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_dequantize_random_blocks_bit_exact(qtype):
    rng = np.random.default_rng(abs(hash(qtype)) % 2**32)
    raw = random_blocks(qtype, rows=48, cols=1024, rng=rng)
    expected = gguf_dequantize(raw, GGMLQuantizationType[qtype]).reshape(48, 1024)
    actual = ggml.dequantize(torch.from_numpy(raw), qtype).numpy()
    assert_bits_equal(actual, expected, qtype)


def test_dequantize_chunking_and_typed_input():
    rng = np.random.default_rng(1)
    raw = random_blocks("Q4_K", rows=37, cols=512, rng=rng)
    whole = ggml.dequantize(torch.from_numpy(raw), "Q4_K")
    chunked = ggml.dequantize(torch.from_numpy(raw), "Q4_K", chunk_rows=5)
    assert torch.equal(whole, chunked)
    halves = torch.randn(4, 8).half()
    assert torch.equal(ggml.dequantize(halves, "F16"), halves.float())


@pytest.mark.parametrize("qtype", ["Q8_K", "Q8_1", "TQ1_0", "nonsense"])
def test_unknown_type_names_it(qtype):
    with pytest.raises(UnsupportedQuantError, match=qtype):
        ggml.dequantize(torch.zeros(1, 66, dtype=torch.uint8), qtype)


# One-layer llama GGUFs that between them hold every supported type but IQ1_M (K- and I-quants need rows of 256
# values; IQ1_M, whose scale random bytes may make a NaN, is tested in tests/unit/test_quant_iq.py).
DIM, FFN, VOCAB = 256, 512, 64
FILES = [
    {"token_embd.weight": "Q5_0", "output.weight": "Q5_1", "blk.0.attn_q.weight": "Q2_K",
     "blk.0.attn_k.weight": "Q3_K", "blk.0.attn_v.weight": "Q4_K", "blk.0.attn_output.weight": "Q5_K",
     "blk.0.ffn_gate.weight": "Q6_K", "blk.0.ffn_up.weight": "Q4_0", "blk.0.ffn_down.weight": "Q4_1"},
    {"token_embd.weight": "Q8_0", "output.weight": "F16", "blk.0.attn_q.weight": "BF16",
     "blk.0.attn_k.weight": "Q8_0", "blk.0.attn_v.weight": "F32", "blk.0.attn_output.weight": "Q6_K",
     "blk.0.ffn_gate.weight": "Q4_K", "blk.0.ffn_up.weight": "Q5_K", "blk.0.ffn_down.weight": "Q3_K"},
    {"token_embd.weight": "IQ4_NL", "output.weight": "IQ4_XS", "blk.0.attn_q.weight": "IQ3_S",
     "blk.0.attn_k.weight": "IQ3_XXS", "blk.0.attn_v.weight": "IQ2_XXS", "blk.0.attn_output.weight": "IQ2_XS",
     "blk.0.ffn_gate.weight": "IQ2_S", "blk.0.ffn_up.weight": "IQ1_S", "blk.0.ffn_down.weight": "MXFP4"},
]
SHAPES = {"token_embd.weight": (VOCAB, DIM), "output.weight": (VOCAB, DIM), "blk.0.attn_q.weight": (DIM, DIM),
          "blk.0.attn_k.weight": (DIM // 2, DIM), "blk.0.attn_v.weight": (DIM // 2, DIM),
          "blk.0.attn_output.weight": (DIM, DIM), "blk.0.ffn_gate.weight": (FFN, DIM),
          "blk.0.ffn_up.weight": (FFN, DIM), "blk.0.ffn_down.weight": (DIM, FFN)}
HEADS, KV_HEADS = 4, 2


def _one_layer_gguf(path, types, rng, override: dict | None = None):
    tensors = {name: (random_blocks(qtype, *SHAPES[name], rng), qtype) for name, qtype in types.items()}
    for norm in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        tensors[norm] = (rng.uniform(0.5, 1.5, DIM).astype(np.float32), "F32")
    tensors.update(override or {})
    return write_llama_gguf(path, tensors, n_layers=1, dim=DIM, n_heads=HEADS, n_kv_heads=KV_HEADS, ffn_dim=FFN,
                            vocab_size=VOCAB)


@pytest.mark.parametrize("file_index", range(len(FILES)))
def test_gguf_converter_keeps_blocks_and_dequantizes_exactly(tmp_path, file_index):
    rng = np.random.default_rng(10 + file_index)
    path = _one_layer_gguf(tmp_path / "tiny.gguf", FILES[file_index], rng)
    entry = convert(path, ModelStore(tmp_path / "models"), "tiny")
    reader = GGUFReader(path)
    scheduler = TieredResidency(entry, Placement())
    try:
        stored = {}
        for extent in entry.manifest.extents:
            views = scheduler.fetch(extent.name)
            stored.update({info.name: (info, views[info.name]) for info in extent.tensors})
        for tensor in reader.tensors:
            info, view = stored[tensor.name]
            assert info.qtype == tensor.tensor_type.name
            expected = gguf_dequantize(tensor.data, tensor.tensor_type).reshape(info.shape)
            raw = np.asarray(tensor.data).reshape(info.shape[0], -1)
            if tensor.name.endswith(("attn_q.weight", "attn_k.weight")):  # stored in HF's rope layout
                heads = HEADS if "attn_q" in tensor.name else KV_HEADS
                expected, raw = unpermute_rows(expected, heads), unpermute_rows(raw, heads)
            assert view.contiguous().view(torch.uint8).numpy().tobytes() == raw.tobytes(), f"{tensor.name}: bytes changed"
            actual = ggml.dequantize(view, info.qtype).reshape(info.shape).numpy()
            assert_bits_equal(actual.reshape(info.shape[0], -1), expected.reshape(info.shape[0], -1), tensor.name)
    finally:
        scheduler.close()


def test_gguf_with_unsupported_type_is_refused(tmp_path):
    rng = np.random.default_rng(3)
    ternary_block_bytes = 66  # TQ2_0: 256 values in 66 bytes
    bad = rng.integers(0, 256, size=(FFN, DIM // 256 * ternary_block_bytes), dtype=np.uint8)
    path = _one_layer_gguf(tmp_path / "tq.gguf", FILES[0], rng, {"blk.0.ffn_up.weight": (bad, "TQ2_0")})
    root = tmp_path / "models"
    with pytest.raises(UnsupportedQuantError, match=r"blk\.0\.ffn_up\.weight.*TQ2_0"):
        convert(path, ModelStore(root), "iq")
    assert store_is_empty(root)


@pytest.mark.parametrize("cut", [1, 5000, 200_000])
def test_truncated_gguf_is_refused(tmp_path, cut):
    rng = np.random.default_rng(4)
    path = _one_layer_gguf(tmp_path / "cut.gguf", FILES[1], rng)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - cut])
    root = tmp_path / "models"
    with pytest.raises(GdsllmError, match="truncated|cut.gguf"):
        convert(path, ModelStore(root), "cut")
    assert store_is_empty(root)


def test_gguf_of_another_architecture_is_not_claimed(tmp_path):
    writer = GGUFWriter(str(tmp_path / "other.gguf"), arch="mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    root = tmp_path / "models"
    with pytest.raises(UnknownArchitectureError, match="other.gguf"):
        convert(tmp_path / "other.gguf", ModelStore(root), "other")
    assert store_is_empty(root)
