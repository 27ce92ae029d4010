"""Helpers for the LLaMA plugin's tests: random GGML blocks, GGUF files written with gguf-py, tiny HF models."""

import inspect
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES

# byte offsets of the fp16 scale fields in one block of each type (ggml-common.h)
FP16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
               "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
               "IQ4_NL": (0,), "IQ4_XS": (0,), "IQ3_S": (0,), "IQ3_XXS": (0,), "IQ2_XXS": (0,), "IQ2_XS": (0,),
               "IQ2_S": (0,), "IQ1_S": (0,), "MXFP4": ()}  # MXFP4: a one-byte exponent, finite for any value


def random_blocks(qtype: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Raw bytes uint8 [rows, row_bytes] of a `qtype` tensor: random codes, finite fp16 scales of either sign."""
    if qtype == "F32":
        return rng.standard_normal((rows, cols), dtype=np.float32).view(np.uint8)
    if qtype == "F16":
        return rng.standard_normal((rows, cols)).astype(np.float16).view(np.uint8)
    if qtype == "BF16":
        values = rng.standard_normal((rows, cols)).astype(np.float32)
        return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    block_values, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    n_blocks = rows * cols // block_values
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for offset in FP16_FIELDS[qtype]:
        scale = (rng.standard_normal(n_blocks) * 0.05).astype(np.float16)
        blocks[:, offset:offset + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(rows, -1)


def llamacpp_permute(weights: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute` (HF rows -> GGUF rope layout)."""
    return (weights.reshape(n_heads, 2, weights.shape[0] // n_heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_llama_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, str]], *, n_layers: int, dim: int,
                     n_heads: int, n_kv_heads: int, ffn_dim: int, vocab_size: int, rope_theta: float = 10000.0,
                     rms_eps: float = 1e-5, context_length: int = 256, tokenizer: dict | None = None,
                     file_type: int | None = None, split_max_tensors: int = 0) -> Path:
    """A llama-architecture GGUF: `tensors` maps names to (data, qtype); quantized data are raw uint8 blocks.
    With `split_max_tensors`, gguf-py splits it into parts (`<stem>-00001-of-0000N.gguf`)."""
    writer = GGUFWriter(str(path), arch="llama", split_max_tensors=split_max_tensors)
    if file_type is not None:
        writer.add_file_type(file_type)
    writer.add_block_count(n_layers)
    writer.add_context_length(context_length)
    writer.add_embedding_length(dim)
    writer.add_feed_forward_length(ffn_dim)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv_heads)
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(rms_eps)
    writer.add_rope_dimension_count(dim // n_heads)
    writer.add_vocab_size(vocab_size)
    tokenizer = tokenizer or {"model": "gpt2", "tokens": [f"t{i}" for i in range(vocab_size)],
                              "types": [1] * vocab_size, "merges": []}
    writer.add_tokenizer_model(tokenizer["model"])
    writer.add_token_list(tokenizer["tokens"])
    writer.add_token_types(tokenizer["types"])
    if tokenizer.get("merges"):
        writer.add_token_merges(tokenizer["merges"])
    if tokenizer.get("scores") is not None:
        writer.add_token_scores(tokenizer["scores"])
    writer.add_eos_token_id(tokenizer.get("eos", 0))
    for name, (data, qtype) in tensors.items():
        raw_dtype = GGMLQuantizationType[qtype]
        if qtype == "F32":
            writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
        elif qtype == "F16" and data.dtype == np.float16:
            writer.add_tensor(name, np.ascontiguousarray(data))
        else:
            writer.add_tensor(name, np.ascontiguousarray(data), raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_llama(**overrides):
    """A seeded random fp32 LlamaForCausalLM (2 layers, d=64, 4 heads / 2 KV heads, vocab 256)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, rms_norm_eps=1e-5,
                    rope_theta=10000.0, tie_word_embeddings=False)
    settings.update(overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**settings)).float().eval()
    with torch.no_grad():  # larger than the default init, so the logits depend visibly on every weight
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.08)
            else:
                param.uniform_(0.5, 1.5)
    return model


@torch.no_grad()
def hf_logits_with_cache(model, prompt: list[int], steps: int) -> tuple[list[torch.Tensor], list[int]]:
    """Greedy run of an HF model with its KV cache: logits of the prompt's last position and of each decode step,
    and the tokens fed."""
    # transformers 5.x renamed `past_key_values` to `cache`
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(torch.tensor([prompt]), use_cache=True)
    logits, past = [out.logits[0, -1].float()], getattr(out, cache_arg)
    fed = []
    for _ in range(steps):
        token = int(logits[-1].argmax())
        fed.append(token)
        out = model(torch.tensor([[token]]), use_cache=True, **{cache_arg: past})
        logits.append(out.logits[0, -1].float())
        past = getattr(out, cache_arg)
    return logits, fed


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def store_is_empty(root: Path) -> bool:
    return not root.exists() or not any(root.iterdir())
