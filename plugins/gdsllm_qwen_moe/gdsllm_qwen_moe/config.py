"""QwenMoeConfig: the Qwen3.5-MoE hyper-parameters, read from an HF or MLX config.json (flat or with text_config)."""

from dataclasses import asdict, dataclass, field

from gdsllm_core.api import ConversionError, config_of

FULL_ATTENTION = "full_attention"
LINEAR_ATTENTION = "linear_attention"
MODEL_TYPES = ("qwen3_5_moe", "qwen3_5_moe_text")
GGUF_ARCHITECTURE = "qwen35moe"  # general.architecture of llama.cpp's Qwen3.5-MoE GGUFs


@dataclass
class QwenMoeConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    linear_conv_kernel_dim: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    layer_types: list[str]
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.25
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    eos_token_ids: list[int] = field(default_factory=list)
    # value heads in llama.cpp's tiled order (GGUF with fewer key than value heads): value head j is served by key
    # head j % linear_num_key_heads, not by j // (value heads per key head) as in HF's grouped order
    linear_value_heads_tiled: bool = False

    # derived sizes
    @property
    def key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_linear(self, layer: int) -> bool:
        return self.layer_types[layer] == LINEAR_ATTENTION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "QwenMoeConfig":
        """From the manifest's config (as written by `to_dict`)."""
        return config_of(cls, data)

    @classmethod
    def from_hf(cls, raw: dict) -> "QwenMoeConfig":
        """From config.json: HF `Qwen3_5MoeForCausalLM` (flat), `…ForConditionalGeneration` (text_config) or mlx_lm."""
        text = dict(raw.get("text_config") or raw)
        n_layers = _need(text, "num_hidden_layers")
        layer_types = text.get("layer_types")
        if not layer_types:
            interval = text.get("full_attention_interval", 4)
            layer_types = [FULL_ATTENTION if (i + 1) % interval == 0 else LINEAR_ATTENTION for i in range(n_layers)]
        if len(layer_types) != n_layers or set(layer_types) - {FULL_ATTENTION, LINEAR_ATTENTION}:
            raise ConversionError(f"config.json: layer_types {layer_types} does not describe {n_layers} layers",
                                  "each entry must be 'linear_attention' or 'full_attention'")
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        hidden = _need(text, "hidden_size")
        heads = _need(text, "num_attention_heads")
        eos = raw.get("eos_token_id", text.get("eos_token_id"))
        return cls(
            vocab_size=_need(text, "vocab_size"), hidden_size=hidden, num_hidden_layers=n_layers,
            num_attention_heads=heads, num_key_value_heads=_need(text, "num_key_value_heads"),
            head_dim=text.get("head_dim") or hidden // heads,
            linear_conv_kernel_dim=_need(text, "linear_conv_kernel_dim"),
            linear_key_head_dim=_need(text, "linear_key_head_dim"),
            linear_value_head_dim=_need(text, "linear_value_head_dim"),
            linear_num_key_heads=_need(text, "linear_num_key_heads"),
            linear_num_value_heads=_need(text, "linear_num_value_heads"),
            moe_intermediate_size=_need(text, "moe_intermediate_size"),
            shared_expert_intermediate_size=_need(text, "shared_expert_intermediate_size"),
            num_experts=_need(text, "num_experts"), num_experts_per_tok=_need(text, "num_experts_per_tok"),
            layer_types=list(layer_types), rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 10000.0))),
            partial_rotary_factor=float(rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25))),
            max_position_embeddings=int(text.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            eos_token_ids=[] if eos is None else [eos] if isinstance(eos, int) else list(eos),
        )


    @classmethod
    def from_gguf(cls, meta: dict, vocab_size: int, tied: bool) -> "QwenMoeConfig":
        """From a `qwen35moe` GGUF's metadata (as llama.cpp's convert_hf_to_gguf.py writes it); the layers of the
        multi-token-prediction head (`nextn_predict_layers`, after the text layers) are left out."""
        def need(key: str):
            full = f"{GGUF_ARCHITECTURE}.{key}"
            if full not in meta:
                raise ConversionError(f"the GGUF has no {full!r}", "is this a Qwen3.5-MoE GGUF written by llama.cpp?")
            return meta[full]

        n_layers = int(need("block_count")) - int(meta.get(f"{GGUF_ARCHITECTURE}.nextn_predict_layers", 0))
        recurrent = meta.get(f"{GGUF_ARCHITECTURE}.attention.recurrent_layers")
        if recurrent is not None:
            layer_types = [LINEAR_ATTENTION if r else FULL_ATTENTION for r in list(recurrent)[:n_layers]]
        else:
            interval = int(need("full_attention_interval"))
            layer_types = [FULL_ATTENTION if (i + 1) % interval == 0 else LINEAR_ATTENTION for i in range(n_layers)]
        head_dim = int(need("attention.key_length"))
        kv_heads = need("attention.head_count_kv")
        if isinstance(kv_heads, list):  # per layer (0 for the linear-attention ones)
            kv_heads = max(kv_heads)
        value_heads, key_heads = int(need("ssm.time_step_rank")), int(need("ssm.group_count"))
        eos = meta.get("tokenizer.ggml.eos_token_id")
        return cls(
            vocab_size=vocab_size, hidden_size=int(need("embedding_length")), num_hidden_layers=n_layers,
            num_attention_heads=int(need("attention.head_count")), num_key_value_heads=int(kv_heads),
            head_dim=head_dim, linear_conv_kernel_dim=int(need("ssm.conv_kernel")),
            linear_key_head_dim=int(need("ssm.state_size")), linear_value_head_dim=int(need("ssm.inner_size")) // value_heads,
            linear_num_key_heads=key_heads, linear_num_value_heads=value_heads,
            moe_intermediate_size=int(need("expert_feed_forward_length")),
            shared_expert_intermediate_size=int(need("expert_shared_feed_forward_length")),
            num_experts=int(need("expert_count")), num_experts_per_tok=int(need("expert_used_count")),
            layer_types=layer_types, rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
            rope_theta=float(meta.get(f"{GGUF_ARCHITECTURE}.rope.freq_base", 10000.0)),
            partial_rotary_factor=int(need("rope.dimension_count")) / head_dim,
            max_position_embeddings=int(meta.get(f"{GGUF_ARCHITECTURE}.context_length", 32768)),
            tie_word_embeddings=tied, eos_token_ids=[] if eos is None else [int(eos)],
            linear_value_heads_tiled=value_heads != key_heads)


def _need(config: dict, key: str):
    if key not in config:
        raise ConversionError(f"config.json has no {key!r}", "is this a Qwen3.5-MoE checkpoint?")
    return config[key]
