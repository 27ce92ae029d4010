"""Fixtures: tiny random Gemma 3 text models from transformers (with a SentencePiece tokenizer, as Gemma ships), saved
once per session, and their GGUFs made by llama.cpp's converter."""

from pathlib import Path

import pytest
import torch
from gdsllm_gemma import plugin as gemma_plugin

from gdsllm_core import plugins, testing

HEAD_DIM = 16
# llama.cpp reads no layer pattern from a gemma3 GGUF but uses every 6th layer global, and scales queries by
# head_dim^-0.5 (all but the 27B): the "gguf" model follows both, the "hf" one has its own pattern and scalar.
VARIANTS = {
    "gguf": dict(num_hidden_layers=6, query_pre_attn_scalar=HEAD_DIM),
    "hf": dict(num_hidden_layers=3, query_pre_attn_scalar=24, sliding_window=3,
               layer_types=["sliding_attention", "full_attention", "sliding_attention"],
               final_logit_softcapping=20.0),
}


def make_model(variant: str, seed: int = 0, **overrides):
    """A seeded random fp32 Gemma3ForCausalLM: d=64, 4 heads / 2 KV heads of HEAD_DIM, sliding window 4 for the
    local layers (rope base 10000), global layers at base 1e6 with linear rope scaling 2."""
    import transformers

    settings = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=HEAD_DIM, vocab_size=testing.SENTENCEPIECE_VOCAB, max_position_embeddings=256,
                    rms_norm_eps=1e-6, sliding_window=4,
                    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    settings.update(VARIANTS[variant])
    settings.update(overrides)
    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**settings)).float().eval()
    with torch.no_grad():  # larger than the default init, so the logits depend visibly on every weight
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.08)
            else:
                param.uniform_(-0.5, 0.5)  # norms hold w of 1 + w
    return model


@pytest.fixture(autouse=True, scope="session")
def _gemma_plugin_registered():
    """Make sure the plugin is registered even when entry points are off in tests."""
    plugins.ensure_registered(gemma_plugin, "gemma")
    yield


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory) -> dict[str, tuple[object, Path]]:
    """variant -> (transformers model, its saved folder with a tokenizer.model)."""
    root = tmp_path_factory.mktemp("gemma_hf")
    made = {}
    for variant in VARIANTS:
        model = make_model(variant)
        model.save_pretrained(root / variant)
        testing.add_sentencepiece_tokenizer(root / variant)
        made[variant] = (model, root / variant)
    return made


@pytest.fixture(scope="session")
def ggufs(hf_models, tmp_path_factory) -> dict[str, Path]:
    """outtype -> the GGUF llama.cpp's convert_hf_to_gguf.py writes of the "gguf" variant (f16, q8_0)."""
    root = tmp_path_factory.mktemp("gemma_gguf")
    folder = hf_models["gguf"][1]
    return {outtype: testing.convert_hf_to_gguf(folder, root / f"gemma3-{outtype}.gguf", outtype)
            for outtype in ("f16", "q8_0")}
