"""The contract between the core's generation loop and a plugin's forward pass."""

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from gdsllm_core.layout.store import ModelEntry


@dataclass
class LoadOptions:
    """How to place a model: device ("cpu" or "cuda[:n]"), budgets in bytes (None = automatic)."""

    device: str = "cpu"
    vram_budget: int | None = None
    host_cache: int | None = None
    max_context: int | None = None
    extra: dict = field(default_factory=dict)


class ForwardPass(Protocol):
    """Built once per loaded model: `ForwardPass(entry, options)`.

    Token ids are int64 tensors on any device; logits come back as float32 on the model's device.
    Caches are opaque to the core: the plugin makes them; one cache holds one sequence."""

    vocab_size: int
    max_context: int
    device: torch.device

    def __init__(self, entry: ModelEntry, options: LoadOptions) -> None: ...

    def new_cache(self, max_tokens: int) -> Any:
        """A cache for one sequence of up to `max_tokens` tokens (KV, and recurrent state where the model has it)."""

    def prefill(self, tokens: torch.Tensor, cache: Any, all_logits: bool = False) -> torch.Tensor:
        """Run `tokens` [T] after what `cache` holds; logits [V] of the last position, or [T, V] with all_logits."""

    def decode(self, tokens: torch.Tensor, caches: list[Any]) -> torch.Tensor:
        """One step for B sequences: `tokens` [B], one cache each; returns logits [B, V]. Each streamed weight is
        read once for the whole batch."""

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final hidden states [T, D] of `tokens` [T] run from an empty context: after the last norm, before the
        output head (what embeddings pool), float32 on the model's device."""

    def reuse_cache(self, cache: Any, keep: int, max_tokens: int) -> Any | None:
        """Optional (the prefix cache): a cache holding the first `keep` tokens `cache` holds, with room for
        `max_tokens`, made from `cache` (which the caller gives up); None when the model cannot cut its state
        there (a recurrent state is only known at the end of what it has seen)."""

    def stats(self) -> dict:
        """Residency and I/O statistics (bytes per tier, hits, timings), for `bench`, `/api/ps` and `show`."""

    def close(self) -> None:
        """Release buffers, files and device memory."""
