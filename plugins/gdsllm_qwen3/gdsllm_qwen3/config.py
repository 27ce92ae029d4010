"""QwenConfig: the hyper-parameters of Qwen2, Qwen3 and Qwen3-MoE, read from GGUF metadata (as llama.cpp's
`convert_hf_to_gguf.py` writes it) or from an HF config.json, stored in manifest.config (as `to_dict()`)."""

import dataclasses
from dataclasses import dataclass, field

import torch

from gdsllm_core.api import ConversionError, UnknownArchitectureError, config_of

QWEN2, QWEN3, QWEN3MOE = "qwen2", "qwen3", "qwen3moe"
ARCHITECTURES = (QWEN2, QWEN3, QWEN3MOE)  # GGUF `general.architecture` values, also gdsllm's architecture names
HF_ARCHITECTURES = {"Qwen2ForCausalLM": QWEN2, "Qwen3ForCausalLM": QWEN3, "Qwen3MoeForCausalLM": QWEN3MOE}
_HINT_PLUGINS = "install the plugin for this architecture; `gdsllm plugins` lists them"


@dataclass
class QwenConfig:
    architecture: str
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int  # dense FFN width (layers without experts); 0 when every layer has experts
    vocab_size: int
    rope_theta: float = 1_000_000.0
    rope_linear_factor: float = 1.0  # positions divided by this (rope scaling "linear"); 1: none
    rms_eps: float = 1e-6
    tied_embeddings: bool = False
    context_length: int = 32768
    qkv_bias: bool = False  # qwen2: q, k and v projections carry biases
    qk_norm: bool = False  # qwen3: RMSNorm over each head of q and k, before rope
    n_experts: int = 0
    n_experts_used: int = 0
    expert_ffn_dim: int = 0
    norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum to 1
    sparse_layers: list[int] = field(default_factory=list)  # layers whose FFN is the MoE block

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise UnknownArchitectureError(f"architecture {self.architecture!r} is not handled by the qwen3 plugin "
                                           f"(it handles {', '.join(ARCHITECTURES)})", _HINT_PLUGINS)
        if self.n_heads % self.n_kv_heads:
            raise ConversionError(f"{self.n_heads} attention heads are not a multiple of {self.n_kv_heads} KV heads",
                                  "the checkpoint's config is inconsistent")
        if self.sparse_layers and not (0 < self.n_experts_used <= self.n_experts and self.expert_ffn_dim):
            raise ConversionError(f"MoE config: {self.n_experts_used} of {self.n_experts} experts of width "
                                  f"{self.expert_ffn_dim}", "the checkpoint's config is inconsistent")

    def is_sparse(self, layer: int) -> bool:
        return layer in self.sparse_layers

    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies [head_dim/2], fp32, linear scaling applied (as transformers computes them)."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
        return 1.0 / (self.rope_theta ** exponents) / self.rope_linear_factor

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "QwenConfig":
        """From a manifest's config, its fields' types checked."""
        return config_of(cls, data)

    @classmethod
    def from_gguf(cls, metadata: dict, n_vocab: int, tied: bool, sparse_layers: list[int]) -> "QwenConfig":
        """From GGUF key/values (`{arch}.*`); `n_vocab` from the token list, `tied` when there is no output.weight,
        `sparse_layers` the layers holding expert tensors."""
        arch = metadata.get("general.architecture")
        if arch not in ARCHITECTURES:
            raise UnknownArchitectureError(f"GGUF architecture {arch!r} is not handled by the qwen3 plugin "
                                           f"(it handles {', '.join(ARCHITECTURES)})", _HINT_PLUGINS)

        def key(name: str, default=None):
            value = metadata.get(f"{arch}.{name}", default)
            if value is None:
                raise ConversionError(f"GGUF metadata lacks {arch}.{name}", "the file is incomplete: re-download it")
            return value

        n_heads = int(key("attention.head_count"))
        dim = int(key("embedding_length"))
        head_dim = int(metadata.get(f"{arch}.attention.key_length") or dim // n_heads)
        rope_dim = int(metadata.get(f"{arch}.rope.dimension_count") or head_dim)
        if rope_dim != head_dim:
            raise ConversionError(f"partial rotary embeddings (rope over {rope_dim} of {head_dim} dims) are not "
                                  f"supported for {arch}", "use a GGUF whose rope covers the whole head")
        factor = _rope_factor(metadata.get(f"{arch}.rope.scaling.type"),
                              metadata.get(f"{arch}.rope.scaling.factor"), arch)
        moe = arch == QWEN3MOE
        return cls(
            architecture=arch, n_layers=int(key("block_count")), dim=dim, n_heads=n_heads,
            n_kv_heads=int(metadata.get(f"{arch}.attention.head_count_kv") or n_heads), head_dim=head_dim,
            ffn_dim=int(metadata.get(f"{arch}.feed_forward_length") or 0),
            vocab_size=int(metadata.get(f"{arch}.vocab_size") or n_vocab),
            rope_theta=float(metadata.get(f"{arch}.rope.freq_base", 10000.0)), rope_linear_factor=factor,
            rms_eps=float(key("attention.layer_norm_rms_epsilon")), tied_embeddings=tied,
            context_length=int(key("context_length")), qkv_bias=arch == QWEN2, qk_norm=arch != QWEN2,
            n_experts=int(key("expert_count")) if moe else 0,
            n_experts_used=int(key("expert_used_count")) if moe else 0,
            expert_ffn_dim=int(key("expert_feed_forward_length")) if moe else 0,
            # llama.cpp renormalises qwen3moe's top-k weights unless the file says otherwise
            norm_topk_prob=bool(metadata.get(f"{arch}.expert_weights_norm", True)),
            sparse_layers=sparse_layers if moe else [])

    @classmethod
    def from_hf(cls, config: dict) -> "QwenConfig":
        """From a transformers config.json (Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM)."""
        archs = config.get("architectures") or []
        arch = next((HF_ARCHITECTURES[a] for a in archs if a in HF_ARCHITECTURES), None)
        if arch is None:
            raise UnknownArchitectureError(
                f"config.json architecture {archs or config.get('model_type')!r} is not handled by the qwen3 plugin "
                f"(it handles {', '.join(HF_ARCHITECTURES)})", _HINT_PLUGINS)
        if config.get("use_sliding_window"):
            raise ConversionError("sliding-window attention (use_sliding_window) is not supported for Qwen",
                                  "use a checkpoint with use_sliding_window false (as Qwen publishes them)")
        if arch != QWEN2 and config.get("attention_bias"):
            raise ConversionError(f"{archs[0]} with attention_bias is not supported",
                                  "use a checkpoint with attention_bias false (as Qwen publishes them)")
        if config.get("hidden_act", "silu") != "silu":
            raise ConversionError(f"activation {config['hidden_act']!r} is not supported (Qwen uses silu)",
                                  "use a checkpoint with hidden_act \"silu\"")
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_theta = float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0)
        factor = _rope_factor(rope.get("rope_type") or rope.get("type"), rope.get("factor"), arch)
        n_heads = int(config["num_attention_heads"])
        n_layers = int(config["num_hidden_layers"])
        sparse: list[int] = []
        if arch == QWEN3MOE and _n_experts(config):
            step = int(config.get("decoder_sparse_step") or 1)
            dense_only = set(config.get("mlp_only_layers") or [])
            sparse = [i for i in range(n_layers) if i not in dense_only and (i + 1) % step == 0]
        return cls(
            architecture=arch, n_layers=n_layers, dim=int(config["hidden_size"]), n_heads=n_heads,
            n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
            head_dim=int(config.get("head_dim") or config["hidden_size"] // n_heads),
            ffn_dim=int(config.get("intermediate_size") or 0), vocab_size=int(config["vocab_size"]),
            rope_theta=rope_theta, rope_linear_factor=factor, rms_eps=float(config.get("rms_norm_eps", 1e-6)),
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            context_length=int(config.get("max_position_embeddings") or 32768),
            qkv_bias=arch == QWEN2, qk_norm=arch != QWEN2,
            n_experts=_n_experts(config) if sparse else 0,
            n_experts_used=int(config.get("num_experts_per_tok") or 0) if sparse else 0,
            expert_ffn_dim=int(config.get("moe_intermediate_size") or 0) if sparse else 0,
            norm_topk_prob=bool(config.get("norm_topk_prob", False)), sparse_layers=sparse)


def _rope_factor(rope_type: str | None, factor, arch: str) -> float:
    """The linear rope factor for a scaling type (none or linear); other types are refused."""
    if rope_type in (None, "none", "default"):
        return 1.0
    if rope_type == "linear":
        return float(factor)
    raise ConversionError(f"rope scaling {rope_type!r} is not supported for {arch}",
                          "use a checkpoint without rope scaling, or with linear scaling")


def _n_experts(config: dict) -> int:
    """config.json's expert count (transformers 5 writes `num_local_experts`, earlier ones `num_experts`)."""
    return int(config.get("num_experts") or config.get("num_local_experts") or 0)
