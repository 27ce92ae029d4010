"""A synthetic Qwen3.5-MoE with real layer shapes and random affine weights, written straight into the store (for
benchmarks: the 397B's layers without its 200 GB download). Expert payloads cycle through a few random ones: the
bytes differ per extent only in position, which is all a storage benchmark needs."""

import torch

from gdsllm_core.api import ModelEntry, ModelStore, ModelWriter, TokenizerInfo
from gdsllm_qwen_moe import affine
from gdsllm_qwen_moe.config import FULL_ATTENTION, LINEAR_ATTENTION, QwenMoeConfig
from gdsllm_qwen_moe.convert import ARCHITECTURE, affine_entries, extent_layout, stored_name
from gdsllm_qwen_moe.names import TensorSpec

PAYLOAD_VARIANTS = 4


def qwen35_397b_shapes(n_layers: int = 8) -> QwenMoeConfig:
    """Qwen3.5-397B-A17B's hyper-parameters (../shared/notes/packages.md §2) with only `n_layers` layers."""
    return QwenMoeConfig(
        vocab_size=248320, hidden_size=4096, num_hidden_layers=n_layers, num_attention_heads=32,
        num_key_value_heads=2, head_dim=256, linear_conv_kernel_dim=4, linear_key_head_dim=128,
        linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=64, moe_intermediate_size=1024,
        shared_expert_intermediate_size=1024, num_experts=512, num_experts_per_tok=10,
        layer_types=[FULL_ATTENTION if (i + 1) % 4 == 0 else LINEAR_ATTENTION for i in range(n_layers)],
        rms_norm_eps=1e-6, rope_theta=10_000_000.0, partial_rotary_factor=0.25, max_position_embeddings=262144)


def _random_affine(spec: TensorSpec, bits: int, group_size: int, generator: torch.Generator) -> list[tuple]:
    rows, cols = spec.shape
    words = torch.randint(-(1 << 31), 1 << 31, (rows, affine.packed_cols(cols, bits)), dtype=torch.int64,
                          generator=generator).to(torch.int32)
    scale = 0.02 / ((1 << bits) - 1) / cols ** 0.5 * 8
    scales = torch.full((rows, cols // group_size), scale, dtype=torch.bfloat16)
    biases = torch.full((rows, cols // group_size), -scale * ((1 << bits) - 1) / 2, dtype=torch.bfloat16)
    return affine_entries(stored_name(spec), words, scales, biases, bits, group_size, cols)


def _float_entry(spec: TensorSpec, generator: torch.Generator) -> tuple:
    if spec.kind in ("norm", "gated_norm"):
        data = torch.ones(spec.shape)
    elif spec.name.endswith("ssm_a_log"):
        data = torch.zeros(spec.shape)
    else:
        data = torch.randn(spec.shape, generator=generator) * 0.1
    return (stored_name(spec), "F32", list(spec.shape), data)


def write_synthetic(root, name: str, config: QwenMoeConfig, bits: int = 4, group_size: int = 128,
                    seed: int = 0, overwrite: bool = False) -> ModelEntry:
    """Write the model (matrices affine `bits`/`group_size`, routers at 8 bits) and return its store entry."""
    generator = torch.Generator().manual_seed(seed)
    payloads: dict[int, list[tuple]] = {}
    with ModelWriter(root, name, overwrite=overwrite) as writer:
        for extent_name, role, index, specs in extent_layout(config):
            if ".expert." in extent_name:
                variant = int(extent_name.rsplit(".", 1)[1]) % PAYLOAD_VARIANTS
                if variant not in payloads:  # kept with names relative to the extent: "ffn_gate.weight", ...
                    payloads[variant] = [(t[0].removeprefix(extent_name + "."), *t[1:]) for spec in specs
                                         for t in _random_affine(spec, bits, group_size, generator)]
                tensors = [(f"{extent_name}.{t[0]}", *t[1:]) for t in payloads[variant]]
            else:
                tensors = []
                for spec in specs:
                    if spec.kind in ("linear", "router", "embedding"):
                        tensors += _random_affine(spec, 8 if spec.kind == "router" else bits, group_size, generator)
                    else:
                        tensors.append(_float_entry(spec, generator))
            writer.add_extent(extent_name, tensors, role, index)
        writer.finish(architecture=ARCHITECTURE, config=config.to_dict(), tokenizer=TokenizerInfo(kind="none", file=""),
                      quant=f"affine{bits}-g{group_size}", source={"synthetic": True, "seed": seed})
    return ModelStore(root).get(name)
