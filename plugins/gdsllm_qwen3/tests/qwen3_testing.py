"""Helpers of the gdsllm_qwen3 tests: tiny seeded transformers models (a module of its own: every plugin's tests run in one session, where `conftest` names several modules)."""

from pathlib import Path

import torch

from gdsllm_core import testing

ARCHS = ("qwen2", "qwen3", "qwen3moe")
_SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=testing.SENTENCEPIECE_VOCAB, max_position_embeddings=256,
              rms_norm_eps=1e-6)


def make_model(arch: str, seed: int = 0, **overrides):
    """A seeded random fp32 model of `arch`: d=64, 2 layers, 4 heads / 2 KV heads; qwen2 with tied embeddings,
    qwen3moe with 8 experts of width 32, top-2 renormalised, and SmolLM2's
    vocabulary (llama.cpp's converter takes only a byte-level BPE tokenizer for it)."""
    import transformers

    settings = dict(_SHAPE)
    if arch == "qwen2":
        cls, config_cls = transformers.Qwen2ForCausalLM, transformers.Qwen2Config
        settings.update(tie_word_embeddings=True, rope_theta=10000.0)
    elif arch == "qwen3":
        cls, config_cls = transformers.Qwen3ForCausalLM, transformers.Qwen3Config
        settings.update(head_dim=32, tie_word_embeddings=False)
    else:
        cls, config_cls = transformers.Qwen3MoeForCausalLM, transformers.Qwen3MoeConfig
        settings.update(head_dim=16, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                        norm_topk_prob=True, tie_word_embeddings=False,
                        vocab_size=testing.SMOLLM_VOCAB)
    settings.update(overrides)
    torch.manual_seed(seed)
    model = cls(config_cls(**settings)).float().eval()
    with torch.no_grad():  # larger than the default init, so the logits depend visibly on every weight
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.08)
            elif "norm" in name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.1)  # biases
    return model


def add_tokenizer(arch: str, folder: Path) -> None:
    if arch == "qwen3moe":
        testing.add_smollm_tokenizer(folder)
    else:
        testing.add_sentencepiece_tokenizer(folder)
