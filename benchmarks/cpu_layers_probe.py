"""Figures behind CPU-computed layers, on the GPU machine: the PCIe ceiling (pinned host -> GPU copy); torch's CPU
int4 kernel over LLaMA-7B FFN matrices for 1..16 rows, alone and while PCIe copies run (both read host RAM); and
with `--model NAME --vram-layers N`, decode ms/token for each count of CPU-computed layers, then auto's choice.
One JSON object per line on stdout."""

import argparse
import json
import statistics
import time

import torch


def pcie_gbps(nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Pinned host -> GPU copy GB/s (median of `reps`, CUDA events)."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(reps + 1):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return nbytes / sorted(times[1:])[reps // 2] / 1e9


def packed_matrices(count: int, n: int = 11008, k: int = 4096) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` random int4 matrices [n, k] for the CPU kernel (about 28 MB each, with bf16 scales and zeros)."""
    mats = []
    for _ in range(count):
        codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
        mats.append((torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1), torch.rand(k // 32, n, 2).bfloat16()))
    return mats


def int4_pass(mats, x: torch.Tensor) -> float:
    """Seconds to multiply x by every matrix once (a working set larger than the caches, like a layer's)."""
    began = time.perf_counter()
    for packed, scales in mats:
        torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, scales)
    return time.perf_counter() - began


def kernel_figures() -> None:
    """The CPU int4 kernel over 6 FFN-sized matrices (~170 MB, a layer and a half) for 1..16 rows, alone; then one
    row while pinned->GPU copies run (queued from this thread: nothing spins), and those copies' GB/s."""
    mats = packed_matrices(6)
    nbytes = sum(p.numel() + s.numel() * 2 for p, s in mats)
    alone = {}
    for rows in (1, 2, 4, 8, 16):
        x = torch.randn(rows, 4096).bfloat16()
        int4_pass(mats, x)
        alone[rows] = statistics.median(int4_pass(mats, x) for _ in range(5))
    print(json.dumps({"int4_pass_ms": {r: s * 1e3 for r, s in alone.items()},
                      "int4_gbps": {r: nbytes / s / 1e9 for r, s in alone.items()},
                      "threads": torch.get_num_threads()}))
    src = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    events = []
    with torch.cuda.stream(stream):
        for _ in range(10):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            dst.copy_(src, non_blocking=True)
            stop.record(stream)
            events.append((start, stop))
    x = torch.randn(1, 4096).bfloat16()
    busy = []
    while not events[-2][1].query():
        busy.append(int4_pass(mats, x))
    stream.synchronize()
    gbps = [(1 << 30) / (a.elapsed_time(b) / 1e3) / 1e9 for a, b in events]
    print(json.dumps({"int4_pass_ms_1row_during_copies": statistics.median(busy) * 1e3, "passes": len(busy),
                      "copy_gbps_during_cpu_work": statistics.median(gbps[1:-2]), "copy_gbps_after": gbps[-1]}))


def sweep(model: str, vram_layers: int, counts: tuple[int, ...] = (0, 4, 6, 8, 10, 12, 14, 16)) -> None:
    """One load with 16 layers placed on the CPU; decode with each fixed count of them computed there, then with
    auto planning (decoding-time figures). ms per token at batch 1 after a 64-token prompt."""
    from gdsllm_core import plugins, registry
    from gdsllm_core.engine.forward import LoadOptions
    from gdsllm_core.layout.store import ModelStore

    plugins.load_plugins()
    entry = ModelStore().get(model)
    began = time.perf_counter()
    forward = registry.get_forward_pass(entry.manifest.architecture)(
        entry, LoadOptions(device="cuda", max_context=512, extra={"max_vram_layers": vram_layers, "cpu_layers": 16}))
    try:
        cpu = forward.cpu_layers
        print(json.dumps({"load_s": time.perf_counter() - began, "placed": cpu.order,
                          "seconds_per_layer_alone": cpu.seconds, "copy_s": cpu.copy_s}))
        cache = forward.new_cache(512)
        token = forward.prefill(torch.randint(3, 30000, (64,)).cuda(), cache).argmax().reshape(1)

        def steps(n: int) -> float:
            nonlocal token
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                token = forward.decode(token, [cache]).argmax(-1)
            torch.cuda.synchronize()
            return (time.perf_counter() - t0) / n * 1e3

        for count in counts:
            cpu.fixed_count = count
            cpu.seconds_in_use.clear()
            steps(2)
            ms = steps(10)
            print(json.dumps({"cpu_layers": count, "ms_per_token": ms, "tok_s": 1e3 / ms,
                              "cpu_s_decoding": cpu.seconds_in_use.get(1),
                              "copy_gbps_decoding": forward.scheduler.recent_copy_gbps()}))
        cpu.fixed_count = None
        cpu.seconds_in_use.clear()
        cpu._plans.clear()
        steps(12)
        ms = steps(20)
        print(json.dumps({"auto_ms_per_token": ms, "tok_s": 1e3 / ms, "stats": cpu.stats()}, default=str))
    finally:
        forward.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--vram-layers", type=int, default=8)
    parser.add_argument("--no-model", action="store_true", help="only the PCIe ceiling")
    args = parser.parse_args()
    print(json.dumps({"pcie_h2d_gbps": pcie_gbps()}))
    if args.no_model:
        return
    if args.model:
        sweep(args.model, args.vram_layers)
    else:
        kernel_figures()


if __name__ == "__main__":
    main()
