"""Tensor names: HF transformers names -> GGUF-style names (`{bid}` is the layer slot), and the extents they form:
`token_embd`, one `blk.{i}` per layer, `output_norm`, `output` (only when the head is not tied)."""

import re

from gdsllm_core.api import ConversionError, ExtentRole

HF_TO_GGUF: dict[str, str | None] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{bid}.input_layernorm.weight": "blk.{bid}.attn_norm.weight",
    "model.layers.{bid}.self_attn.q_proj.weight": "blk.{bid}.attn_q.weight",
    "model.layers.{bid}.self_attn.k_proj.weight": "blk.{bid}.attn_k.weight",
    "model.layers.{bid}.self_attn.v_proj.weight": "blk.{bid}.attn_v.weight",
    "model.layers.{bid}.self_attn.o_proj.weight": "blk.{bid}.attn_output.weight",
    "model.layers.{bid}.self_attn.q_norm.weight": "blk.{bid}.attn_q_norm.weight",
    "model.layers.{bid}.self_attn.k_norm.weight": "blk.{bid}.attn_k_norm.weight",
    "model.layers.{bid}.post_attention_layernorm.weight": "blk.{bid}.post_attention_norm.weight",
    "model.layers.{bid}.pre_feedforward_layernorm.weight": "blk.{bid}.ffn_norm.weight",
    "model.layers.{bid}.post_feedforward_layernorm.weight": "blk.{bid}.post_ffw_norm.weight",
    "model.layers.{bid}.mlp.gate_proj.weight": "blk.{bid}.ffn_gate.weight",
    "model.layers.{bid}.mlp.up_proj.weight": "blk.{bid}.ffn_up.weight",
    "model.layers.{bid}.mlp.down_proj.weight": "blk.{bid}.ffn_down.weight",
}
LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_q_norm", "attn_k_norm", "attn_output",
                 "post_attention_norm", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down", "post_ffw_norm")

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def gguf_name(hf_name: str) -> str | None:
    """The GGUF-style name of an HF tensor; unknown names are an error."""
    layer = _LAYER.match(hf_name)
    template = _LAYER.sub("model.layers.{bid}.", hf_name, count=1)
    if template not in HF_TO_GGUF:
        raise ConversionError(f"unexpected tensor {hf_name!r} in a Gemma 3 checkpoint",
                              "is this really a Gemma3ForCausalLM checkpoint? check config.json's architectures")
    target = HF_TO_GGUF[template]
    return None if target is None else target.format(bid=layer.group(1) if layer else None)


def is_norm(name: str) -> bool:
    """Gemma's norms scale by (1 + w): HF stores w, llama.cpp's GGUF 1 + w (gdsllm too)."""
    return name.endswith("norm.weight")


def group(tensor_names, n_layers: int, tied: bool) -> dict[str, list[str]]:
    """extent name -> its tensor names in write order; every expected tensor must be there and no other."""
    expected = {"token_embd": ["token_embd.weight"]}
    for layer in range(n_layers):
        expected[f"blk.{layer}"] = [f"blk.{layer}.{part}.weight" for part in LAYER_TENSORS]
    expected["output_norm"] = ["output_norm.weight"]
    if not tied:
        expected["output"] = ["output.weight"]
    wanted = {name for names in expected.values() for name in names}
    present = set(tensor_names)
    unexpected = sorted(present - wanted)
    if unexpected:
        raise ConversionError(f"unexpected tensor(s) {', '.join(unexpected[:8])} for a Gemma 3 model of {n_layers} "
                              "layers", "the checkpoint does not match its config")
    missing = [name for names in expected.values() for name in names if name not in present]
    if missing:
        raise ConversionError(f"the checkpoint lacks {', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}",
                              "the checkpoint is incomplete: re-download it")
    return expected


def extent_role(extent_name: str) -> tuple[ExtentRole, int]:
    """(role, layer index) of an extent, as its name says."""
    parts = extent_name.split(".")
    if parts[0] == "blk":
        return (ExtentRole.EXPERT if len(parts) == 4 else ExtentRole.LAYER), int(parts[1])
    return (ExtentRole.EMBEDDINGS if extent_name == "token_embd" else ExtentRole.HEAD), -1
