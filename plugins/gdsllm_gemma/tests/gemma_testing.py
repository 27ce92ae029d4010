"""Helpers of the gdsllm_gemma tests: tiny seeded transformers models (a module of its own: every plugin's tests run in one session, where `conftest` names several modules)."""


import torch

from gdsllm_core import testing

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
