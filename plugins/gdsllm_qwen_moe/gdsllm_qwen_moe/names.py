"""Tensor names: HF / MLX checkpoint names -> gdsllm's GGUF-style names, and the tensors each extent must hold.

Accepted sources: `model.*` (HF `Qwen3_5MoeForCausalLM`), `model.language_model.*` (HF multimodal checkpoints),
`language_model.model.*` (mlx_lm). Experts come per expert (`mlp.experts.{e}.gate_proj.weight`), fused 3-D (HF
`mlp.experts.gate_up_proj` [E, 2I, H] gate rows first, `mlp.experts.down_proj` [E, H, I]) or as mlx_lm's
`mlp.switch_mlp.{gate,up,down}_proj.*` [E, rows, ...]. Vision tensors and the multi-token-prediction head (`mtp.*`)
are not part of the text model and are skipped (counted in the manifest's `source.skipped`)."""

import re
from dataclasses import dataclass

from gdsllm_qwen_moe.config import QwenMoeConfig

SKIPPED_PREFIXES = {"mtp": ("mtp.", "model.mtp."), "vision": ("model.visual.", "visual.", "vision_tower.")}
SUFFIXES = ("weight", "scales", "biases")

LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "post_attention_norm",
    "linear_attn.in_proj_qkv": "attn_qkv",
    "linear_attn.in_proj_z": "attn_gate",
    "linear_attn.in_proj_a": "ssm_alpha",
    "linear_attn.in_proj_b": "ssm_beta",
    "linear_attn.A_log": "ssm_a_log",
    "linear_attn.dt_bias": "ssm_dt_bias",
    "linear_attn.conv1d": "ssm_conv1d",
    "linear_attn.norm": "ssm_norm",
    "linear_attn.out_proj": "ssm_out",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate": "ffn_gate_inp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.switch_mlp.gate_proj": "ffn_gate_exps",
    "mlp.switch_mlp.up_proj": "ffn_up_exps",
    "mlp.switch_mlp.down_proj": "ffn_down_exps",
    "mlp.experts.gate_up_proj": "ffn_gate_up_exps",
    "mlp.experts.down_proj": "ffn_down_exps",
}
GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
EXPERT_PROJ = {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)$")


def strip_prefix(key: str) -> str:
    """The text model's own name: `model.language_model.x` / `language_model.model.x` -> `model.x`."""
    for prefix, replacement in (("model.language_model.", "model."), ("language_model.model.", "model."),
                                ("language_model.", "")):
        if key.startswith(prefix):
            return replacement + key[len(prefix):]
    return key


def skipped_kind(key: str) -> str | None:
    """"mtp" or "vision" for tensors that are not part of the text model, else None."""
    key = strip_prefix(key)
    for kind, prefixes in SKIPPED_PREFIXES.items():
        if key.startswith(prefixes):
            return kind
    return None


def to_internal(key: str) -> tuple[str, str] | None:
    """(internal base name, suffix) for a checkpoint key, suffix in {weight, scales, biases, ""}; None if unknown.
    Fused / switch expert tensors map to `blk.{i}.ffn_*_exps`; per-expert ones to `blk.{i}.expert.{e}.ffn_*`."""
    module, suffix = strip_prefix(key), ""
    head, _, last = module.rpartition(".")
    if last in SUFFIXES:
        module, suffix = head, last
    if module in GLOBAL_NAMES:
        return GLOBAL_NAMES[module], suffix
    match = _LAYER.match(module)
    if not match:
        return None
    layer, rest = match.groups()
    expert = _EXPERT.match(rest)
    if expert:
        return f"blk.{layer}.expert.{expert.group(1)}.{EXPERT_PROJ[expert.group(2)]}", suffix
    if rest in LAYER_NAMES:
        return f"blk.{layer}.{LAYER_NAMES[rest]}", suffix
    return None


@dataclass(frozen=True)
class TensorSpec:
    """One logical tensor the model needs: `kind` is linear (a quantizable matrix), embedding, norm (zero-centred in
    HF), gated_norm (plain weight), vector (kept F32) or conv ([channels, kernel])."""

    name: str
    shape: tuple[int, ...]
    kind: str


def dense_specs(config: QwenMoeConfig, layer: int) -> list[TensorSpec]:
    """The tensors of extent `blk.{layer}`: attention (linear or full), router, shared expert, norms."""
    h, p = config.hidden_size, f"blk.{layer}."
    specs = [TensorSpec(p + "attn_norm", (h,), "norm"), TensorSpec(p + "post_attention_norm", (h,), "norm")]
    if config.is_linear(layer):
        hv = config.linear_num_value_heads
        specs += [
            TensorSpec(p + "attn_qkv", (config.conv_dim, h), "linear"),
            TensorSpec(p + "attn_gate", (config.value_dim, h), "linear"),
            TensorSpec(p + "ssm_beta", (hv, h), "linear"),
            TensorSpec(p + "ssm_alpha", (hv, h), "linear"),
            TensorSpec(p + "ssm_a_log", (hv,), "vector"),
            TensorSpec(p + "ssm_dt_bias", (hv,), "vector"),
            TensorSpec(p + "ssm_conv1d", (config.conv_dim, config.linear_conv_kernel_dim), "conv"),
            TensorSpec(p + "ssm_norm", (config.linear_value_head_dim,), "gated_norm"),
            TensorSpec(p + "ssm_out", (h, config.value_dim), "linear"),
        ]
    else:
        d, n_q, n_kv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
        specs += [
            TensorSpec(p + "attn_q", (2 * n_q * d, h), "linear"),
            TensorSpec(p + "attn_k", (n_kv * d, h), "linear"),
            TensorSpec(p + "attn_v", (n_kv * d, h), "linear"),
            TensorSpec(p + "attn_output", (h, n_q * d), "linear"),
            TensorSpec(p + "attn_q_norm", (d,), "norm"),
            TensorSpec(p + "attn_k_norm", (d,), "norm"),
        ]
    s = config.shared_expert_intermediate_size
    specs += [
        TensorSpec(p + "ffn_gate_inp", (config.num_experts, h), "router"),
        TensorSpec(p + "ffn_gate_inp_shexp", (1, h), "router"),
        TensorSpec(p + "ffn_gate_shexp", (s, h), "linear"),
        TensorSpec(p + "ffn_up_shexp", (s, h), "linear"),
        TensorSpec(p + "ffn_down_shexp", (h, s), "linear"),
    ]
    return specs


def expert_specs(config: QwenMoeConfig, layer: int, expert: int) -> list[TensorSpec]:
    """The tensors of extent `blk.{layer}.expert.{expert}`: gate, up, down (one read)."""
    h, i, p = config.hidden_size, config.moe_intermediate_size, f"blk.{layer}.expert.{expert}."
    return [TensorSpec(p + "ffn_gate", (i, h), "linear"), TensorSpec(p + "ffn_up", (i, h), "linear"),
            TensorSpec(p + "ffn_down", (h, i), "linear")]


def global_specs(config: QwenMoeConfig) -> dict[str, list[TensorSpec]]:
    """Extents outside the layers: embeddings, final norm, output head (absent when tied)."""
    v, h = config.vocab_size, config.hidden_size
    extents = {"token_embd": [TensorSpec("token_embd", (v, h), "embedding")],
               "output_norm": [TensorSpec("output_norm", (h,), "norm")]}
    if not config.tie_word_embeddings:
        extents["output"] = [TensorSpec("output", (v, h), "linear")]
    return extents
