"""The GGUF tests' references: llama.cpp's own convert_hf_to_gguf.py (found or fetched by `gdsllm_core.testing`)
run on a tiny model without tokenizer files, and the transformers model holding a GGUF's values as gguf-py reads
them."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

from gdsllm_core.testing import llamacpp_source

CONVERT_SCRIPT = Path(__file__).with_name("llamacpp_convert.py")


def convert_with_llamacpp(folder: Path, out: Path, outtype: str, *flags: str) -> Path:
    """llama.cpp's convert_hf_to_gguf.py on an HF folder (see llamacpp_convert.py for the vocabulary)."""
    subprocess.run([sys.executable, str(CONVERT_SCRIPT), str(llamacpp_source()), str(folder), str(out), outtype,
                    *flags], check=True, capture_output=True)
    return out


def gguf_values(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF as float32 in torch order, dequantized by gguf-py."""
    reader = GGUFReader(path)
    values = {}
    for tensor in reader.tensors:
        data = dequantize(np.asarray(tensor.data), tensor.tensor_type)
        values[tensor.name] = torch.from_numpy(np.array(data, dtype=np.float32)).reshape(
            [int(d) for d in reversed(tensor.shape.tolist())])
    return values


def grouped_heads(tensor: torch.Tensor, dim: int, key_heads: int, value_heads: int, head_dim: int) -> torch.Tensor:
    """llama.cpp's value-head order (tiled: [K0, K1, K0, K1, ...]) back to HF's (grouped: [K0, K0, K1, K1]) along
    `dim`, each head `head_dim` wide."""
    shape = list(tensor.shape)
    tiled = tensor.reshape(*shape[:dim], value_heads // key_heads, key_heads, head_dim, *shape[dim + 1:])
    return tiled.transpose(dim, dim + 1).reshape(shape)


def hf_state_from_gguf(values: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A Qwen3_5MoeForCausalLM state dict holding the GGUF's values, each llama.cpp change undone (written from
    llama.cpp's conversion/qwen.py, independently of gdsllm's converter)."""
    n_k, n_v = config.linear_num_key_heads, config.linear_num_value_heads
    d_k, d_v = config.linear_key_head_dim, config.linear_value_head_dim

    def grouped(tensor, dim, head_dim):
        return grouped_heads(tensor, dim, n_k, n_v, head_dim) if n_k != n_v else tensor

    state = {"model.embed_tokens.weight": values["token_embd.weight"], "model.norm.weight": values["output_norm.weight"] - 1}
    if "output.weight" in values:
        state["lm_head.weight"] = values["output.weight"]
    for layer in range(config.num_hidden_layers):
        g, p = f"blk.{layer}.", f"model.layers.{layer}."
        state[p + "input_layernorm.weight"] = values[g + "attn_norm.weight"] - 1
        state[p + "post_attention_layernorm.weight"] = values[g + "post_attention_norm.weight"] - 1
        if g + "ssm_a" in values:
            qkv = values[g + "attn_qkv.weight"]
            state[p + "linear_attn.in_proj_qkv.weight"] = torch.cat([qkv[:2 * n_k * d_k],
                                                                     grouped(qkv[2 * n_k * d_k:], 0, d_v)])
            state[p + "linear_attn.in_proj_z.weight"] = grouped(values[g + "attn_gate.weight"], 0, d_v)
            state[p + "linear_attn.in_proj_a.weight"] = grouped(values[g + "ssm_alpha.weight"], 0, 1)
            state[p + "linear_attn.in_proj_b.weight"] = grouped(values[g + "ssm_beta.weight"], 0, 1)
            state[p + "linear_attn.A_log"] = torch.log(-grouped(values[g + "ssm_a"], 0, 1))
            state[p + "linear_attn.dt_bias"] = grouped(values[g + "ssm_dt.bias"], 0, 1)
            conv = values[g + "ssm_conv1d.weight"]
            state[p + "linear_attn.conv1d.weight"] = torch.cat([conv[:2 * n_k * d_k],
                                                                grouped(conv[2 * n_k * d_k:], 0, d_v)])[:, None, :]
            state[p + "linear_attn.norm.weight"] = values[g + "ssm_norm.weight"]
            state[p + "linear_attn.out_proj.weight"] = grouped(values[g + "ssm_out.weight"], 1, d_v)
        else:
            for ours, theirs in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj"),
                                 ("attn_output", "o_proj")):
                state[p + f"self_attn.{theirs}.weight"] = values[g + ours + ".weight"]
            state[p + "self_attn.q_norm.weight"] = values[g + "attn_q_norm.weight"] - 1
            state[p + "self_attn.k_norm.weight"] = values[g + "attn_k_norm.weight"] - 1
        state[p + "mlp.gate.weight"] = values[g + "ffn_gate_inp.weight"]
        state[p + "mlp.shared_expert_gate.weight"] = values[g + "ffn_gate_inp_shexp.weight"].reshape(1, -1)
        for proj in ("gate", "up", "down"):
            state[p + f"mlp.shared_expert.{proj}_proj.weight"] = values[g + f"ffn_{proj}_shexp.weight"]
        gate_up = values.get(g + "ffn_gate_up_exps.weight")
        if gate_up is None:
            gate_up = torch.cat([values[g + "ffn_gate_exps.weight"], values[g + "ffn_up_exps.weight"]], dim=1)
        state[p + "mlp.experts.gate_up_proj"] = gate_up
        state[p + "mlp.experts.down_proj"] = values[g + "ffn_down_exps.weight"]
    return state
