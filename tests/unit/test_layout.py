"""The on-disk format: alignment, checksums, atomic conversion, truncation and corruption errors."""

import os

import numpy as np
import pytest

from gdsllm_core.errors import BadRequestError, ConversionError, CorruptModelError, ModelNotFoundError
from gdsllm_core.layout import ALIGNMENT, ModelStore, ModelWriter, TokenizerInfo
from gdsllm_core.layout.store import safe_name, verify

TOKENIZER = TokenizerInfo(kind="hf", file="tokenizer.json", eos_ids=[2])


def write_model(root, name="tiny", rng=None):
    rng = rng or np.random.default_rng(0)
    arrays = {
        "blk.0.attn_norm.weight": rng.standard_normal(7, dtype=np.float32),
        "blk.0.attn_q.weight": rng.standard_normal((5, 3), dtype=np.float32),
        "blk.0.raw": rng.integers(0, 2**32, size=(3, 11), dtype=np.uint32),
        "token_embd.weight": rng.standard_normal((9, 4), dtype=np.float32).astype(np.float16),
    }
    with ModelWriter(root, name) as writer:
        writer.add_extent("blk.0", [(n, "U32" if a.dtype == np.uint32 else "F32", a.shape, a)
                                    for n, a in arrays.items() if n.startswith("blk.0")])
        writer.add_extent("token_embd", [("token_embd.weight", "F16", [9, 4], arrays["token_embd.weight"])])
        writer.finish("llama", {"n_layers": 1}, TOKENIZER, files={"tokenizer.json": b"{}"})
    return arrays


def test_tensors_are_aligned_and_read_back_with_pread(tmp_path):
    arrays = write_model(tmp_path)
    entry = ModelStore(tmp_path).get("tiny")
    fd = os.open(entry.path / "weights.bin", os.O_RDONLY)
    try:
        for extent in entry.manifest.extents:
            assert extent.offset % ALIGNMENT == 0 and extent.nbytes % ALIGNMENT == 0
            for tensor in extent.tensors:
                assert tensor.offset % ALIGNMENT == 0
                data = os.pread(fd, tensor.nbytes, extent.offset + tensor.offset)
                assert data == arrays[tensor.name].tobytes()
    finally:
        os.close(fd)
    assert (entry.path / "tokenizer.json").read_bytes() == b"{}"
    assert verify(entry) == sum(a.nbytes for a in arrays.values())


def test_interrupted_conversion_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), ModelWriter(tmp_path, "broken") as writer:
        writer.add_extent("blk.0", [("x", "F32", [4], np.zeros(4, np.float32))])
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    assert ModelStore(tmp_path).list() == []


def test_wrong_byte_count_is_refused(tmp_path):
    with pytest.raises(ConversionError, match="needs 64 bytes"), ModelWriter(tmp_path, "bad") as writer:
        writer.add_extent("blk.0", [("x", "F32", [4, 4], np.zeros(15, np.float32))])
    assert list(tmp_path.iterdir()) == []


def test_truncated_file_names_file_and_tensor(tmp_path):
    write_model(tmp_path)
    path = tmp_path / "tiny" / "weights.bin"
    os.truncate(path, path.stat().st_size - ALIGNMENT - 1)
    with pytest.raises(CorruptModelError, match=r"weights\.bin.*token_embd\.weight"):
        ModelStore(tmp_path).get("tiny")


def test_flipped_byte_fails_checksum_naming_tensor(tmp_path):
    write_model(tmp_path)
    store = ModelStore(tmp_path)
    entry = store.get("tiny")
    tensor = entry.manifest.extent("blk.0").tensors[1]
    with open(entry.path / "weights.bin", "r+b") as handle:
        handle.seek(entry.manifest.extent("blk.0").offset + tensor.offset + 3)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(CorruptModelError, match="blk.0.attn_q.weight"):
        verify(entry)


@pytest.mark.parametrize("name", ["../x", "/etc", "a/b", "..", ".hidden", ""])
def test_unsafe_names_are_refused(tmp_path, name):
    store = ModelStore(tmp_path / "models")
    with pytest.raises(BadRequestError):
        store.remove(name)
    assert tmp_path.exists()


def test_missing_model_names_neither_the_store_nor_other_models(tmp_path):
    """Servers show this message to any client: it names the model asked for and `gdsllm list`, nothing else."""
    write_model(tmp_path)
    with pytest.raises(ModelNotFoundError) as raised:
        ModelStore(tmp_path).get("other")
    assert "'other'" in str(raised.value) and "gdsllm list" in str(raised.value)
    assert "tiny" not in str(raised.value) and str(tmp_path) not in str(raised.value)


def test_existing_model_is_not_overwritten(tmp_path):
    write_model(tmp_path)
    with pytest.raises(ConversionError, match="already exists"):
        ModelWriter(tmp_path, "tiny")


@pytest.mark.parametrize(("text", "expected"), [("SmolLM2-135M-Instruct.Q4_1", "smollm2-135m-instruct.q4_1"),
                                                ("My Llama (v2)", "my-llama--v2-"), ("..", "model"),
                                                ("Qwen3.5-MoE", "qwen3.5-moe")])
def test_default_names_are_made_safe(text, expected):
    assert safe_name(text) == expected
    ModelStore().path(expected)  # a valid name, or this raises
