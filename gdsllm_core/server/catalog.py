"""What the listing routes say about a converted model (ollama's details block, digest, parameter size)."""

import hashlib
import math

import gguf
import msgspec

from gdsllm_core.layout import manifest as manifest_mod
from gdsllm_core.layout.defaults import ModelDefaults
from gdsllm_core.layout.store import ModelEntry
from gdsllm_core.server.schemas import OllamaModelDetails
from gdsllm_core.server.streams import unix_to_rfc3339

PACKED_INTEGER_TYPES = {"U8", "I8", "I32", "U32"}
# GGUF's `<arch>.*` metadata keys (gguf-py's Keys.LLM / Keys.Attention / Keys.Rope) and the plugin config names
# that hold each value (LLaMA's, then HF's names as Qwen3.5-MoE keeps them)
GGUF_CONFIG_KEYS = {
    gguf.Keys.LLM.CONTEXT_LENGTH: ("context_length", "max_position_embeddings"),
    gguf.Keys.LLM.EMBEDDING_LENGTH: ("dim", "hidden_size"),
    gguf.Keys.LLM.BLOCK_COUNT: ("n_layers", "num_hidden_layers"),
    gguf.Keys.LLM.FEED_FORWARD_LENGTH: ("ffn_dim", "intermediate_size"),
    gguf.Keys.LLM.EXPERT_FEED_FORWARD_LENGTH: ("moe_intermediate_size",),
    gguf.Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH: ("shared_expert_intermediate_size",),
    gguf.Keys.LLM.EXPERT_COUNT: ("num_experts",),
    gguf.Keys.LLM.EXPERT_USED_COUNT: ("num_experts_per_tok",),
    gguf.Keys.LLM.VOCAB_SIZE: ("vocab_size",),
    gguf.Keys.Attention.HEAD_COUNT: ("n_heads", "num_attention_heads"),
    gguf.Keys.Attention.HEAD_COUNT_KV: ("n_kv_heads", "num_key_value_heads"),
    gguf.Keys.Attention.KEY_LENGTH: ("head_dim",),
    gguf.Keys.Attention.VALUE_LENGTH: ("head_dim",),
    gguf.Keys.Attention.LAYERNORM_RMS_EPS: ("rms_eps", "rms_norm_eps"),
    gguf.Keys.Rope.FREQ_BASE: ("rope_theta",),
}


def digest(entry: ModelEntry) -> str:
    """sha256 of the manifest: changes whenever the model is re-converted."""
    return hashlib.sha256((entry.path / manifest_mod.MANIFEST_NAME).read_bytes()).hexdigest()


def parameter_size(entry: ModelEntry) -> str:
    """Like ollama's "134.52M"; "" when packed integer tensors hide the logical count."""
    count = parameter_count(entry)
    if count is None:
        return ""
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.2f}M"


def details(entry: ModelEntry) -> OllamaModelDetails:
    arch = entry.manifest.architecture
    return OllamaModelDetails(family=arch, families=[arch], parameter_size=parameter_size(entry),
                              quantization_level=entry.manifest.quant)


def modified_at(entry: ModelEntry) -> str:
    return unix_to_rfc3339(entry.modified) or ""


def context_length(entry: ModelEntry) -> int | None:
    config = entry.manifest.config
    for key in ("max_position_embeddings", "context_length", "max_context"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def parameter_count(entry: ModelEntry) -> int | None:
    """Logical weights of the model, or None when packed integer tensors hide it."""
    tensors = [t for extent in entry.manifest.extents for t in extent.tensors]
    if any(t.qtype in PACKED_INTEGER_TYPES for t in tensors):
        return None
    return sum(math.prod(t.shape) for t in tensors)


def file_type(quant: str) -> int | None:
    """GGUF's `general.file_type` (gguf-py's LlamaFileType) for a quant label such as Q4_K_M, F16, BF16."""
    for prefix in ("MOSTLY_", "ALL_"):
        member = getattr(gguf.LlamaFileType, prefix + quant.upper(), None)
        if member is not None:
            return int(member)
    return None


def model_info(entry: ModelEntry) -> dict:
    """/api/show's model_info, with GGUF's standard keys (`general.*`, `<arch>.block_count`, …) where the model's
    config holds the value, plus the plugin's own config under `gdsllm.config.*`."""
    manifest = entry.manifest
    arch, config = manifest.architecture, manifest.config
    info: dict = {gguf.Keys.General.ARCHITECTURE: arch, gguf.Keys.General.NAME: entry.name,
                  "general.quantization": manifest.quant}
    count = parameter_count(entry)
    if count is not None:
        info["general.parameter_count"] = count
    kind = file_type(manifest.quant or "")
    if kind is not None:
        info[gguf.Keys.General.FILE_TYPE] = kind
    for template, names in GGUF_CONFIG_KEYS.items():
        value = next((config[name] for name in names if isinstance(config.get(name), int | float)), None)
        if value is not None:
            info[template.format(arch=arch)] = value
    info.update({f"gdsllm.config.{key}": value for key, value in config.items()})
    return info


def capabilities(entry: ModelEntry) -> list[str]:
    """completion for every model; tools when its chat template reads `tools`; embedding (pooled hidden states)."""
    found = ["completion"]
    if "tools" in (entry.manifest.tokenizer.chat_template or ""):
        found.append("tools")
    return [*found, "embedding"]


def modelfile(entry: ModelEntry, defaults: ModelDefaults) -> str:
    """An ollama Modelfile that says the same: FROM, SYSTEM, one PARAMETER line per value, LICENSE."""
    lines = [f"# Modelfile generated by gdsllm for {entry.name}", f"FROM {entry.path}"]
    if defaults.system is not None:
        lines.append(f'SYSTEM """{defaults.system}"""')
    for name, value in defaults.parameters.items():
        for item in value if isinstance(value, list) else [value]:
            lines.append(f"PARAMETER {name} {msgspec.json.encode(item).decode() if isinstance(item, str) else item}")
    if defaults.license is not None:
        lines.append(f'LICENSE """{defaults.license}"""')
    return "\n".join(lines) + "\n"
