"""HF transformers tensor names -> GGUF-style names (`{bid}` is the layer slot; None drops a tensor)."""

import re

from gdsllm_core.api import ConversionError

HF_TO_GGUF: dict[str, str | None] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{bid}.input_layernorm.weight": "blk.{bid}.attn_norm.weight",
    "model.layers.{bid}.self_attn.q_proj.weight": "blk.{bid}.attn_q.weight",
    "model.layers.{bid}.self_attn.k_proj.weight": "blk.{bid}.attn_k.weight",
    "model.layers.{bid}.self_attn.v_proj.weight": "blk.{bid}.attn_v.weight",
    "model.layers.{bid}.self_attn.o_proj.weight": "blk.{bid}.attn_output.weight",
    "model.layers.{bid}.post_attention_layernorm.weight": "blk.{bid}.ffn_norm.weight",
    "model.layers.{bid}.mlp.gate_proj.weight": "blk.{bid}.ffn_gate.weight",
    "model.layers.{bid}.mlp.up_proj.weight": "blk.{bid}.ffn_up.weight",
    "model.layers.{bid}.mlp.down_proj.weight": "blk.{bid}.ffn_down.weight",
    "model.layers.{bid}.self_attn.rotary_emb.inv_freq": None,  # recomputed from the config
}

_LAYER = re.compile(r"\.(\d+)\.")


def gguf_name(hf_name: str) -> str | None:
    """The GGUF-style name of an HF tensor, None for tensors the model does not need; unknown names are an error."""
    match = _LAYER.search(hf_name)
    bid = match.group(1) if match else None
    template = _LAYER.sub(".{bid}.", hf_name, count=1) if match else hf_name
    if template not in HF_TO_GGUF:
        raise ConversionError(f"unexpected tensor {hf_name!r} in a LLaMA checkpoint",
                              "is this really a LlamaForCausalLM checkpoint? check config.json's architectures")
    target = HF_TO_GGUF[template]
    return target.format(bid=bid) if target is not None else None
