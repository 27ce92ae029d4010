"""Bandwidth of the fused dequant + GEMV kernels on LLaMA-7B-shaped matrices, beside the GPU's copy bandwidth
measured in the same run. Weights rotate over enough copies to defeat the L2 cache.
usage: python benchmarks/gemv_bw.py [--types Q4_0,Q8_0,...] [--batch 1,4] [--fast]"""

import argparse

import torch

from gdsllm_kernels import ops


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """GB/s of a device-to-device copy, bytes read plus written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / time_ms(lambda: dst.copy_(src)) / 1e6


def time_ms(fn, reps: int = 50) -> float:
    for _ in range(3):
        fn()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return sorted(times)[len(times) // 2]


def time_gemv(weights: list[torch.Tensor], qtype: str, batch: int, cols: int, fast: bool = False,
              tensor_cores: bool = False) -> float:
    """Milliseconds per launch, from a CUDA graph of one launch per weight copy (no host launch gaps)."""
    x = torch.randn(batch, cols, device="cuda").half()
    out = torch.empty(batch, weights[0].shape[0], device="cuda")
    for w in weights:
        ops.gemv([w], qtype, x, [out], fast=fast, tensor_cores=tensor_cores)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            ops.gemv([w], qtype, x, [out], fast=fast, tensor_cores=tensor_cores)
    return time_ms(graph.replay, reps=20) / len(weights)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--types", default="Q4_0,Q4_0R,Q8_0,Q8_0R,Q4_1,Q4_K,Q5_K,Q6_K,F16")
    parser.add_argument("--batch", default="1,4,8")
    parser.add_argument("--fast", action="store_true", help="fp16 partial sums where the kernel has them")
    args = parser.parse_args()
    ceiling = copy_bandwidth()
    print(f"device copy bandwidth: {ceiling:.0f} GB/s")
    print(f"{'type':9} {'rows x cols':>13} {'B':>2} {'us':>8} {'GB/s':>7} {'of copy':>8}")
    for qtype in args.types.split(","):
        for rows, cols in ((4096, 4096), (11008, 4096), (4096, 11008)):
            nbytes = rows * ops.row_bytes(qtype, cols)
            copies = max(4, (512 << 20) // nbytes)
            dtype = ops.PLAIN.get(qtype, torch.uint8)
            width = ops.row_bytes(qtype, cols) // torch.empty(0, dtype=dtype).element_size()
            weights = [torch.randint(0, 255, (rows, width), dtype=torch.uint8, device="cuda").view(dtype)
                       if dtype == torch.uint8 else torch.randn(rows, width, device="cuda").to(dtype)
                       for _ in range(copies)]
            if dtype == torch.uint8:  # sane fp16 scales: random bytes can be inf/nan
                for w in weights:
                    w.view(-1)[:] = w.view(-1) & 0x3B
            if qtype in ops.REPACKED.values():  # the GPU layout of resident weights
                base = next(k for k, v in ops.REPACKED.items() if v == qtype)
                scratch = torch.empty(weights[0].numel(), dtype=torch.uint8, device="cuda")
                for w in weights:
                    ops.repack(w, base, cols, scratch)
            for batch in (int(b) for b in args.batch.split(",")):
                for mma in (False, True) if qtype in ops.MMA_TYPES else (False,):
                    ms = time_gemv(weights, qtype, batch, cols, args.fast, mma)
                    gbs = nbytes / ms / 1e6
                    print(f"{qtype + ('/mma' if mma else ''):9} {rows:>6}x{cols:<6} {batch:>2} {ms * 1e3:8.1f} "
                          f"{gbs:7.0f} {gbs / ceiling:8.1%}")
    # launch overhead: an eager launch of a tiny kernel from Python
    x = torch.randn(1, 4096, device="cuda")
    w = torch.ones(4096, device="cuda")
    out = torch.empty(1, 4096, dtype=torch.float16, device="cuda")
    torch.cuda.synchronize()
    import time
    began = time.perf_counter()
    for _ in range(2000):
        ops.rmsnorm(x, w, 1e-5, out=out)
    torch.cuda.synchronize()
    print(f"eager launch (rmsnorm, host side): {(time.perf_counter() - began) / 2000 * 1e6:.1f} us")


if __name__ == "__main__":
    main()
