"""Bad input gets a clear error: an architecture no plugin handles names the installed plugins; a tensor type gdsllm
cannot dequantize names the tensor; configurations the plugin does not run are refused at conversion."""

import json

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter

from gdsllm_core.convert import convert
from gdsllm_core.errors import ConversionError, UnknownArchitectureError, UnsupportedQuantError
from gdsllm_core.layout.store import ModelStore


def write_gguf(path, arch: str, qtype: str = "F32", cols: int = 256):
    writer = GGUFWriter(str(path), arch=arch)
    writer.add_block_count(1)
    if qtype == "F32":
        writer.add_tensor("blk.0.attn_q.weight", np.zeros((4, cols), dtype=np.float32))
    else:
        block_values, block_bytes = 256, 66  # TQ2_0
        raw = np.zeros((4, cols // block_values * block_bytes), dtype=np.uint8)
        writer.add_tensor("blk.0.attn_q.weight", raw, raw_dtype=GGMLQuantizationType[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unknown_gguf_architecture_names_the_installed_plugins(tmp_path):
    path = write_gguf(tmp_path / "phi.gguf", "phi3")
    with pytest.raises(UnknownArchitectureError) as error:
        convert(path, ModelStore(tmp_path / "store"), "phi")
    assert "architecture 'phi3'" in str(error.value) and "qwen3" in str(error.value)
    assert "qwen3moe" in str(error.value)  # the architectures the plugins run


def test_unsupported_tensor_type_names_the_tensor(tmp_path):
    path = write_gguf(tmp_path / "q.gguf", "qwen3", qtype="TQ2_0")
    with pytest.raises(UnsupportedQuantError, match=r"blk\.0\.attn_q\.weight.*TQ2_0"):
        convert(path, ModelStore(tmp_path / "store"), "q")
    assert not any((tmp_path / "store").glob("*"))  # nothing left behind


@pytest.mark.parametrize("change, message", [
    ({"use_sliding_window": True, "sliding_window": 8}, "use_sliding_window"),
    ({"hidden_act": "gelu"}, "activation 'gelu'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}}, "rope scaling 'yarn'"),
])
def test_unsupported_configs_are_refused(change, message, hf_models, tmp_path):
    folder = hf_models["qwen3"][1]
    copy = tmp_path / "hf"
    copy.mkdir()
    for file in folder.iterdir():
        (copy / file.name).symlink_to(file)
    config = json.loads((folder / "config.json").read_text())
    (copy / "config.json").unlink()
    (copy / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ConversionError, match=message):
        convert(copy, ModelStore(tmp_path / "store"), "bad")
