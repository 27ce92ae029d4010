"""Tensor names: HF transformers names -> GGUF-style names (`{bid}` is the layer slot, `{xid}` the expert), and the
extents they form.

Extents: `token_embd`, one `blk.{i}` per layer (attention, norms, and the dense FFN or the router), one
`blk.{i}.expert.{e}` per expert (its gate, up and down matrices: one expert = one read), `output_norm`, `output`
(absent when the embeddings are tied)."""

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
    "model.layers.{bid}.self_attn.q_proj.bias": "blk.{bid}.attn_q.bias",
    "model.layers.{bid}.self_attn.k_proj.bias": "blk.{bid}.attn_k.bias",
    "model.layers.{bid}.self_attn.v_proj.bias": "blk.{bid}.attn_v.bias",
    "model.layers.{bid}.self_attn.o_proj.weight": "blk.{bid}.attn_output.weight",
    "model.layers.{bid}.self_attn.q_norm.weight": "blk.{bid}.attn_q_norm.weight",
    "model.layers.{bid}.self_attn.k_norm.weight": "blk.{bid}.attn_k_norm.weight",
    "model.layers.{bid}.post_attention_layernorm.weight": "blk.{bid}.ffn_norm.weight",
    "model.layers.{bid}.mlp.gate_proj.weight": "blk.{bid}.ffn_gate.weight",
    "model.layers.{bid}.mlp.up_proj.weight": "blk.{bid}.ffn_up.weight",
    "model.layers.{bid}.mlp.down_proj.weight": "blk.{bid}.ffn_down.weight",
    "model.layers.{bid}.mlp.gate.weight": "blk.{bid}.ffn_gate_inp.weight",
    "model.layers.{bid}.mlp.experts.{xid}.gate_proj.weight": "blk.{bid}.expert.{xid}.ffn_gate.weight",
    "model.layers.{bid}.mlp.experts.{xid}.up_proj.weight": "blk.{bid}.expert.{xid}.ffn_up.weight",
    "model.layers.{bid}.mlp.experts.{xid}.down_proj.weight": "blk.{bid}.expert.{xid}.ffn_down.weight",
    # transformers 5 keeps a layer's experts fused: gate_up_proj [E, 2F, D], down_proj [E, D, F] (split on convert)
    "model.layers.{bid}.mlp.experts.gate_up_proj": "blk.{bid}.ffn_gate_up_exps.weight",
    "model.layers.{bid}.mlp.experts.down_proj": "blk.{bid}.ffn_down_exps.weight",
    "model.layers.{bid}.self_attn.rotary_emb.inv_freq": None,  # recomputed from the config
}
# GGUF's fused expert tensors [E, rows, cols] -> the per-expert tensor each slice becomes
FUSED_EXPERTS = {"ffn_gate_exps": "ffn_gate", "ffn_up_exps": "ffn_up", "ffn_down_exps": "ffn_down"}
EXPERT_TENSORS = ("ffn_gate", "ffn_up", "ffn_down")
ATTENTION_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output")
DENSE_FFN = ("ffn_norm", "ffn_gate", "ffn_up", "ffn_down")

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def gguf_name(hf_name: str) -> str | None:
    """The GGUF-style name of an HF tensor, None for tensors the model does not need; unknown names are an error."""
    layer = _LAYER.match(hf_name)
    expert = _EXPERT.search(hf_name)
    template = _LAYER.sub("model.layers.{bid}.", hf_name, count=1)
    template = _EXPERT.sub(".experts.{xid}.", template, count=1)
    if template not in HF_TO_GGUF:
        raise ConversionError(f"unexpected tensor {hf_name!r} in a Qwen checkpoint",
                              "is this really a Qwen2/Qwen3/Qwen3-MoE checkpoint? check config.json's architectures")
    target = HF_TO_GGUF[template]
    if target is None:
        return None
    return target.format(bid=layer.group(1) if layer else None, xid=expert.group(1) if expert else None)


def expert_extent(layer: int, expert: int) -> str:
    return f"blk.{layer}.expert.{expert}"


def extent_of(tensor_name: str) -> str:
    """`blk.3.attn_q.weight` -> `blk.3`; `blk.3.expert.7.ffn_up.weight` -> `blk.3.expert.7`; `output.weight` ->
    `output`."""
    parts = tensor_name.split(".")
    if parts[0] == "blk" and len(parts) > 2:
        return ".".join(parts[:4]) if parts[2] == "expert" else f"blk.{parts[1]}"
    if parts[0] in ("token_embd", "output_norm", "output"):
        return parts[0]
    raise ConversionError(f"tensor {tensor_name!r} does not belong to any Qwen extent")


def layer_tensors(config, layer: int) -> list[str]:
    """The tensor names layer `layer`'s dense extent must hold, in write order."""
    names = [f"blk.{layer}.{part}.weight" for part in ATTENTION_TENSORS]
    if config.qkv_bias:
        names += [f"blk.{layer}.attn_{part}.bias" for part in "qkv"]
    if config.qk_norm:
        names += [f"blk.{layer}.attn_q_norm.weight", f"blk.{layer}.attn_k_norm.weight"]
    if config.is_sparse(layer):
        names += [f"blk.{layer}.ffn_norm.weight", f"blk.{layer}.ffn_gate_inp.weight"]
    else:
        names += [f"blk.{layer}.{part}.weight" for part in DENSE_FFN]
    return names


def group(tensor_names, config) -> dict[str, list[str]]:
    """extent name -> its tensor names, both in the order the forward pass reads them; every expected tensor must be
    there and no other."""
    expected: dict[str, list[str]] = {"token_embd": ["token_embd.weight"]}
    for layer in range(config.n_layers):
        expected[f"blk.{layer}"] = layer_tensors(config, layer)
        if config.is_sparse(layer):
            for expert in range(config.n_experts):
                extent = expert_extent(layer, expert)
                expected[extent] = [f"{extent}.{part}.weight" for part in EXPERT_TENSORS]
    expected["output_norm"] = ["output_norm.weight"]
    if not config.tied_embeddings:
        expected["output"] = ["output.weight"]
    wanted = {name for names in expected.values() for name in names}
    present = set(tensor_names)
    unexpected = sorted(present - wanted)
    if unexpected:
        raise ConversionError(f"unexpected tensor(s) {', '.join(unexpected[:8])} for a {config.architecture} model "
                              f"of {config.n_layers} layers", "the checkpoint does not match its config")
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
