"""The CPU-layer planner: which host-tier layers the CPU should compute while the copy stream carries the others,
by simulating a decode step of the GPU residency's ring (`simulate_step_seconds`). Pure arithmetic: no GPU."""

import collections
import math

from gdsllm_core.runtime.residency import RING_SLOTS


def simulate_step_seconds(tiers: list[str], copy_s: float, cpu_s: float, gpu_s: float, slots: int = RING_SLOTS,
                          dma_wait_s: float = 0.0, tokens: int = 4) -> float:
    """Seconds of one decode step (the last of `tokens`, the ring in its steady state) of layers whose tiers are
    "vram" (resident), "ring" (copied through the ring, `copy_s` each) or "cpu" (computed on the CPU, `cpu_s` each,
    h's round trip included), modelled as `GpuTieredResidency` and the forward pass run them: a fetch keeps
    `slots` copies requested, a copy starts once the copy stream is free, the host has asked for it and its slot's
    previous layer is done (a slot is released at the next fetch); the GPU computes a layer (`gpu_s`) once its
    copy is in; the CPU computes a layer once the GPU has finished everything before it, and the GPU goes on after.
    A CPU layer longer than the copies queued before it leaves the copy stream idle: the ring's depth counts.

    `dma_wait_s`: when h goes to the host by a DMA copy, it waits for the host-to-device copy operation in
    progress (seen on the H100 machine), i.e. up to the next boundary of `dma_wait_s` (the duration of one copy
    operation: `copy_s` for whole-layer copies, less when the ring copies in chunks); 0 when h moves without
    the copy engines."""
    order = [i for i, tier in enumerate(tiers) if tier == "ring"]
    host = gpu = copy = 0.0
    copies: list[tuple[float, float]] = []  # (start, end) of each ring copy
    inflight: collections.deque = collections.deque()  # ready times of requested copies, in order
    slot_free = [0.0] * max(slots, 1)
    in_use, issued, step = None, 0, 0.0
    for _ in range(tokens):
        began = host
        for tier in tiers:
            if tier == "vram":
                gpu = max(gpu, host) + gpu_s
            elif tier == "cpu":
                start = max(host, gpu)
                if dma_wait_s > 0:
                    for began_copy, ended in copies:
                        if began_copy <= start < ended:  # h's copy waits for the operation in progress
                            start = min(ended, began_copy + math.ceil((start - began_copy) / dma_wait_s) * dma_wait_s)
                host = start + cpu_s
                gpu = host
            else:
                if in_use is not None:
                    slot_free[in_use] = max(gpu, host)
                while len(inflight) < slots and order:
                    slot = issued % slots
                    begin = max(copy, slot_free[slot], host)
                    copy = begin + copy_s
                    copies.append((begin, copy))
                    inflight.append((slot, copy))
                    issued += 1
                in_use, ready = inflight.popleft()
                gpu = max(gpu, host, ready) + gpu_s
        host = max(host, gpu)
        step = host - began
    return step


def simulate_cpu_plan(tiers: list[str], on_cpu, copy_s: float, cpu_s: float, gpu_s: float, slots: int,
                      dma_wait_s: float = 0.0) -> float:
    """`simulate_step_seconds` with the layers whose indices are in `on_cpu` computed on the CPU."""
    marked = set(on_cpu)
    return simulate_step_seconds(["cpu" if i in marked else tier for i, tier in enumerate(tiers)], copy_s, cpu_s,
                                 gpu_s, slots, dma_wait_s)


def spread(names: list, n: int) -> list:
    """`n` of `names`, evenly spaced (the middle of n equal runs: every other one for half), so that streamed
    layers sit between CPU layers and the copy stream has work while the CPU computes."""
    k, n = len(names), min(n, len(names))
    return [names[(2 * j + 1) * k // (2 * n)] for j in range(n)] if n > 0 else []


def plan_cpu_layers(tiers: list[str], candidates: list[int], copy_s: float, cpu_s: float, gpu_s: float,
                    slots: int = RING_SLOTS, limit: int | None = None, margin: float = 0.03,
                    dma_wait_s: float = 0.0) -> list[int]:
    """Which of `candidates` (indices of "ring" layers in `tiers`) the CPU should compute: for each count up to
    `limit`, that many candidates evenly spread; the set whose simulated step (`simulate_cpu_plan`) is
    shortest, if it beats streaming them all by more than `margin` (else none)."""
    def seconds(chosen: list[int]) -> float:
        return simulate_cpu_plan(tiers, chosen, copy_s, cpu_s, gpu_s, slots, dma_wait_s)

    streamed = seconds([])
    best, best_s = [], streamed
    for n in range(1, min(len(candidates), len(candidates) if limit is None else limit) + 1):
        chosen = spread(candidates, n)
        step = seconds(chosen)
        if step < best_s:
            best, best_s = chosen, step
    return best if best_s < streamed * (1 - margin) else []
