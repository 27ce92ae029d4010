"""The HF -> GGUF name map and the grouping of tensors into extents."""

import pytest

from gdsllm_core.errors import ConversionError
from gdsllm_llama.layout import LAYER_TENSORS, LlamaLayout
from gdsllm_llama.names import gguf_name


def test_hf_names_map_to_gguf_names():
    assert gguf_name("model.layers.12.self_attn.k_proj.weight") == "blk.12.attn_k.weight"
    assert gguf_name("model.layers.0.post_attention_layernorm.weight") == "blk.0.ffn_norm.weight"
    assert gguf_name("model.embed_tokens.weight") == "token_embd.weight"
    assert gguf_name("lm_head.weight") == "output.weight"
    assert gguf_name("model.layers.3.self_attn.rotary_emb.inv_freq") is None
    with pytest.raises(ConversionError, match="model.layers.0.mlp.experts.0.w1.weight"):
        gguf_name("model.layers.0.mlp.experts.0.w1.weight")


def _names(n_layers: int, tied: bool) -> list[str]:
    names = ["token_embd.weight", "output_norm.weight"] + ([] if tied else ["output.weight"])
    return names + [f"blk.{i}.{part}.weight" for i in range(n_layers) for part in reversed(LAYER_TENSORS)]


@pytest.mark.parametrize("tied", [False, True])
def test_layers_become_extents_in_reading_order(tied):
    groups = LlamaLayout.group(_names(3, tied), 3, tied)
    assert list(groups) == ["token_embd", "blk.0", "blk.1", "blk.2", "output_norm"] + ([] if tied else ["output"])
    assert groups["blk.1"] == [f"blk.1.{part}.weight" for part in LAYER_TENSORS]


def test_incomplete_checkpoints_are_refused():
    names = [n for n in _names(2, False) if n != "blk.1.ffn_up.weight"]
    with pytest.raises(ConversionError, match=r"blk\.1\.ffn_up\.weight"):
        LlamaLayout.group(names, 2, False)
    with pytest.raises(ConversionError, match="outside"):
        LlamaLayout.group(_names(3, False), 2, False)
