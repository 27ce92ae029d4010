"""Fixtures: tiny random Qwen3.5-MoE checkpoints from transformers, and conversion into a throw-away store."""

import json
from pathlib import Path

import pytest
from qwen_moe_helpers import convert_into, make_hf_model

from gdsllm_core import plugins
from gdsllm_core.layout.store import ModelEntry
from gdsllm_qwen_moe import plugin as qwen_plugin


@pytest.fixture(scope="session")
def hf_model():
    return make_hf_model()


@pytest.fixture(scope="session")
def hf_checkpoints(hf_model, tmp_path_factory) -> dict[str, Path]:
    """The same model saved per expert (default save_pretrained) and with fused 3-D expert tensors."""
    root = tmp_path_factory.mktemp("qwen_hf")
    hf_model.save_pretrained(root / "per_expert")
    hf_model.save_pretrained(root / "fused", save_original_format=False)
    return {"per_expert": root / "per_expert", "fused": root / "fused"}


@pytest.fixture(scope="session")
def converted(hf_checkpoints, tmp_path_factory) -> dict[str, ModelEntry]:
    root = tmp_path_factory.mktemp("qwen_store")
    return {layout: convert_into(root, path, name=layout) for layout, path in hf_checkpoints.items()}


@pytest.fixture
def registered_plugin():
    """Make sure this plugin is registered with the plugin manager (entry points may be off in tests)."""
    added = plugins.ensure_registered(qwen_plugin, "qwen_moe")
    try:
        yield
    finally:
        if added:
            plugins.pm.unregister(qwen_plugin)


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


# An mlx_lm Qwen3.5-MoE (head_dim 32, intermediate sizes 64) quantized by mlx_lm itself: 4-bit g64 by default, with
# per-path overrides covering every other width MLX writes and all three group sizes.
MLX_TEXT = dict(model_type="qwen3_5_moe_text", vocab_size=512, hidden_size=64, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, linear_conv_kernel_dim=4,
                linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                moe_intermediate_size=64, shared_expert_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
                full_attention_interval=4, rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})
MLX_OVERRIDES = {
    "layers.0.linear_attn.in_proj_qkv": {"group_size": 32, "bits": 3},
    "o_proj": {"group_size": 128, "bits": 6},
    "layers.1.mlp.switch_mlp.down_proj": {"group_size": 64, "bits": 2},
    "layers.2.mlp.shared_expert.up_proj": {"group_size": 32, "bits": 1},
    "lm_head": {"group_size": 32, "bits": 8},
    "embed_tokens": {"group_size": 64, "bits": 5},
}


def _mlx_predicate(path, module):
    if path.endswith("mlp.gate") or path.endswith("shared_expert_gate"):
        return {"group_size": 64, "bits": 8}  # mlx_lm's own rule for this model
    for suffix, params in MLX_OVERRIDES.items():
        if path.endswith(suffix):
            return dict(params)
    return True


@pytest.fixture(scope="session")
def mlx_quantized(tmp_path_factory):
    """(folder written by mlx_lm's save_model/save_config, the quantized mlx_lm model)."""
    mx = pytest.importorskip("mlx.core")
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.models import qwen3_5_moe
    from mlx_lm.utils import quantize_model, save_config, save_model

    mx.random.seed(0)
    config = {"model_type": "qwen3_5_moe", "text_config": dict(MLX_TEXT), "tie_word_embeddings": False}
    model = qwen3_5_moe.Model(qwen3_5_moe.ModelArgs.from_dict(config))
    norms = {k: 1.0 + 0.2 * mx.random.normal(v.shape) for k, v in tree_flatten(model.parameters())
             if k.endswith("norm.weight")}
    model.update(tree_unflatten(list(norms.items())))
    model, quantized_config = quantize_model(model, config, 64, 4, quant_predicate=_mlx_predicate)
    mx.eval(model.parameters())
    folder = tmp_path_factory.mktemp("qwen_mlx") / "tiny-mlx-q4"
    save_model(folder, model)
    save_config(quantized_config, folder / "config.json")
    return folder, model
