"""Typed statistics of the runtime: what `bench`, `/api/ps` and `show` read, whatever the architecture.

Residency counters are written only by the residency that owns them (plugins report through its methods, e.g.
`record_cpu_layer`); a forward pass's `runtime_stats()` assembles one `RuntimeStats`, and `stats()` is its plain
dict (`as_dict`), the shape the engine and the server pass on."""

import msgspec

from gdsllm_core.runtime.experts import ExpertStats


class TierBytes(msgspec.Struct, kw_only=True):
    """Bytes of weights placed in each tier."""

    vram: int = 0  # resident in GPU memory (on the CPU device: host memory the model computes from)
    host: int = 0  # pinned host RAM, copied to the GPU at PCIe speed when needed
    storage: int = 0  # read from the weight files when needed


class ResidencyStats(msgspec.Struct, kw_only=True):
    """Where the extents live and what moving them has cost so far (counters only grow)."""

    backend: str  # the storage reader's backend (`gdsllm doctor` explains the choice)
    tiers: TierBytes
    layers: dict[str, int] = {}  # decoder layers per placement: "vram", "host", "storage", and "cpu" with CPU layers
    ring_slots: int = 0  # GPU buffers that streamed layers pass through
    ring_bytes: int = 0
    vram_budget: int = 0
    host_budget: int = 0
    cpu_bytes: int = 0  # host RAM of the CPU-packed copies of CPU-computed layers
    cpu_active_layers: int = 0  # layers the CPU computes in the current step
    fetches: int = 0
    bytes_read: int = 0  # from storage, loading included
    io_wait_ns: int = 0  # host time spent waiting for storage reads
    bytes_from_host: int = 0  # ring copies from pinned host RAM
    bytes_from_storage: int = 0  # ring reads from storage
    load_ns: int = 0
    cpu_layer_runs: int = 0  # layer passes computed on the CPU
    cpu_compute_ns: int = 0


class StepStats(msgspec.Struct, kw_only=True):
    """One call of `prefill` or `decode`: what it cost and what it moved."""

    tokens: int = 0  # tokens processed (prompt tokens, or sequences of a decode step)
    host_seconds: float = 0.0
    io_wait_s: float = 0.0
    bytes_from_host: int = 0
    bytes_from_storage: int = 0


class CpuLayerStats(msgspec.Struct, kw_only=True):
    """Host-tier layers the CPU may compute (see `runtime.cpu_offload`)."""

    layers: list[int]
    packed_bytes: int
    seconds_per_layer: dict[int, float]  # measured at load, per row count, the CPU alone
    seconds_per_layer_decoding: dict[int, float]  # measured while decoding
    copy_seconds_per_layer: float
    copy_gbps_decoding: float | None
    fixed_count: int | None  # a requested count; None for "auto"
    plans: dict[int, int]  # rows of a step -> layers the CPU computed


class RuntimeStats(msgspec.Struct, kw_only=True):
    """Everything a loaded model reports: its residency, its last step, its graphs and CPU layers."""

    residency: ResidencyStats
    last_step: StepStats = msgspec.field(default_factory=StepStats)
    cuda_graphs: bool = False
    cuda_graph_batches: list[int] = []  # batch sizes with a whole-step graph
    cuda_graph_layers: int = 0  # per-layer graphs kept
    cpu_layers: CpuLayerStats | None = None
    experts: ExpertStats | None = None
    repacked_bytes: int = 0
    dequantized_bytes: int = 0  # CPU reference: fp32 weights kept between tokens
    vram_allocated: int = 0

    def as_dict(self) -> dict:
        """The plain dict `ForwardPass.stats()` returns: the residency's fields at the top level (as `bench` and
        `/api/ps` print them), then the rest."""
        plain = msgspec.to_builtins(self)
        return {**plain.pop("residency"), **plain}
