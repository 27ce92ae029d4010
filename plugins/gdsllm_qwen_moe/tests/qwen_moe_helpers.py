"""Helpers shared by this plugin's tests: tiny random Qwen3.5-MoE models and direct conversion."""

from pathlib import Path

import torch

from gdsllm_core.convert import ConvertOptions
from gdsllm_core.layout.store import ModelEntry, ModelStore
from gdsllm_core.layout.writer import ModelWriter
from gdsllm_qwen_moe.convert import QwenMoeConverter

# ../shared/notes/packages.md §2: 3 linear-attention layers + 1 full-attention layer, 8 experts, top-2
TINY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
            linear_num_key_heads=2, linear_num_value_heads=4, moe_intermediate_size=32,
            shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
            layer_types=["linear_attention"] * 3 + ["full_attention"])


def make_hf_model(seed: int = 0, **overrides):
    """A random fp32 Qwen3_5MoeForCausalLM; norms randomised so that zero-centring (x * (1 + w)) matters."""
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    torch.manual_seed(seed)
    model = Qwen3_5MoeForCausalLM(Qwen3_5MoeTextConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.2)
    return model


def convert_into(root: Path, source: Path, name: str = "tiny", **options) -> ModelEntry:
    """Convert with the plugin's converter directly (no plugin discovery)."""
    with ModelWriter(root, name) as writer:
        QwenMoeConverter().convert(source, writer, ConvertOptions(**options))
    return ModelStore(root).get(name)
