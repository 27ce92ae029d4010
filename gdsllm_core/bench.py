"""`gdsllm bench`: prompt processing (pp) and decode (tg) speed of a model, with the ceilings measured in the same
run (GPU memory bandwidth, storage read speed) and each figure as a fraction of its ceiling."""

import os
import time
from pathlib import Path

import torch

from gdsllm_core import registry
from gdsllm_core.engine.forward import LoadOptions
from gdsllm_core.errors import BackendUnavailableError
from gdsllm_core.layout.store import ModelEntry

GPU_COPY_BYTES = 1 << 30
STORAGE_PROBE_BYTES = 4 << 30


def gpu_bandwidth(device: torch.device, nbytes: int = GPU_COPY_BYTES, reps: int = 20) -> float:
    """GB/s of a device-to-device copy, bytes read plus bytes written (median of `reps`)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        dst.copy_(src)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / sorted(times)[reps // 2] / 1e9


def storage_ceiling(entry: ModelEntry, device: torch.device, drop_caches: bool = True) -> dict:
    """Read the model's largest weight file (up to 4 GiB) with the posix backend (O_DIRECT, 8 threads, 16 MiB
    pieces) into GPU memory; caches dropped first when allowed (root), else reported as "warm"."""
    from gdsllm_core.storage.backends import drop_page_cache
    from gdsllm_core.storage.posix import PosixBackend

    largest = max(entry.manifest.files, key=lambda name: os.stat(entry.path / name).st_size)
    path = Path(entry.path) / largest
    nbytes = min(os.stat(path).st_size, STORAGE_PROBE_BYTES)
    how = "warm (page cache not dropped)"
    if drop_caches:
        how = drop_page_cache(path, everything=os.geteuid() == 0)
    backend = PosixBackend()
    dest = torch.empty(nbytes, dtype=torch.uint8, device=device)
    handle = backend.open(path)
    try:
        from concurrent.futures import ThreadPoolExecutor

        chunk = 16 << 20
        with ThreadPoolExecutor(max_workers=8) as pool:
            began = time.perf_counter()
            jobs = [pool.submit(backend.read_into, handle, start, min(chunk, nbytes - start), dest, start)
                    for start in range(0, nbytes, chunk)]
            for job in jobs:
                job.result()
            torch.cuda.synchronize(device)
            seconds = time.perf_counter() - began
    finally:
        backend.close(handle)
    del dest
    torch.cuda.empty_cache()
    return {"gbps": nbytes / seconds / 1e9, "bytes": nbytes, "file": str(path), "caches": how,
            "o_direct": not backend.notes, "notes": backend.notes}


def weight_bytes_per_token(entry: ModelEntry) -> int:
    """Bytes a decode step reads: every extent but the embeddings (of which one row is read)."""
    return sum(e.nbytes for e in entry.manifest.extents if e.name != "token_embd")


def run_bench(entry: ModelEntry, options: LoadOptions, pp: int = 512, tg: int = 128, ceilings: bool = True,
              drop_caches: bool = True, seed: int = 0) -> dict:
    """Load `entry` with `options`, time a pp-token prefill and tg decode steps (greedy on the GPU), and measure
    the ceilings in the same run. Returns a flat dict (the `--json` output)."""
    device = torch.device(options.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise BackendUnavailableError("gdsllm bench measures GPU throughput and needs a CUDA device",
                                      "run it on a machine with an NVIDIA GPU (--device cuda)")
    result: dict = {"model": entry.name, "pp": pp, "tg": tg, "device": torch.cuda.get_device_name(device)}
    if ceilings:
        result["gpu_bandwidth_gbps"] = gpu_bandwidth(device)
        result["storage"] = storage_ceiling(entry, device, drop_caches)
    elif drop_caches and os.geteuid() == 0:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    torch.cuda.reset_peak_memory_stats(device)
    began = time.perf_counter()
    forward = registry.get_forward_pass(entry.manifest.architecture)(entry, options)
    result["load_s"] = time.perf_counter() - began
    try:
        generator = torch.Generator().manual_seed(seed)
        prompt = torch.randint(0, forward.vocab_size, (pp,), generator=generator).to(device)
        warm = forward.new_cache(pp + 2)  # a full-size run first: kernels compiled, cuBLAS and SDPA warmed up
        forward.decode(forward.prefill(prompt, warm).argmax().reshape(1), [warm])
        del warm
        cache = forward.new_cache(pp + tg + 2)
        torch.cuda.synchronize(device)
        before = dict(forward.stats())
        began = time.perf_counter()
        logits = forward.prefill(prompt, cache)
        torch.cuda.synchronize(device)
        result["pp_s"] = time.perf_counter() - began
        after_pp = dict(forward.stats())
        token = logits.argmax().reshape(1)
        token = forward.decode(token, [cache])[0].argmax().reshape(1)  # untimed: captures the graph if any
        torch.cuda.synchronize(device)
        before_tg = dict(forward.stats())
        began = time.perf_counter()
        for _ in range(tg):
            token = forward.decode(token, [cache])[0].argmax().reshape(1)
        torch.cuda.synchronize(device)
        result["tg_s"] = time.perf_counter() - began
        after = dict(forward.stats())
    finally:
        forward.close()
    result["vram_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    result["pp_tok_s"] = pp / result["pp_s"]
    result["tg_tok_s"] = tg / result["tg_s"]
    result["placement"] = {"layers": after.get("layers"), "tiers_bytes": after.get("tiers"),
                           "backend": after.get("backend"), "cuda_graphs": after.get("cuda_graphs"),
                           "repacked_bytes": after.get("repacked_bytes", 0),
                           "fast_gemv": options.extra.get("fast_gemv", False)}
    for phase, start, stop, tokens in (("pp", before, after_pp, 1), ("tg", before_tg, after, tg)):
        streamed = sum(stop.get(k, 0) - start.get(k, 0) for k in ("bytes_from_host", "bytes_from_storage"))
        storage = stop.get("bytes_from_storage", 0) - start.get("bytes_from_storage", 0)
        seconds = result[f"{phase}_s"]
        result[f"{phase}_streamed_gbps"] = streamed / seconds / 1e9
        result[f"{phase}_storage_bytes_per_token"] = storage / tokens
        result[f"{phase}_host_bytes_per_token"] = (streamed - storage) / tokens
        result[f"{phase}_io_wait_s"] = (stop.get("io_wait_ns", 0) - start.get("io_wait_ns", 0)) / 1e9
    per_token = weight_bytes_per_token(entry)
    result["weight_bytes_per_token"] = per_token
    result["tg_effective_gbps"] = per_token * result["tg_tok_s"] / 1e9
    if ceilings:
        result["tg_fraction_of_gpu_bandwidth"] = result["tg_effective_gbps"] / result["gpu_bandwidth_gbps"]
        storage_bytes = result["tg_storage_bytes_per_token"]
        if storage_bytes:
            floor = storage_bytes / (result["storage"]["gbps"] * 1e9)
            result["tg_storage_floor_s_per_token"] = floor
            result["tg_s_per_token_over_floor"] = (result["tg_s"] / tg) / floor
    return result


def format_report(result: dict) -> list[tuple[str, str]]:
    """(figure, value) rows for the console."""
    rows = [("model", result["model"]), ("device", result["device"]),
            ("placement", str(result["placement"]["layers"]) + f" via {result['placement']['backend']}"),
            (f"pp{result['pp']}", f"{result['pp_tok_s']:,.1f} tok/s"),
            (f"tg{result['tg']}", f"{result['tg_tok_s']:,.2f} tok/s ({result['tg_s'] / result['tg'] * 1e3:.2f} ms/token)"),
            ("weights read per token", f"{result['weight_bytes_per_token'] / 1e9:.2f} GB")]
    if "gpu_bandwidth_gbps" in result:
        rows.append(("GPU memory bandwidth (copy, same run)", f"{result['gpu_bandwidth_gbps']:,.0f} GB/s"))
        rows.append(("decode effective bandwidth", f"{result['tg_effective_gbps']:,.0f} GB/s = "
                     f"{result['tg_fraction_of_gpu_bandwidth']:.1%} of the GPU ceiling"))
        storage = result["storage"]
        rows.append(("storage ceiling (O_DIRECT, same run)", f"{storage['gbps']:.2f} GB/s, {storage['caches']}"))
    for phase in ("pp", "tg"):
        if result[f"{phase}_streamed_gbps"]:
            rows.append((f"{phase} streamed", f"{result[f'{phase}_streamed_gbps']:.2f} GB/s "
                         f"(host {result[f'{phase}_host_bytes_per_token'] / 1e9:.2f} GB, storage "
                         f"{result[f'{phase}_storage_bytes_per_token'] / 1e9:.2f} GB per token; I/O wait "
                         f"{result[f'{phase}_io_wait_s']:.2f} s)"))
    if "tg_s_per_token_over_floor" in result:
        rows.append(("decode s/token vs storage floor", f"{result['tg_s'] / result['tg']:.3f} s vs "
                     f"{result['tg_storage_floor_s_per_token']:.3f} s = {result['tg_s_per_token_over_floor']:.2f}x"))
    rows.append(("VRAM peak (torch allocator)", f"{result['vram_peak_bytes'] / 2**30:.2f} GiB"))
    return rows
