"""What the listing routes say about a converted model (ollama's details block, digest, parameter size)."""

import hashlib
import math

from gdsllm_core.layout import manifest as manifest_mod
from gdsllm_core.layout.store import ModelEntry
from gdsllm_core.server.schemas import OllamaModelDetails
from gdsllm_core.server.streams import unix_to_rfc3339

PACKED_INTEGER_TYPES = {"U8", "I8", "I32", "U32"}


def digest(entry: ModelEntry) -> str:
    """sha256 of the manifest: changes whenever the model is re-converted."""
    return hashlib.sha256((entry.path / manifest_mod.MANIFEST_NAME).read_bytes()).hexdigest()


def parameter_size(entry: ModelEntry) -> str:
    """Like ollama's "134.52M"; "" when packed integer tensors hide the logical count."""
    tensors = [t for extent in entry.manifest.extents for t in extent.tensors]
    if any(t.qtype in PACKED_INTEGER_TYPES for t in tensors):
        return ""
    count = sum(math.prod(t.shape) for t in tensors)
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
