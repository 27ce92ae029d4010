"""The written contracts where the runtime meets a plugin: the decoder model a plugin implements, and the residency
a plugin may replace.

    plugin                          core runtime
    ------                          ------------
    DecoderModel (math)   <-----    DecoderDriver (GPU) / ReferenceDriver (CPU): workspace, sequence table,
                                    prefill chunks, batch groups, CUDA graphs, CPU-computed host-tier layers
                                    |
                                    Residency: which tier each extent lives in (VRAM, pinned host RAM, storage),
                                    the ring that streams the rest, statistics

A plugin registers its model with `register_decoder_models` (architecture -> "module:Class"); core wraps it in a
driver that is the architecture's `ForwardPass`. The layout declares each extent's role (`ExtentRole`: a decoder
layer with its index, an MoE expert, the embeddings, the head); the driver fetches layer `i` as the extent whose
role is LAYER and index is `i`, and the model names the extents of its embeddings and head itself.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import msgspec
import torch

from gdsllm_core.layout.manifest import ExtentInfo, Manifest
from gdsllm_core.runtime.kv import CpuKvCache, GpuKvCache, KvSpec
from gdsllm_core.runtime.stats import ResidencyStats, RuntimeStats
from gdsllm_core.runtime.workspace import ExtentWeights, Workspace


class DecoderConfig(Protocol):
    """The sizes the driver needs from a model's config (a plugin's config dataclass has more)."""

    n_layers: int
    dim: int
    vocab_size: int
    context_length: int


@dataclass
class CpuStep:
    """One step of CPU layers: rows grouped by sequence (`counts[s]` consecutive rows belong to `caches[s]`, placed
    after the `caches[s].length` positions it holds) at `positions` [N]. `memo` keeps per-step values a model
    derives once for all its layers (RoPE tables: `rope`)."""

    caches: list[CpuKvCache]
    counts: list[int]
    positions: torch.Tensor
    memo: dict = field(default_factory=dict)

    def rope(self, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of this step's positions for `inv_freq`, computed once per step."""
        from gdsllm_core.runtime.blocks import rope_tables

        key = ("rope", id(inv_freq))
        if key not in self.memo:
            self.memo[key] = rope_tables(inv_freq, self.positions)
        return self.memo[key]


@runtime_checkable
class DecoderModel(Protocol):
    """A decoder-only architecture's math; core's driver runs it. Built once per loaded model:
    `Model(manifest, options)` with `options` an instance of the class's `Options` (a `RuntimeOptions` subclass,
    so that an option the architecture does not take is refused by name).

    Weights arrive as `ExtentWeights` (the tensors of one extent, where the model computes from them); the layer
    math comes in two flavours: GPU (kernels from `gdsllm_kernels`, or a plugin's own `.cu` files) and CPU (plain
    torch, fp32: the reference the GPU path is tested against, and what computes host-tier layers on the CPU).

    GPU decode: `decode_layer_gpu` must be capturable in a CUDA graph: it reads and writes only the workspace
    (`ws.h`, `ws.slots`, `ws.buffers`), the weights it is given and tensors the model allocated in `setup_gpu`, with
    no host synchronisation and no allocation that changes from step to step."""

    Options: ClassVar[type]  # a msgspec Struct subclassing RuntimeOptions
    config: DecoderConfig

    # -- shapes --------------------------------------------------------------------------------------------------

    def kv_spec(self) -> KvSpec:
        """The KV cache one sequence needs (layers, KV heads, head size)."""

    def embedding_extents(self) -> list[str]:
        """Extents `embed_*` reads (e.g. ["token_embd"])."""

    def head_extents(self) -> list[str]:
        """Extents `final_norm_*` and `head_*` read, in order (e.g. ["output_norm", "output"])."""

    # -- GPU ------------------------------------------------------------------------------------------------------

    def check_gpu(self, manifest: Manifest) -> None:
        """Raise UnsupportedQuantError for a tensor the GPU math has no kernel for."""

    def decode_buffers(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The model's own decode buffers per row: name -> (shape without the row dimension, dtype)."""

    def scratch_elements(self) -> int:
        """fp16 elements of the dequant scratch (the largest matrix prefill dequantizes at once)."""

    def prefill_bytes_per_token(self) -> int:
        """VRAM of one prompt token's prefill activations (the driver reserves a chunk's worth)."""

    def setup_gpu(self, ws: Workspace) -> None:
        """Allocate the model's constant device tensors (RoPE frequencies, attention scratch) once."""

    def embed_gpu(self, ws: Workspace, weights: dict[str, ExtentWeights], tokens: torch.Tensor,
                  out: torch.Tensor) -> None:
        """Rows of the embeddings for `tokens` [N] into `out` [N, dim] fp32."""

    def decode_layer_gpu(self, ws: Workspace, layer: int, w: ExtentWeights, batch: int) -> None:
        """Layer `layer` of a decode step for `batch` rows: `ws.h[:batch]` updated in place."""

    def prefill_layer_gpu(self, ws: Workspace, layer: int, w: ExtentWeights, h: torch.Tensor, cache: GpuKvCache,
                          start: int) -> None:
        """Layer `layer` over a prompt chunk h [T, dim] fp32 (in place) of one sequence whose cache holds `start`
        positions; `ws.slots[:1]` describes it."""

    def final_norm_gpu(self, ws: Workspace, weights: dict[str, ExtentWeights], h: torch.Tensor) -> torch.Tensor:
        """Hidden states after the final norm [N, dim] (fp16), from the residual stream h [N, dim] fp32."""

    def head_gpu(self, ws: Workspace, weights: dict[str, ExtentWeights], hidden: torch.Tensor,
                 out: torch.Tensor) -> None:
        """Logits [N, vocab] fp32 into `out` from `final_norm_gpu`'s hidden states."""

    # -- CPU (the reference) --------------------------------------------------------------------------------------

    def prepare_cpu(self, extent: ExtentInfo, views: dict[str, torch.Tensor]) -> Any:
        """A decoder layer's weights in the form `layer_cpu` takes (fp32, dequantized), from its raw views."""

    def embed_cpu(self, weights: dict[str, ExtentWeights], tokens: torch.Tensor) -> torch.Tensor:
        """fp32 rows [N, dim] of the embeddings for `tokens` [N]."""

    def layer_cpu(self, kv_layer: int, weights: Any, x: torch.Tensor, step: CpuStep) -> torch.Tensor:
        """One decoder layer over x [N, dim] fp32 on the CPU, its keys/values at `kv_layer` of `step.caches`;
        returns the new residual stream. Also runs layers packed by `pack_cpu`."""

    def final_norm_cpu(self, weights: dict[str, ExtentWeights], x: torch.Tensor) -> torch.Tensor:
        """Hidden states after the final norm [N, dim] fp32."""

    def head_cpu(self, weights: dict[str, ExtentWeights], hidden: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] fp32."""

    # -- CPU-computed host-tier layers (optional: return None where the model cannot) ---------------------------

    def packed_nbytes(self, extent: ExtentInfo) -> int | None:
        """Host bytes of a layer packed for fast CPU decode, or None if this layer cannot be (its types)."""

    def pack_cpu(self, extent: ExtentInfo, views: dict[str, torch.Tensor]) -> Any:
        """A host-tier layer packed for `layer_cpu` (e.g. int4 for torch's CPU kernel), from its pinned views."""


@runtime_checkable
class Residency(Protocol):
    """Where each extent lives and when it moves. `fetch` returns an extent's tensors on the compute device, ready
    for work enqueued on the current stream; the driver walks extents in a fixed cyclic order (embeddings, layers,
    head; token after token) and a streaming residency reads ahead in that order."""

    def fetch(self, extent_name: str) -> dict[str, torch.Tensor]: ...

    def prefetch(self, extent_names: list[str]) -> None:
        """A hint that these extents are needed next."""

    def tier(self, extent_name: str) -> str:
        """"vram" (resident on the compute device), "host" (pinned host RAM) or "storage"."""

    def stats(self) -> ResidencyStats: ...

    def close(self) -> None: ...


@runtime_checkable
class HostOffload(Residency, Protocol):
    """A GPU residency whose host-tier layers the CPU may compute (see `runtime.cpu_offload`)."""

    cpu_request: str | int  # "auto", a layer count, or 0 (off)
    ring_slots: int
    copy_chunk_bytes: int

    def cpu_candidates(self, eligible: Callable[[ExtentInfo], bool]) -> list[str]: ...

    def layer_tiers(self) -> list[str]: ...

    def host_view(self, extent_name: str) -> dict[str, torch.Tensor]: ...

    def host_room(self) -> int: ...

    def copy_seconds(self, extent_name: str, reps: int = 5) -> float: ...

    def recent_copy_gbps(self) -> float | None: ...

    def place_on_cpu(self, names: list[str], nbytes: int) -> None: ...

    def set_cpu_active(self, names: frozenset[str]) -> None: ...

    def record_cpu_layer(self, nanoseconds: int) -> None:
        """Count one layer pass computed on the CPU (the residency owns its counters)."""


ResidencyFactory = Callable[..., Residency]  # (manifest, model path, placement: Placement, reader) -> Residency


class RuntimeOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Load options every runtime-driven architecture takes; a plugin subclasses it to add its own. Given as the
    `LoadOptions.extra` dict, converted (and refused by name where unknown) when the model loads."""

    residency: str = "tiered"  # the registered residency that places extents
    max_vram_layers: int | None = None  # cap on resident decoder layers (like llama.cpp's -ngl)
    ring_slots: int | None = None  # streaming buffers (default: runtime.residency.RING_SLOTS, deeper with CPU layers)
    cpu_layers: int | str = 0  # host-tier layers the CPU computes: "auto", a count, or 0 (off)
    cuda_graphs: bool = True
    repack: bool = True  # rewrite resident Q4_0/Q8_0 matrices into the GPU kernels' layout once
    prefill_chunk: int = 512  # prompt tokens per pass through the layers (each streamed layer moves once a chunk)
    dequant_cache_bytes: int | None = None  # CPU reference: fp32 layer weights kept between tokens (None: all)


class DecoderForward(Protocol):
    """The `ForwardPass` core's drivers give a `DecoderModel` (engine-facing: prefill, decode, new_cache, stats,
    close), plus what embeddings and inspection need."""

    vocab_size: int
    max_context: int
    device: torch.device

    def new_cache(self, max_tokens: int) -> Any: ...

    def prefill(self, tokens: torch.Tensor, cache: Any, all_logits: bool = False) -> torch.Tensor: ...

    def decode(self, tokens: torch.Tensor, caches: list[Any]) -> torch.Tensor: ...

    def hidden_states(self, tokens: torch.Tensor, cache: Any) -> torch.Tensor:
        """Prefill `tokens` [T] after what `cache` holds and return their hidden states after the final norm,
        [T, dim] fp32, before the head (for embeddings)."""

    def runtime_stats(self) -> RuntimeStats: ...

    def stats(self) -> dict:
        """`runtime_stats().as_dict()`."""

    def close(self) -> None: ...
