"""GemmaConfig: the hyper-parameters of Gemma 3 (text), read from GGUF metadata (as llama.cpp's converter writes it
and llama.cpp reads it) or from an HF config.json, stored in manifest.config (as `to_dict()`)."""

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from gdsllm_core.api import ConversionError, UnknownArchitectureError, config_of

ARCHITECTURE = "gemma3"  # GGUF `general.architecture`, also gdsllm's architecture name
HF_ARCHITECTURES = ("Gemma3ForCausalLM",)
HF_MULTIMODAL = ("Gemma3ForConditionalGeneration",)
SLIDING, FULL = "sliding_attention", "full_attention"
LLAMACPP_SWA_PERIOD = 6  # llama.cpp's default for gemma3 GGUFs without a pattern: every 6th layer is global
LLAMACPP_LOCAL_THETA = 10000.0  # and the local layers' rope base without rope.freq_base_swa
LLAMACPP_27B_LAYERS = 62  # llama.cpp scales queries by (dim / heads)^-0.5 for the 27B, by head_dim^-0.5 otherwise
_HINT_PLUGINS = "install the plugin for this architecture; `gdsllm plugins` lists them"


@dataclass
class GemmaConfig:
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    query_scale: float  # queries are multiplied by this before attention (query_pre_attn_scalar ** -0.5)
    rope_theta: float = 1_000_000.0  # global layers
    rope_theta_local: float = 10000.0  # sliding-window layers
    rope_linear_factor: float = 1.0  # global layers' positions divided by this (rope scaling "linear")
    sliding_window: int = 0  # keys a sliding layer's query sees (itself included); 0: none
    sliding_layers: list[bool] = field(default_factory=list)  # per layer: local (sliding) or global
    rms_eps: float = 1e-6
    final_logit_softcap: float = 0.0  # logits = cap * tanh(logits / cap); 0: none
    tied_embeddings: bool = True
    context_length: int = 32768

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ConversionError(f"{self.n_heads} attention heads are not a multiple of {self.n_kv_heads} KV heads",
                                  "the checkpoint's config is inconsistent")
        if len(self.sliding_layers) != self.n_layers:
            raise ConversionError(f"{len(self.sliding_layers)} layer types for {self.n_layers} layers",
                                  "the checkpoint's config is inconsistent")

    @property
    def embed_scale(self) -> float:
        return self.dim ** 0.5

    def window(self, layer: int) -> int:
        """The sliding window of `layer`, 0 for a global layer."""
        return self.sliding_window if self.sliding_layers[layer] else 0

    def inv_freq(self, local: bool) -> torch.Tensor:
        """RoPE inverse frequencies [head_dim/2], fp32, of the local or the global layers."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
        if local:
            return 1.0 / (self.rope_theta_local ** exponents)
        return 1.0 / (self.rope_theta ** exponents) / self.rope_linear_factor

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GemmaConfig":
        """From a manifest's config, its fields' types checked."""
        return config_of(cls, data)

    @classmethod
    def from_gguf(cls, metadata: dict, n_vocab: int, tied: bool) -> "GemmaConfig":
        """From GGUF key/values (`gemma3.*`), with llama.cpp's defaults for what the file leaves out."""
        arch = metadata.get("general.architecture")
        if arch != ARCHITECTURE:
            raise UnknownArchitectureError(f"GGUF architecture {arch!r} is not handled by the gemma plugin "
                                           f"(it handles {ARCHITECTURE})", _HINT_PLUGINS)

        def key(name: str, default=None):
            value = metadata.get(f"{arch}.{name}", default)
            if value is None:
                raise ConversionError(f"GGUF metadata lacks {arch}.{name}", "the file is incomplete: re-download it")
            return value

        n_layers = int(key("block_count"))
        dim = int(key("embedding_length"))
        n_heads = int(key("attention.head_count"))
        head_dim = int(key("attention.key_length"))
        window = int(metadata.get(f"{arch}.attention.sliding_window") or 0)
        pattern = metadata.get(f"{arch}.attention.sliding_window_pattern")
        if not window:
            sliding = [False] * n_layers
        elif isinstance(pattern, list):
            sliding = [bool(v) for v in pattern]
        else:
            period = int(pattern or LLAMACPP_SWA_PERIOD)
            sliding = [period == 0 or i % period < period - 1 for i in range(n_layers)]
        scale_dim = dim // n_heads if n_layers == LLAMACPP_27B_LAYERS else head_dim
        return cls(
            n_layers=n_layers, dim=dim, n_heads=n_heads,
            n_kv_heads=int(metadata.get(f"{arch}.attention.head_count_kv") or n_heads), head_dim=head_dim,
            ffn_dim=int(key("feed_forward_length")), vocab_size=n_vocab, query_scale=1.0 / math.sqrt(scale_dim),
            rope_theta=float(key("rope.freq_base")),
            rope_theta_local=float(metadata.get(f"{arch}.rope.freq_base_swa") or LLAMACPP_LOCAL_THETA),
            rope_linear_factor=_rope_factor(metadata.get(f"{arch}.rope.scaling.type"),
                                            metadata.get(f"{arch}.rope.scaling.factor")),
            sliding_window=window, sliding_layers=sliding, rms_eps=float(key("attention.layer_norm_rms_epsilon")),
            final_logit_softcap=float(metadata.get(f"{arch}.final_logit_softcapping") or 0.0), tied_embeddings=tied,
            context_length=int(key("context_length")))

    @classmethod
    def from_hf(cls, config: dict) -> "GemmaConfig":
        """From a transformers config.json (Gemma3ForCausalLM, model_type gemma3_text)."""
        archs = config.get("architectures") or []
        if any(arch in HF_MULTIMODAL for arch in archs):
            raise ConversionError(f"{archs[0]} (Gemma 3 with its vision tower) is not supported from safetensors",
                                  "use the model's GGUF (llama.cpp writes the text model alone), or a text-only "
                                  "Gemma3ForCausalLM checkpoint")
        if not any(arch in HF_ARCHITECTURES for arch in archs):
            raise UnknownArchitectureError(
                f"config.json architecture {archs or config.get('model_type')!r} is not handled by the gemma plugin "
                f"(it handles {', '.join(HF_ARCHITECTURES)})", _HINT_PLUGINS)
        activation = config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"
        if activation != "gelu_pytorch_tanh":
            raise ConversionError(f"activation {activation!r} is not supported (Gemma 3 uses gelu_pytorch_tanh)",
                                  "use a checkpoint with hidden_activation \"gelu_pytorch_tanh\"")
        if config.get("attn_logit_softcapping") or config.get("attention_bias"):
            raise ConversionError("Gemma 3 checkpoints with attention logit soft-capping or attention biases are "
                                  "not supported", "use a checkpoint without them (as Google publishes Gemma 3)")
        if config.get("use_bidirectional_attention"):
            raise ConversionError("bidirectional attention (an embedding model) is not supported",
                                  "use a causal Gemma 3 language model")
        n_layers = int(config["num_hidden_layers"])
        layer_types = config.get("layer_types")
        if not layer_types:
            period = int(config.get("sliding_window_pattern") or LLAMACPP_SWA_PERIOD)
            layer_types = [SLIDING if (i + 1) % period else FULL for i in range(n_layers)]
        if len(layer_types) != n_layers or set(layer_types) - {SLIDING, FULL}:
            raise ConversionError(f"config.json: layer_types {layer_types} does not describe {n_layers} layers",
                                  f"each entry must be {SLIDING!r} or {FULL!r}")
        rope = config.get("rope_parameters") or {}
        full = dict(rope.get(FULL) or config.get("rope_scaling") or {})
        local = dict(rope.get(SLIDING) or {})
        if _rope_factor(local.get("rope_type"), local.get("factor")) != 1.0:
            raise ConversionError("rope scaling on the sliding-window layers is not supported",
                                  "use a checkpoint whose local layers use plain rope (as Gemma 3's do)")
        n_heads = int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or 256)
        return cls(
            n_layers=n_layers, dim=int(config["hidden_size"]), n_heads=n_heads,
            n_kv_heads=int(config.get("num_key_value_heads") or n_heads), head_dim=head_dim,
            ffn_dim=int(config["intermediate_size"]), vocab_size=int(config["vocab_size"]),
            query_scale=float(config.get("query_pre_attn_scalar") or 256) ** -0.5,
            rope_theta=float(full.get("rope_theta") or config.get("rope_theta") or 1_000_000.0),
            rope_theta_local=float(local.get("rope_theta") or config.get("rope_local_base_freq") or 10000.0),
            rope_linear_factor=_rope_factor(full.get("rope_type") or full.get("type"), full.get("factor")),
            sliding_window=int(config.get("sliding_window") or 0),
            sliding_layers=[t == SLIDING for t in layer_types], rms_eps=float(config.get("rms_norm_eps", 1e-6)),
            final_logit_softcap=float(config.get("final_logit_softcapping") or 0.0),
            tied_embeddings=bool(config.get("tie_word_embeddings", True)),
            context_length=int(config.get("max_position_embeddings") or 32768))


def _rope_factor(rope_type: str | None, factor) -> float:
    """The linear rope factor for a scaling type (none or linear); other types are refused."""
    if rope_type in (None, "none", "default"):
        return 1.0
    if rope_type == "linear":
        return float(factor)
    raise ConversionError(f"rope scaling {rope_type!r} is not supported for Gemma 3",
                          "use a checkpoint without rope scaling, or with linear scaling")
