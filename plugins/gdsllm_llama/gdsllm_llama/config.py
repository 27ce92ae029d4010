"""LlamaConfig: the hyper-parameters the forward pass needs, read from GGUF metadata or an HF config.json, stored
in manifest.config (as `to_dict()`)."""

import dataclasses
import math
from dataclasses import dataclass
from typing import Annotated

import torch
from msgspec import Meta

from gdsllm_core.api import ConversionError, UnknownArchitectureError, config_of

HF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
GGUF_ARCHITECTURE = "llama"
ROPE_TYPES = ("default", "linear", "llama3")


MAX_LAYERS = 1024  # the largest LLaMA has 126: a manifest claiming more is damaged
MAX_WIDTH = 1 << 20  # hidden, FFN and vocabulary sizes, and head counts

Layers = Annotated[int, Meta(ge=1, le=MAX_LAYERS)]
Width = Annotated[int, Meta(ge=1, le=MAX_WIDTH)]


@dataclass
class LlamaConfig:
    n_layers: Layers
    dim: Width
    n_heads: Width
    n_kv_heads: Width
    ffn_dim: Width
    vocab_size: Width
    head_dim: int = 0
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"llama3", "factor", ...} as HF writes it
    rope_freq_factors: list[float] | None = None  # GGUF's rope_freqs.weight (llama3 scaling precomputed)
    rms_eps: float = 1e-5
    tied_embeddings: bool = False
    context_length: int = 4096

    def __post_init__(self) -> None:
        if not self.head_dim:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ConversionError(f"{self.n_heads} attention heads are not a multiple of {self.n_kv_heads} KV heads",
                                  "the checkpoint's config is inconsistent: check num_attention_heads and "
                                  "num_key_value_heads, or llama.attention.head_count[_kv] in a GGUF")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ConversionError(f"rope scaling {rope_type!r} is not supported by the llama plugin",
                                  f"supported: {', '.join(ROPE_TYPES)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LlamaConfig":
        return config_of(cls, data)

    @classmethod
    def from_gguf(cls, metadata: dict, n_vocab: int, tied: bool,
                  rope_freq_factors: list[float] | None = None) -> "LlamaConfig":
        """From GGUF key/values (`llama.*`); `n_vocab` from the token list, `tied` when there is no output.weight."""
        arch = metadata.get("general.architecture")
        if arch != GGUF_ARCHITECTURE:
            raise UnknownArchitectureError(f"GGUF architecture {arch!r} is not handled by the llama plugin",
                                           "install the plugin for this architecture; `gdsllm plugins` lists them")

        def key(name: str, default=None):
            value = metadata.get(f"llama.{name}", default)
            if value is None:
                raise ConversionError(f"GGUF metadata lacks llama.{name}", "the file is incomplete: re-download it")
            return value

        if metadata.get("llama.expert_count"):
            raise ConversionError(f"this GGUF is a mixture-of-experts model ({metadata['llama.expert_count']} "
                                  "experts), which the llama plugin does not run", "use a dense LLaMA-family GGUF")
        n_heads = int(key("attention.head_count"))
        dim = int(key("embedding_length"))
        head_dim = int(metadata.get("llama.attention.key_length") or dim // n_heads)
        rope_dim = int(metadata.get("llama.rope.dimension_count") or head_dim)
        if rope_dim != head_dim:
            raise ConversionError(f"partial rotary embeddings (rope over {rope_dim} of {head_dim} dims) are not "
                                  "supported",
                                  "use a LLaMA-family GGUF whose rope covers the whole head")
        scaling = None
        scaling_type = metadata.get("llama.rope.scaling.type")
        if scaling_type == "linear":
            scaling = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
        elif scaling_type not in (None, "none"):
            raise ConversionError(f"rope scaling {scaling_type!r} is not supported by the llama plugin",
                                  f"supported: {', '.join(ROPE_TYPES)}")
        return cls(
            n_layers=int(key("block_count")), dim=dim, n_heads=n_heads,
            n_kv_heads=int(metadata.get("llama.attention.head_count_kv") or n_heads),
            ffn_dim=int(key("feed_forward_length")), vocab_size=int(metadata.get("llama.vocab_size") or n_vocab),
            head_dim=head_dim, rope_theta=float(metadata.get("llama.rope.freq_base", 10000.0)),
            rope_scaling=scaling, rope_freq_factors=rope_freq_factors,
            rms_eps=float(key("attention.layer_norm_rms_epsilon")), tied_embeddings=tied,
            context_length=int(key("context_length")))

    @classmethod
    def from_hf(cls, config: dict) -> "LlamaConfig":
        """From a transformers config.json (LlamaForCausalLM, or MistralForCausalLM without a sliding window)."""
        archs = config.get("architectures") or []
        if not any(arch in HF_ARCHITECTURES for arch in archs):
            raise UnknownArchitectureError(
                f"config.json architecture {archs or config.get('model_type')!r} is not handled by the llama plugin "
                f"(it handles {', '.join(HF_ARCHITECTURES)})",
                "install the plugin for this architecture; `gdsllm plugins` lists them")
        if config.get("sliding_window"):
            raise ConversionError(f"sliding-window attention ({config['sliding_window']}) is not supported",
                                  "use a checkpoint without sliding_window, e.g. Mistral-7B-v0.1")
        if config.get("attention_bias") or config.get("mlp_bias"):
            raise ConversionError("LLaMA checkpoints with attention or MLP biases are not supported",
                                  "use a checkpoint with attention_bias and mlp_bias false")
        if config.get("hidden_act", "silu") != "silu":
            raise ConversionError(f"activation {config['hidden_act']!r} is not supported (LLaMA uses silu)",
                                  "use a checkpoint with hidden_act \"silu\"")
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", None) or config.get("rope_theta") or 10000.0)
        rope_type = rope.get("rope_type") or rope.get("type") or "default"
        scaling = None if rope_type == "default" else {**rope, "rope_type": rope_type}
        n_heads = int(config["num_attention_heads"])
        return cls(
            n_layers=int(config["num_hidden_layers"]), dim=int(config["hidden_size"]), n_heads=n_heads,
            n_kv_heads=int(config.get("num_key_value_heads") or n_heads), ffn_dim=int(config["intermediate_size"]),
            vocab_size=int(config["vocab_size"]), head_dim=int(config.get("head_dim") or 0),
            rope_theta=rope_theta, rope_scaling=scaling, rms_eps=float(config.get("rms_norm_eps", 1e-6)),
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            context_length=int(config.get("max_position_embeddings") or 4096))

    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies [head_dim/2], fp32, with the model's scaling applied (as transformers does)."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
        inv_freq = 1.0 / (self.rope_theta ** exponents)
        scaling = self.rope_scaling or {}
        rope_type = scaling.get("rope_type", "default")
        if rope_type == "linear":
            inv_freq = inv_freq / float(scaling["factor"])
        elif rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        if self.rope_freq_factors is not None:
            inv_freq = inv_freq / torch.tensor(self.rope_freq_factors, dtype=torch.float32)
        return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """LLaMA 3.1's frequency-dependent scaling (transformers' `_compute_llama3_parameters`)."""
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)
