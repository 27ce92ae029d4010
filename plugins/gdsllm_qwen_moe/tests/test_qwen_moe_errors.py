"""Bad checkpoints are refused with an error naming the tensor, and leave nothing in the store."""

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from gdsllm_core.convert import ConvertOptions, convert
from gdsllm_core.errors import ConversionError, GdsllmError, UnsupportedQuantError
from gdsllm_core.layout.store import ModelStore


def edited_copy(source: Path, target: Path, drop: str | None = None, replace: dict | None = None,
                quantization: dict | None = None) -> Path:
    """A copy of a checkpoint folder with one tensor dropped / replaced, or config.json's quantization patched."""
    shutil.copytree(source, target)
    for file in target.glob("*.safetensors"):
        tensors = load_file(file)
        if drop in tensors or any(k in tensors for k in replace or {}):
            tensors.pop(drop, None)
            tensors.update({k: v for k, v in (replace or {}).items() if k in tensors})
            save_file(tensors, file, metadata={"format": "pt"})
    index = target / "model.safetensors.index.json"
    if index.is_file() and drop:
        data = json.loads(index.read_text())
        data["weight_map"].pop(drop, None)
        index.write_text(json.dumps(data))
    if quantization:
        config = json.loads((target / "config.json").read_text())
        for key in ("quantization", "quantization_config"):
            config[key].update(quantization)
        (target / "config.json").write_text(json.dumps(config))
    return target


def assert_refused(source: Path, store_root: Path, error: type[GdsllmError], *names: str, **options) -> None:
    with pytest.raises(error) as caught:
        convert(source, ModelStore(store_root), name="bad", options=ConvertOptions(**options))
    for name in names:
        assert name in str(caught.value)
    assert ModelStore(store_root).list() == []
    assert not store_root.exists() or list(store_root.iterdir()) == []  # no partial folder either


def test_missing_expert_tensor(hf_checkpoints, tmp_path, registered_plugin):
    key = "model.layers.1.mlp.experts.3.up_proj.weight"
    source = edited_copy(hf_checkpoints["per_expert"], tmp_path / "ckpt", drop=key)
    assert_refused(source, tmp_path / "store", ConversionError, key, "missing")


def test_wrong_shape(hf_checkpoints, tmp_path, registered_plugin):
    import torch

    key = "model.layers.2.linear_attn.in_proj_z.weight"
    source = edited_copy(hf_checkpoints["per_expert"], tmp_path / "ckpt", replace={key: torch.zeros(60, 64)})
    assert_refused(source, tmp_path / "store", ConversionError, key, "[60, 64]", "[64, 64]")


def test_wrong_fused_expert_shape(hf_checkpoints, tmp_path, registered_plugin):
    import torch

    key = "model.layers.0.mlp.experts.down_proj"
    source = edited_copy(hf_checkpoints["fused"], tmp_path / "ckpt", replace={key: torch.zeros(8, 64, 30)})
    assert_refused(source, tmp_path / "store", ConversionError, key, "[64, 30]")


@pytest.mark.reference
def test_mlx_unsupported_bit_width(mlx_quantized, tmp_path, registered_plugin):
    path = "language_model.model.layers.2.linear_attn.in_proj_z"
    source = edited_copy(mlx_quantized[0], tmp_path / "ckpt", quantization={path: {"group_size": 64, "bits": 7}})
    assert_refused(source, tmp_path / "store", UnsupportedQuantError, path, "7-bit")


@pytest.mark.reference
def test_mlx_unsupported_mode(mlx_quantized, tmp_path, registered_plugin):
    path = "language_model.model.layers.3.self_attn.k_proj"
    source = edited_copy(mlx_quantized[0], tmp_path / "ckpt",
                         quantization={path: {"group_size": 32, "bits": 4, "mode": "mxfp4"}})
    assert_refused(source, tmp_path / "store", UnsupportedQuantError, path, "mxfp4")


@pytest.mark.reference
def test_mlx_override_that_does_not_match_the_packed_shape(mlx_quantized, tmp_path, registered_plugin):
    path = "language_model.model.layers.1.mlp.switch_mlp.gate_proj"
    source = edited_copy(mlx_quantized[0], tmp_path / "ckpt", quantization={path: {"group_size": 64, "bits": 8}})
    assert_refused(source, tmp_path / "store", ConversionError, path, "8-bit packed")


def test_unknown_quant_option(hf_checkpoints, tmp_path, registered_plugin):
    assert_refused(hf_checkpoints["per_expert"], tmp_path / "store", UnsupportedQuantError, "q4_k", quant="q4_k")


def test_group_size_that_does_not_divide_a_row(hf_checkpoints, tmp_path, registered_plugin):
    # shared_expert_intermediate_size 48 is not a multiple of 32: name the tensor, suggest another group size
    assert_refused(hf_checkpoints["per_expert"], tmp_path / "store", ConversionError,
                   "model.layers.0.mlp.shared_expert.down_proj.weight", "group size 32", quant="affine4", group_size=32)


def test_unreadable_side_file(hf_checkpoints, tmp_path, registered_plugin):
    source = edited_copy(hf_checkpoints["per_expert"], tmp_path / "ckpt")
    (source / "generation_config.json").write_text('{"eos_token_id": ')  # cut short, as an interrupted download
    assert_refused(source, tmp_path / "store", ConversionError, "generation_config.json", "re-download")
