"""`gdsllm bench`: prompt processing (pp) and decode (tg) speed of a model, with the ceilings measured in the same
run (GPU or host memory bandwidth, storage read speed) and each figure as a fraction of its ceiling.

Decode is measured as llama-bench's tgN: from an empty context (a one-token prompt), so the two compare on the
same file. Batched decode (`batches`, e.g. (1, 8, 16)): for each batch size N, N sequences are prefilled one after
another (N different random prompts of `pp` tokens; prompt i is the same for every N, and prompt 0 is the batch-1
prompt: the pp figure), then N fresh sequences of one token each decode `tg` greedy steps all at once, one
`forward.decode(tokens[N], caches)` per step. Aggregate tok/s is
N x tg / time; bytes moved per step (from the forward's `stats()`: host->GPU copies, storage reads, expert reads)
are reported so one can check they do not grow with N."""

import os
import time
from pathlib import Path

import torch

from gdsllm_core import registry
from gdsllm_core.engine.forward import LoadOptions
from gdsllm_core.errors import BackendUnavailableError, BadRequestError
from gdsllm_core.layout.store import ModelEntry

GPU_COPY_BYTES = 1 << 30
HOST_COPY_BYTES = 256 << 20
STORAGE_PROBE_BYTES = {"cuda": 4 << 30, "cpu": 1 << 30}  # host RAM is shared with the rest of the machine


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def host_bandwidth(nbytes: int = HOST_COPY_BYTES, reps: int = 7) -> float:
    """GB/s of a host-memory copy by torch (`torch.get_num_threads()` threads), bytes read plus bytes written
    (median of `reps`): the ceiling of a CPU decode, which streams its weights from RAM."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        began = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - began)
    return 2 * nbytes / sorted(times)[reps // 2] / 1e9


def storage_ceiling(entry: ModelEntry, device: torch.device, drop_caches: bool = True) -> dict:
    """Read the model's largest weight file (up to 4 GiB; 1 GiB on the CPU) with 8 threads in 16 MiB pieces: on a
    GPU with the posix backend (O_DIRECT) into GPU memory, on the CPU with the cpu backend (pread, through the page
    cache) into host memory. Caches dropped first when allowed (root: all; else this file's pages), else "warm"."""
    from gdsllm_core.storage.backends import drop_page_cache
    from gdsllm_core.storage.reader import CpuBackend

    largest = max(entry.manifest.files, key=lambda name: os.stat(entry.path / name).st_size)
    path = Path(entry.path) / largest
    nbytes = min(os.stat(path).st_size, STORAGE_PROBE_BYTES["cuda" if device.type == "cuda" else "cpu"])
    how = "warm (page cache not dropped)"
    if drop_caches:
        how = drop_page_cache(path, everything=os.geteuid() == 0)
    if device.type == "cuda":
        from gdsllm_core.storage.posix import PosixBackend

        backend = PosixBackend()
    else:
        backend = CpuBackend("bench: pread into host memory")
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
            _sync(device)
            seconds = time.perf_counter() - began
    finally:
        backend.close(handle)
    del dest
    if device.type == "cuda":
        torch.cuda.empty_cache()
    notes = getattr(backend, "notes", [])
    return {"gbps": nbytes / seconds / 1e9, "bytes": nbytes, "file": str(path), "caches": how,
            "backend": backend.name, "o_direct": device.type == "cuda" and not notes, "notes": notes}


def weight_bytes_per_token(entry: ModelEntry) -> int:
    """Bytes a decode step reads: every extent but the embeddings (of which one row is read)."""
    return sum(e.nbytes for e in entry.manifest.extents if e.name != "token_embd")


def _weight_bytes_per_step(entry: ModelEntry, run: dict, tg: int) -> float:
    """Weight bytes one decode step of `run` reads, whatever the batch: every extent but the embeddings; for an MoE
    the dense part plus the experts the step used (the union over the batch: cache hits and misses)."""
    experts = [e.nbytes for e in entry.manifest.extents if ".expert." in e.name]
    if not experts or "tg_expert_cache" not in run:
        return weight_bytes_per_token(entry)
    dense = sum(e.nbytes for e in entry.manifest.extents if e.name != "token_embd" and ".expert." not in e.name)
    used = run["tg_expert_cache"]["hits"] + run["tg_expert_cache"]["misses"]
    return dense + used / tg * sum(experts) / len(experts)


def prompt_tokens(vocab_size: int, pp: int, n: int, seed: int = 0) -> list[torch.Tensor]:
    """The bench's `n` prompts: random token ids [pp] each, drawn one after another from one seeded generator
    (so prompt i does not depend on n)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (pp,), generator=generator) for _ in range(n)]


def moved_bytes(stats: dict) -> tuple[int, int]:
    """(from pinned host RAM, from storage) bytes the forward has moved so far: the GPU scheduler's ring copies and
    reads, plus experts read from storage (MoE). Resident weights move nothing."""
    expert_reads = stats.get("expert_cache", {}).get("storage", {}).get("bytes_read", 0)
    return stats.get("bytes_from_host", 0), stats.get("bytes_from_storage", 0) + expert_reads


def _expert_delta(before: dict, after: dict) -> dict | None:
    """Expert-cache figures between two `stats()` snapshots (None when the model has no expert cache)."""
    if "expert_cache" not in after:
        return None
    start, stop = before["expert_cache"], after["expert_cache"]
    hits = stop["host"]["hits"] - start["host"]["hits"]
    misses = stop["host"]["misses"] - start["host"]["misses"]
    delta = {"hits": hits, "misses": misses, "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
             "bytes_read": stop["storage"]["bytes_read"] - start["storage"]["bytes_read"]}
    if "prefetch" in stop:  # next-layer read-ahead (its bytes are part of bytes_read)
        delta["prefetch"] = {k: stop["prefetch"][k] - start["prefetch"][k]
                             for k in ("prefetched", "hits", "waste", "bytes_read", "sync_misses")}
    return delta


def bench_batch(forward, prompts: list[torch.Tensor], tg: int) -> dict:
    """Prefill one cache per prompt (timed: pp). Then decode as llama-bench's tgN does, from an empty context: a
    fresh cache per sequence holding one token (its prompt's first), one untimed step (kernels for this batch size,
    CUDA graph capture), then `tg` timed greedy steps of all sequences at once. Returns timings, `stats()`
    snapshots and the tokens."""
    device = forward.device
    n, pp = len(prompts), prompts[0].numel()
    caches = [forward.new_cache(pp + 1) for _ in range(n)]
    prompts = [prompt.to(device) for prompt in prompts]
    _sync(device)
    before = dict(forward.stats())
    began = time.perf_counter()
    for prompt, cache in zip(prompts, caches, strict=True):
        forward.prefill(prompt, cache)
    _sync(device)
    pp_s = time.perf_counter() - began
    after_pp = dict(forward.stats())
    del caches
    caches = [forward.new_cache(tg + 3) for _ in range(n)]
    logits = [forward.prefill(prompt[:1], cache) for prompt, cache in zip(prompts, caches, strict=True)]
    token = torch.stack([row.argmax() for row in logits])  # [N]
    generated = [token]
    token = forward.decode(token, caches).argmax(-1)
    generated.append(token)
    _sync(device)
    before_tg = dict(forward.stats())
    began = time.perf_counter()
    for _ in range(tg):
        token = forward.decode(token, caches).argmax(-1)
        generated.append(token)
    _sync(device)
    tg_s = time.perf_counter() - began
    after = dict(forward.stats())
    tokens = torch.stack(generated, dim=1).tolist()  # [N, tg + 2]
    return {"batch": n, "pp_s": pp_s, "tg_s": tg_s, "tokens": tokens, "decoded_tokens": n * tg,
            "prefilled_tokens": n * pp, "stats": (before, after_pp, before_tg, after)}


def _batch_figures(run: dict, tg: int) -> dict:
    """The figures of one `bench_batch` run (its snapshots left out)."""
    n = run["batch"]
    before, after_pp, before_tg, after = run["stats"]
    figures = {k: run[k] for k in ("batch", "pp_s", "tg_s", "prefilled_tokens", "decoded_tokens", "tokens")}
    figures["pp_tok_s"] = run["prefilled_tokens"] / run["pp_s"]
    figures["tg_tok_s"] = run["decoded_tokens"] / run["tg_s"]  # aggregate over the batch
    figures["tg_tok_s_per_sequence"] = tg / run["tg_s"]
    host_0, storage_0 = moved_bytes(before_tg)
    host_1, storage_1 = moved_bytes(after)
    figures["tg_host_bytes_per_step"] = (host_1 - host_0) / tg
    figures["tg_storage_bytes_per_step"] = (storage_1 - storage_0) / tg
    figures["tg_moved_bytes_per_step"] = figures["tg_host_bytes_per_step"] + figures["tg_storage_bytes_per_step"]
    figures["tg_moved_bytes_per_token"] = figures["tg_moved_bytes_per_step"] / n
    figures["tg_io_wait_s"] = (after.get("io_wait_ns", 0) - before_tg.get("io_wait_ns", 0)) / 1e9
    experts = _expert_delta(before_tg, after)
    if experts is not None:
        figures["tg_expert_cache"] = {**experts, "bytes_read_per_step": experts["bytes_read"] / tg,
                                      "bytes_read_per_token": experts["bytes_read"] / (n * tg)}
        figures["pp_expert_cache"] = _expert_delta(before, after_pp)
    return figures


def _phase_figures(run: dict, tg: int) -> dict:
    """The top-level pp/tg streaming figures of one run (the first batch size); at batch 1 a decode token is a
    step, at batch N the tg bytes are divided by N x tg tokens."""
    before, after_pp, before_tg, after = run["stats"]
    result = {}
    for phase, start, stop, tokens in (("pp", before, after_pp, 1), ("tg", before_tg, after, tg * run["batch"])):
        host_0, storage_0 = moved_bytes(start)
        host_1, storage_1 = moved_bytes(stop)
        streamed, storage = host_1 + storage_1 - host_0 - storage_0, storage_1 - storage_0
        result[f"{phase}_streamed_gbps"] = streamed / run[f"{phase}_s"] / 1e9
        result[f"{phase}_storage_bytes_per_token"] = storage / tokens
        result[f"{phase}_host_bytes_per_token"] = (streamed - storage) / tokens
        result[f"{phase}_io_wait_s"] = (stop.get("io_wait_ns", 0) - start.get("io_wait_ns", 0)) / 1e9
    return result


def run_bench(entry: ModelEntry, options: LoadOptions, pp: int = 512, tg: int = 128, ceilings: bool = True,
              drop_caches: bool = True, seed: int = 0, batches: tuple[int, ...] = (1,)) -> dict:
    """Load `entry` with `options`, measure the ceilings, then `bench_forward`. Returns a flat dict (the `--json`
    output); the top-level pp/tg figures are those of the first batch size."""
    device = torch.device(options.device)
    if device.type not in ("cuda", "cpu"):
        raise BadRequestError(f"gdsllm bench runs on cuda or cpu, not {options.device!r}", "use --device cuda or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError("--device cuda but torch sees no CUDA device",
                                      "run it on a machine with an NVIDIA GPU, or pass --device cpu")
    result: dict = {"model": entry.name, "pp": pp, "tg": tg,
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()}
    if ceilings:
        if device.type == "cuda":
            result["gpu_bandwidth_gbps"] = gpu_bandwidth(device)
        else:
            result["host_bandwidth_gbps"] = host_bandwidth()
        result["storage"] = storage_ceiling(entry, device, drop_caches)
    elif drop_caches and os.geteuid() == 0:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    began = time.perf_counter()
    forward = registry.get_forward_pass(entry.manifest.architecture)(entry, options)
    result["load_s"] = time.perf_counter() - began
    try:
        result.update(bench_forward(forward, entry, pp, tg, batches, seed))
    finally:
        forward.close()
    if device.type == "cuda":
        result["vram_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    result["placement"]["fast_gemv"] = options.extra.get("fast_gemv", False)
    _ceiling_fractions(result)
    return result


def bench_forward(forward, entry: ModelEntry, pp: int, tg: int, batches: tuple[int, ...] = (1,),
                  seed: int = 0) -> dict:
    """Time a loaded forward pass: one untimed full-size warm-up (kernels compiled, cuBLAS and SDPA warmed up, CPU
    weights dequantized), then `bench_batch` for each batch size. The forward is left open (its `stats()` hold
    the run's counters). Top-level pp/tg figures are those of the first batch size; `batches` has them all."""
    if not batches or any(n < 1 for n in batches):
        raise BadRequestError(f"batch sizes must be positive integers, got {list(batches)}", "e.g. --batch 1,8,16")
    device = forward.device
    prompts = prompt_tokens(forward.vocab_size, pp, max(batches), seed)
    warm = forward.new_cache(pp + 2)
    forward.decode(forward.prefill(prompts[0].to(device), warm).argmax().reshape(1), [warm])
    del warm
    raw = [bench_batch(forward, prompts[:n], tg) for n in batches]
    after = dict(forward.stats())
    runs = [_batch_figures(run, tg) for run in raw]
    single = next((run for run in runs if run["batch"] == 1), None)
    for run in runs:
        run["weight_bytes_per_step"] = _weight_bytes_per_step(entry, run, tg)
        run["tg_effective_gbps"] = run["weight_bytes_per_step"] * run["tg_tok_s_per_sequence"] / 1e9
        if single is not None:
            run["tg_speedup_vs_batch1"] = run["tg_tok_s"] / single["tg_tok_s"]
    first = runs[0]
    result = {"batch": first["batch"], "pp_s": first["pp_s"], "tg_s": first["tg_s"],
              "pp_tok_s": first["pp_tok_s"], "tg_tok_s": first["tg_tok_s"], **_phase_figures(raw[0], tg),
              "weight_bytes_per_token": first["weight_bytes_per_step"],  # per step: a token at batch 1
              "tg_effective_gbps": first["tg_effective_gbps"], "batches": runs}
    result["placement"] = {"layers": after.get("layers"), "tiers_bytes": after.get("tiers"),
                           "backend": after.get("backend"), "cuda_graphs": after.get("cuda_graphs"),
                           "repacked_bytes": after.get("repacked_bytes", 0)}
    if after.get("cpu_layers"):  # which layers the CPU may compute, its speed, and how many each step size took
        result["cpu_layers"] = after["cpu_layers"]
    if "dequantized_bytes" in after:
        result["dequantized_bytes"] = after["dequantized_bytes"]
    if "expert_cache" in after:
        result["expert_cache"] = after["expert_cache"]  # the forward's own counters over the whole run
        result["expert_bytes_read_per_token"] = after.get("expert_bytes_read_per_token")
    return result


def _ceiling_fractions(result: dict) -> None:
    """Each decode figure against the ceilings measured in the same run (added to `result`)."""
    for ceiling in ("gpu_bandwidth_gbps", "host_bandwidth_gbps"):
        if ceiling in result:
            result[f"tg_fraction_of_{ceiling.removesuffix('_gbps')}"] = result["tg_effective_gbps"] / result[ceiling]
    if "host_bandwidth_gbps" in result and "dequantized_bytes" in result:  # the CPU LLaMA path reads fp32 copies
        result["tg_fp32_gbps"] = result["dequantized_bytes"] * result["tg"] / result["tg_s"] / 1e9
        result["tg_fp32_fraction_of_host_bandwidth"] = result["tg_fp32_gbps"] / result["host_bandwidth_gbps"]
    if "storage" not in result:
        return
    gbps = result["storage"]["gbps"]
    for run in result["batches"]:
        if run["tg_storage_bytes_per_step"]:
            run["tg_storage_floor_s_per_step"] = run["tg_storage_bytes_per_step"] / (gbps * 1e9)
            run["tg_s_per_step_over_floor"] = (run["tg_s"] / result["tg"]) / run["tg_storage_floor_s_per_step"]
    first = result["batches"][0]
    if first["batch"] == 1 and "tg_storage_floor_s_per_step" in first:  # at batch 1 a step is a token
        result["tg_storage_floor_s_per_token"] = first["tg_storage_floor_s_per_step"]
        result["tg_s_per_token_over_floor"] = first["tg_s_per_step_over_floor"]


def _cpu_name() -> str:
    name = "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores, torch {torch.get_num_threads()} threads)"


def format_report(result: dict) -> list[tuple[str, str]]:
    """(figure, value) rows for the console."""
    placement = result["placement"]
    where = placement["layers"] if placement["layers"] is not None else {
        tier: _size(nbytes) for tier, nbytes in (placement["tiers_bytes"] or {}).items()}
    rows = [("model", result["model"]), ("device", result["device"]),
            ("placement", f"{where} via {placement['backend']}"),
            (f"pp{result['pp']}" + (f" x {result['batch']} sequences" if result["batch"] > 1 else ""),
             f"{result['pp_tok_s']:,.1f} tok/s"),
            (f"tg{result['tg']}" + (f" x {result['batch']} sequences" if result["batch"] > 1 else ""),
             f"{result['tg_tok_s']:,.2f} tok/s ({result['tg_s'] / result['tg'] * 1e3:.2f} ms/step)"),
            ("weights read per step", f"{_size(result['weight_bytes_per_token'])} (stored)")]
    if "dequantized_bytes" in result:
        rows.append(("CPU fp32 weights resident", f"{_size(result['dequantized_bytes'])} (what a CPU step "
                                                  "reads from RAM, beside the output head)"))
    if "gpu_bandwidth_gbps" in result:
        rows.append(("GPU memory bandwidth (copy, same run)", f"{result['gpu_bandwidth_gbps']:,.0f} GB/s"))
        rows.append(("decode effective bandwidth", f"{result['tg_effective_gbps']:,.0f} GB/s = "
                     f"{result['tg_fraction_of_gpu_bandwidth']:.1%} of the GPU ceiling"))
    if "host_bandwidth_gbps" in result:
        rows.append(("host memory bandwidth (torch copy, same run)", f"{result['host_bandwidth_gbps']:,.1f} GB/s"))
        rows.append(("decode effective bandwidth (stored bytes)", f"{result['tg_effective_gbps']:,.2f} GB/s = "
                     f"{result['tg_fraction_of_host_bandwidth']:.1%} of the host ceiling"))
        if "tg_fp32_gbps" in result:
            rows.append(("decode fp32 weight bandwidth", f"{result['tg_fp32_gbps']:,.2f} GB/s = "
                         f"{result['tg_fp32_fraction_of_host_bandwidth']:.1%} of the host ceiling (output head not "
                         "counted)"))
    if "storage" in result:
        storage = result["storage"]
        how = "O_DIRECT" if storage["o_direct"] else f"{storage['backend']} backend, buffered"
        rows.append((f"storage ceiling ({how}, same run)", f"{storage['gbps']:.2f} GB/s, {storage['caches']}"))
    for phase in ("pp", "tg"):
        if result[f"{phase}_streamed_gbps"]:
            rows.append((f"{phase} streamed", f"{result[f'{phase}_streamed_gbps']:.2f} GB/s "
                         f"(host {_size(result[f'{phase}_host_bytes_per_token'])}, storage "
                         f"{_size(result[f'{phase}_storage_bytes_per_token'])} per token; I/O wait "
                         f"{result[f'{phase}_io_wait_s']:.2f} s)"))
    if "tg_s_per_token_over_floor" in result:
        rows.append(("decode s/token vs storage floor", f"{result['tg_s'] / result['tg']:.3f} s vs "
                     f"{result['tg_storage_floor_s_per_token']:.3f} s = {result['tg_s_per_token_over_floor']:.2f}x"))
    if len(result["batches"]) > 1 or result["batch"] > 1:
        for run in result["batches"]:
            speedup = f", {run['tg_speedup_vs_batch1']:.2f}x batch 1" if "tg_speedup_vs_batch1" in run else ""
            rows.append((f"decode batch {run['batch']}",
                         f"{run['tg_tok_s']:,.2f} tok/s aggregate ({run['decoded_tokens']} tokens), "
                         f"{run['tg_tok_s_per_sequence']:,.2f} tok/s per sequence{speedup}; "
                         f"{_size(run['tg_moved_bytes_per_step'])} moved per step"))
    for run in result["batches"]:
        experts = run.get("tg_expert_cache")
        if experts is not None:
            rows.append((f"experts, decode batch {run['batch']}",
                         f"hits {experts['hits']}, misses {experts['misses']}, hit rate {experts['hit_rate']:.1%}, "
                         f"{_size(experts['bytes_read_per_token'])} read per token "
                         f"({_size(experts['bytes_read_per_step'])} per step)"))
            if experts.get("prefetch", {}).get("prefetched"):
                rows.append((f"expert read-ahead, decode batch {run['batch']}", _prefetch_text(experts["prefetch"])))
    if "expert_cache" in result:
        host, storage = result["expert_cache"]["host"], result["expert_cache"]["storage"]
        rows.append(("expert cache, whole run", f"hits {host['hits']}, misses {host['misses']}, hit rate "
                     f"{host['hit_rate']:.1%}, {storage['bytes_read']:,} bytes read in {storage['reads']} reads, "
                     f"{_size(host['cached_bytes'])} of {_size(host['budget_bytes'])} cached"))
        if result["expert_cache"].get("prefetch", {}).get("prefetched"):
            rows.append(("expert read-ahead, whole run", _prefetch_text(result["expert_cache"]["prefetch"])))
    if "vram_peak_bytes" in result:
        rows.append(("VRAM peak (torch allocator)", f"{result['vram_peak_bytes'] / 2**30:.2f} GiB"))
    return rows


def _prefetch_text(ahead: dict) -> str:
    """One line on next-layer expert read-ahead: what it read, what was used, what the misses still read."""
    return (f"{ahead['prefetched']} experts read ahead ({_size(ahead['bytes_read'])}): {ahead['hits']} used, "
            f"{ahead['waste']} wasted; {ahead['sync_misses']} misses read synchronously")


def _size(nbytes: float) -> str:
    """Decimal units, three significant figures: 0 B, 24.6 KB, 1.23 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes:.0f} B"
