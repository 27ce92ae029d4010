"""Split GGUFs (`-00001-of-0000N`, as large models are published) convert like the same model in one file; a missing
or truncated part is named; the model's quant is the publisher's `general.file_type` name."""

import numpy as np
import pytest
from gguf import GGUFReader, LlamaFileType
from llama_testing import random_blocks, store_is_empty, write_llama_gguf

from gdsllm_core.convert import convert
from gdsllm_core.convert.gguf_file import file_type_name, parse_header, read_header, split_parts
from gdsllm_core.errors import ConversionError
from gdsllm_core.layout.store import ModelStore
from gdsllm_core.pull import pull

DIM, FFN, VOCAB, HEADS, KV_HEADS = 256, 512, 64, 4, 2
TYPES = {"token_embd.weight": "Q8_0", "output.weight": "Q6_K", "blk.0.attn_q.weight": "Q4_K",
         "blk.0.attn_k.weight": "Q4_K", "blk.0.attn_v.weight": "Q6_K", "blk.0.attn_output.weight": "IQ4_XS",
         "blk.0.ffn_gate.weight": "Q4_K", "blk.0.ffn_up.weight": "Q4_K", "blk.0.ffn_down.weight": "Q5_K",
         "blk.1.attn_q.weight": "Q4_K", "blk.1.attn_k.weight": "Q4_K", "blk.1.attn_v.weight": "Q6_K",
         "blk.1.attn_output.weight": "Q4_K", "blk.1.ffn_gate.weight": "Q4_K", "blk.1.ffn_up.weight": "Q4_K",
         "blk.1.ffn_down.weight": "Q6_K"}
SHAPES = {"token_embd": (VOCAB, DIM), "output": (VOCAB, DIM), "attn_q": (DIM, DIM), "attn_k": (DIM // 2, DIM),
          "attn_v": (DIM // 2, DIM), "attn_output": (DIM, DIM), "ffn_gate": (FFN, DIM), "ffn_up": (FFN, DIM),
          "ffn_down": (DIM, FFN)}
Q4_K_M = LlamaFileType.MOSTLY_Q4_K_M


def two_layer_tensors(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, qtype in TYPES.items():
        shape = SHAPES[name.split(".")[-2]]
        tensors[name] = (random_blocks(qtype, *shape, rng), qtype)
    for norm in ("blk.0.attn_norm", "blk.0.ffn_norm", "blk.1.attn_norm", "blk.1.ffn_norm", "output_norm"):
        tensors[f"{norm}.weight"] = (rng.uniform(0.5, 1.5, DIM).astype(np.float32), "F32")
    return tensors


def write(path, split_max_tensors: int = 0):
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_llama_gguf(path, two_layer_tensors(0), n_layers=2, dim=DIM, n_heads=HEADS, n_kv_heads=KV_HEADS,
                            ffn_dim=FFN, vocab_size=VOCAB, file_type=Q4_K_M, split_max_tensors=split_max_tensors)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(the model in one file, its first part when gguf-py splits it into files of at most 8 tensors)."""
    folder = tmp_path_factory.mktemp("gguf")
    single = write(folder / "one" / "Tiny-Q4_K_M.gguf")
    write(folder / "split" / "Tiny-Q4_K_M.gguf", split_max_tensors=8)
    parts = sorted((folder / "split").glob("*.gguf"))
    assert [p.name for p in parts] == [f"Tiny-Q4_K_M-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    return single, parts


def stored_tensors(entry):
    return {tensor.name: (tensor.qtype, tensor.shape, tensor.crc32) for extent in entry.manifest.extents
            for tensor in extent.tensors}


def test_split_gguf_converts_like_one_file(tmp_path, files):
    single, parts = files
    store = ModelStore(tmp_path / "models")
    whole = convert(single, store, "whole")
    split = convert(parts[0], store, "split")
    assert stored_tensors(split) == stored_tensors(whole)
    assert split.manifest.quant == whole.manifest.quant == "Q4_K_M"  # general.file_type, not the commonest type
    assert split.manifest.source["file"] == parts[0].name


def test_pull_of_a_local_first_part_takes_every_part(tmp_path, files):
    _, parts = files
    entry = pull(str(parts[0]), ModelStore(tmp_path / "models"))
    assert entry.name == "tiny-q4_k_m"
    assert len(stored_tensors(entry)) == len(TYPES) + 5


def test_missing_part_is_named(tmp_path, files):
    _, parts = files
    folder = tmp_path / "partial"
    folder.mkdir()
    for part in (parts[0], parts[2]):
        (folder / part.name).write_bytes(part.read_bytes())
    root = tmp_path / "models"
    with pytest.raises(ConversionError, match="Tiny-Q4_K_M-00002-of-00003.gguf.*missing") as error:
        convert(folder / parts[0].name, ModelStore(root), "x")
    assert "every part" in error.value.hint
    assert store_is_empty(root)


@pytest.mark.parametrize("cut", [10, 3000])
def test_truncated_part_is_named(tmp_path, files, cut):
    _, parts = files
    folder = tmp_path / "cut"
    folder.mkdir()
    for part in parts:
        data = part.read_bytes()
        (folder / part.name).write_bytes(data[:-cut] if part == parts[1] else data)
    root = tmp_path / "models"
    with pytest.raises(ConversionError, match="Tiny-Q4_K_M-00002-of-00003.gguf") as error:
        convert(folder / parts[0].name, ModelStore(root), "x")
    assert "truncated" in error.value.hint
    assert store_is_empty(root)


def test_header_reader_agrees_with_gguf_py(files):
    single, parts = files
    reader = GGUFReader(single)
    header = read_header(single)
    scalars = {key: field.contents() for key, field in reader.fields.items()
               if not key.startswith("GGUF.") and not isinstance(field.contents(), list)}
    assert header.metadata == scalars
    assert header.n_tensors == len(reader.tensors) and header.data_offset == reader.data_offset
    data = single.read_bytes()
    assert parse_header(data[:header.data_offset]).metadata == scalars  # the header alone is enough
    assert read_header(parts[1]).metadata["split.no"] == 1
    assert split_parts(parts[2]) == parts


@pytest.mark.parametrize(("value", "name"), [(15, "Q4_K_M"), (30, "IQ4_XS"), (1, "F16"), (0, "F32"),
                                              (38, "MXFP4_MOE"), (18 | 1024, "Q6_K"), (999, None)])
def test_file_type_names(value, name):
    assert file_type_name({"general.file_type": value}) == name
