"""`python -m gdsllm_qwen_moe.bench`: expert streaming on a synthetic model with the 397B's layer shapes.

1. ceilings: `--ceiling-gb` of expert extents read cold (page cache dropped) in one batched call: consecutive ones
   by the storage layer's default reader (8 threads, 16 MiB pieces) and by the forward's own expert reader (the
   faster is the ceiling), and as many experts drawn at random (the pattern decode reads: the random-read ceiling);
2. cold decode: page cache dropped before each step, both cache tiers off: seconds per layer against bytes read
   per layer / ceiling (the I/O-bound lower bound; also against the random-read ceiling), the time spent waiting
   on reads, and the compute-only time of the same step re-run with every expert resident in VRAM;
   `--read-configs` adds reader settings (threads x piece MiB) and `--prefetch-limits` read-ahead limits, each
   a forward of its own, their steps interleaved round by round (the order rotated each round). The disk's speed
   drifts within seconds (1.2-2.1 GB/s on the H100 machine), so a ceiling probe is read between consecutive steps
   (`--paired-gb` of consecutive experts, cold, by the default reader and by the forward's reader, the faster
   counting) and each step is compared with the probes either side: `paired_ratio_to_io_bound`. `reads_only`:
   the default forward's experts of each step read again layer by layer with no compute (what the disk gives
   decode's pattern);
3. Zipf trace: routing drawn from a Zipf law per layer through the host tier alone (`--budget-gb`) and through
   the VRAM tier (`--vram-budget-gb`) in front of it: hit rates per tier and bytes read per token, against the
   cold bytes per token x (1 - hit rate).
Step 2's "cold" run has the forward's defaults (`prefetch`: next-layer read-ahead on or off, and its limit; each
step's `prefetch` counts its experts read ahead, hits, waste and bytes); `cold_prefetch_N` has read-ahead of at most
N experts (0: off; `prefetch_N_speedup`: the default run's seconds / this run's), `cold_TxM` a reader setting. On
this synthetic model the routers are random, so its hit rate says little about a real checkpoint: the timings show
what overlap buys."""

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import torch

from gdsllm_core.api import ExtentReader, LoadOptions, ModelStore, drop_page_cache
from gdsllm_qwen_moe.experts import expert_extent, expert_residency
from gdsllm_qwen_moe.forward import QwenMoeForward
from gdsllm_qwen_moe.synthetic import qwen35_397b_shapes, write_synthetic


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def storage_ceiling(forward: QwenMoeForward, weights: Path, gigabytes: float, default: ExtentReader,
                    seed: int = 0) -> dict:
    """GB/s of `gigabytes` of expert extents read cold in one batched call. Sequential: consecutive extents, by
    `default` (a reader with the storage layer's settings, same backend) and by the forward's own; the faster is
    the ceiling. Random: as many experts
    drawn at random over all layers (the pattern decode reads), sorted by offset, by the forward's reader, in one
    batch (the queue full throughout): what the disk gives that pattern with no compute between reads."""
    extents = [e for e in forward.entry.manifest.extents if ".expert." in e.name]
    consecutive = last_experts(forward, gigabytes)
    count = len(consecutive)
    generator = torch.Generator().manual_seed(seed)
    scattered = [extents[i] for i in sorted(torch.randperm(len(extents), generator=generator)[:count].tolist())]
    pin = forward.device.type == "cuda"
    size = max(e.nbytes for e in consecutive + scattered)
    buffers = [torch.empty(size, dtype=torch.uint8, pin_memory=pin) for _ in range(count)]
    rates = {}
    for label, reader, chosen in (("default_reader", default, consecutive), ("expert_reader", forward.reader, consecutive),
                                  ("random_experts", forward.reader, scattered)):
        rates[label] = sum(e.nbytes for e in chosen) / _cold_read_seconds(reader, weights, [chosen], buffers) / 1e9
    return {"gb": sum(e.nbytes for e in consecutive) / 1e9, **rates,
            "ceiling_gb_s": max(rates["default_reader"], rates["expert_reader"]),
            "random_ceiling_gb_s": rates["random_experts"]}


def _cold_read_seconds(reader: ExtentReader, weights: Path, groups: list[list], buffers: list[torch.Tensor]) -> float:
    """Seconds `reader` takes to read each group of extents in turn (one batch each, into `buffers` in order, reused
    by every group), the page cache dropped first."""
    drop_page_cache(weights)
    began = time.perf_counter()
    for group in groups:
        reader.read(group, [buffer[:e.nbytes] for buffer, e in zip(buffers, group, strict=False)])
    return time.perf_counter() - began


def last_experts(forward: QwenMoeForward, gigabytes: float) -> list:
    """The last expert extents of the file, in order, at least `gigabytes` of them (or all): far from anything
    read at load time."""
    extents = [e for e in forward.entry.manifest.extents if ".expert." in e.name]
    count, total = 0, 0
    while count < len(extents) and total < gigabytes * 1e9:
        count += 1
        total += extents[-count].nbytes
    return extents[len(extents) - count:]


def paired_ceiling(forward: QwenMoeForward, weights: Path, gigabytes: float,
                   readers: list[ExtentReader]) -> Callable[[], float]:
    """A probe of the sequential ceiling at the moment it is called: GB/s of `gigabytes` of consecutive expert
    extents (the last layers') read cold in one batch by each of `readers` in turn, into buffers allocated once;
    the fastest counts."""
    chosen = last_experts(forward, gigabytes)
    total = sum(e.nbytes for e in chosen)
    buffers = [torch.empty(e.nbytes, dtype=torch.uint8, pin_memory=forward.device.type == "cuda") for e in chosen]

    def probe() -> float:
        return max(total / _cold_read_seconds(reader, weights, [chosen], buffers) / 1e9 for reader in readers)
    return probe


WARMUP_STEPS = 2  # untimed decode steps per forward first: buffer pools filled, decode graphs captured


def cold_decode(forwards: dict[str, QwenMoeForward], weights: Path, steps: int,
                ceiling_now: Callable[[], float] | None = None) -> dict[str, dict]:
    """Decode `steps` tokens with each of `forwards` (label -> forward of the same model), interleaved: each round
    runs one step per forward, in an order rotated every round, so that the disk's drift falls on all of them alike.
    Before each step the page cache is dropped and both tiers emptied (after WARMUP_STEPS untimed steps per forward,
    as any earlier tokens would have); each step is then re-run with its experts in VRAM (its compute alone).
    With `ceiling_now`, a ceiling probe sits between consecutive steps (each step's `ceiling_gb_s_around` holds the
    probes either side), and after each step of the first forward its experts are read again by that forward's
    reader, layer by layer, with no compute between the layers' reads (label "reads_only": what the disk gives
    decode's pattern, which a forward can beat only by reading ahead)."""
    first = next(iter(forwards.values()))
    layers = first.config.num_hidden_layers
    expert_bytes = first.entry.manifest.extent("blk.0.expert.0").nbytes
    runs: dict[str, dict] = {label: {"steps": []} for label in forwards}
    state = {}
    for label, forward in forwards.items():
        cache = forward.new_cache(steps + WARMUP_STEPS + 1)
        forward.prefill(torch.tensor([1]), cache)
        token = 2
        for _ in range(WARMUP_STEPS):
            drop_page_cache(weights)
            token = int(forward.decode(torch.tensor([token]), [cache])[0].argmax()) % forward.vocab_size
            forward.experts.clear()
        state[label] = (cache, token)
    if ceiling_now is not None:
        runs["reads_only"] = {"steps": []}
    labels = list(forwards)
    last = ceiling_now() if ceiling_now is not None else None
    for step in range(steps):
        shift = step % len(labels)
        for label in labels[shift:] + labels[:shift]:
            forward = forwards[label]
            cache, token = state[label]
            row, logits = _cold_step(forward, weights, cache, token, layers, expert_bytes)
            state[label] = (cache, int(logits[0].argmax()) % forward.vocab_size)
            items = [(label, row)]
            if ceiling_now is not None and forward is first:
                items.append(("reads_only", _reads_only(forward, weights, layers, expert_bytes)))
            for item_label, item in items:
                if ceiling_now is not None:
                    now = ceiling_now()
                    item["ceiling_gb_s_around"] = [last, now]
                    last = now
                runs[item_label]["steps"].append(item)
    return runs


def _cold_step(forward: QwenMoeForward, weights: Path, cache, token: int, layers: int, expert_bytes: int):
    """One timed cold decode step (`cache` advanced) and its compute-only re-run: (row, logits)."""
    stats = forward.experts.counters
    before = copy.deepcopy(cache)
    drop_page_cache(weights)
    read_before, misses_before = stats.bytes_read, stats.misses
    wait_before = stats.read_ns + stats.prefetch_wait_ns
    ahead_before = msgspec.structs.asdict(forward.experts.stats().prefetch)
    _sync(forward.device)
    began = time.perf_counter()
    logits = forward.decode(torch.tensor([token]), [cache])
    _sync(forward.device)
    cold = time.perf_counter() - began
    read = stats.bytes_read - read_before
    requested = (stats.misses - misses_before) * expert_bytes  # routed to; all misses when cold
    waited = stats.read_ns + stats.prefetch_wait_ns - wait_before
    ahead = {k: v - ahead_before[k] for k, v in msgspec.structs.asdict(forward.experts.stats().prefetch).items()}
    forward.experts.vram.budget_bytes = 1 << 40  # warm re-run: same routing, every expert now in VRAM
    forward.decode(torch.tensor([token]), [copy.deepcopy(before)])  # fills the cache
    _sync(forward.device)
    began = time.perf_counter()
    forward.decode(torch.tensor([token]), [before])
    _sync(forward.device)
    warm = time.perf_counter() - began
    forward.experts.clear()
    forward.experts.vram.budget_bytes = 0
    return {"cold_s_per_layer": cold / layers, "bytes_per_layer": read / layers,
            "requested_bytes_per_layer": requested / layers, "read_wait_s_per_layer": waited / 1e9 / layers,
            "compute_s_per_layer": warm / layers, "prefetch": ahead}, logits


def _reads_only(forward: QwenMoeForward, weights: Path, layers: int, expert_bytes: int) -> dict:
    """The experts of `forward`'s last step read cold by its reader, one layer's batch after the other."""
    manifest = forward.entry.manifest
    groups = [[manifest.extent(expert_extent(layer, e)) for e in read.ids]
              for layer, read in sorted(forward.experts.counters.last_read_by_layer.items())]
    buffers = [torch.empty(expert_bytes, dtype=torch.uint8, pin_memory=forward.device.type == "cuda")
               for _ in range(max(len(group) for group in groups))]
    elapsed = _cold_read_seconds(forward.reader, weights, groups, buffers)
    nbytes = sum(e.nbytes for group in groups for e in group)
    return {"cold_s_per_layer": elapsed / layers, "bytes_per_layer": nbytes / layers,
            "requested_bytes_per_layer": nbytes / layers}


def profile_step(forward: QwenMoeForward, weights: Path) -> dict:
    """One decode step under torch.profiler, cold (both tiers empty, page cache dropped) and warm (every expert
    in VRAM), with the same routing: wall time, GPU busy time, and the ops taking most host and GPU time (the
    CUDA runtime calls among them show host syncs and copies)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if forward.device.type == "cuda" else [])
    cache = forward.new_cache(4)
    forward.prefill(torch.tensor([1]), cache)
    forward.experts.clear()
    forward.experts.vram.budget_bytes = 0
    report = {}
    for label in ("cold", "warm"):
        if label == "cold":
            drop_page_cache(weights)
        else:
            forward.experts.vram.budget_bytes = 1 << 40
            forward.decode(torch.tensor([2]), [copy.deepcopy(cache)])  # fills the VRAM tier
        step = copy.deepcopy(cache)
        _sync(forward.device)
        with profile(activities=activities) as prof:
            began = time.perf_counter()
            forward.decode(torch.tensor([2]), [step])
            _sync(forward.device)
            wall = time.perf_counter() - began
        events = list(prof.key_averages())
        report[label] = {"wall_ms": wall * 1e3, "gpu_busy_ms": sum(_gpu_us(e) for e in events) / 1e3,
                         "top_host_ms": _top(events, lambda e: e.self_cpu_time_total),
                         "top_gpu_ms": _top(events, _gpu_us)}
    forward.experts.clear()
    forward.experts.vram.budget_bytes = 0
    return report


def _gpu_us(event) -> float:
    return getattr(event, "self_device_time_total", 0) or getattr(event, "self_cuda_time_total", 0)


def _top(events: list, key) -> list:
    """(op, calls, ms) of the 14 events highest by `key` (microseconds)."""
    return [(e.key[:60], e.count, round(key(e) / 1e3, 3)) for e in sorted(events, key=key, reverse=True)[:14]]


def zipf_trace(forward: QwenMoeForward, tokens: int, budget_bytes: int, exponent: float, seed: int,
               vram_budget_bytes: int = 0) -> dict:
    """Requests drawn per layer from a Zipf law over the experts (each layer its own popularity order), served
    by the tiers (experts handed to the forward's device as the forward pass gets them)."""
    config = forward.config
    generator = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, config.num_experts + 1, dtype=torch.float64)
    weights = ranks.pow(-exponent)
    orders = [torch.randperm(config.num_experts, generator=generator) for _ in range(config.num_hidden_layers)]
    cache = expert_residency(forward.reader, forward.entry.manifest, budget_bytes, forward.device, vram_budget_bytes)
    began = time.perf_counter()
    for _ in range(tokens):
        for layer in range(config.num_hidden_layers):
            picks = torch.multinomial(weights, config.num_experts_per_tok, replacement=False, generator=generator)
            cache.get(layer, orders[layer][picks].tolist())
    _sync(forward.device)
    elapsed = time.perf_counter() - began
    expert_bytes = forward.entry.manifest.extent("blk.0.expert.0").nbytes
    stats = cache.stats()
    cache.close()
    cold_per_token = config.num_hidden_layers * config.num_experts_per_tok * expert_bytes
    return {"tokens": tokens, "host_budget_bytes": budget_bytes, "vram_budget_bytes": vram_budget_bytes,
            "exponent": exponent, "hit_rate": stats.hit_rate, "vram_hit_rate": stats.vram.hit_rate,
            "host_hit_rate": stats.host.hit_rate, "bytes_read_per_token": stats.storage.bytes_read / tokens,
            "cold_bytes_per_token": cold_per_token,
            "cold_bytes_per_token_x_miss_rate": cold_per_token * (1 - stats.hit_rate),
            "seconds_per_token": elapsed / tokens, "read_seconds_per_token": stats.storage.read_ns / 1e9 / tokens}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="model store folder for the synthetic model")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--ceiling-gb", type=float, default=2.0)
    parser.add_argument("--paired-gb", type=float, default=0.5,
                        help="ceiling probe read before and after each cold step (0: no probes)")
    parser.add_argument("--zipf-tokens", type=int, default=64)
    parser.add_argument("--zipf-exponent", type=float, default=1.1)
    parser.add_argument("--budget-gb", type=float, default=4.0, help="host tier of the Zipf trace")
    parser.add_argument("--vram-budget-gb", type=float, default=0.0,
                        help="VRAM tier of a second Zipf trace (0: that trace is skipped)")
    parser.add_argument("--read-configs", default="",
                        help="extra reader settings for the cold decode, e.g. '8x16,32x1' (threads x piece MiB)")
    parser.add_argument("--profile", action="store_true", help="also profile one cold and one warm decode step")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a self-test of this script)")
    parser.add_argument("--prefetch-limits", default="",
                        help="also run the cold decode with read-ahead of at most N experts per layer, for each N "
                             "of e.g. '0,2' (0: read-ahead off)")
    args = parser.parse_args(argv)

    store, name = ModelStore(args.root), f"synthetic-397b-{args.layers}l" + ("-tiny" if args.tiny else "")
    if store.exists(name):
        entry = store.get(name)
    else:
        config = qwen35_397b_shapes(args.layers)
        if args.tiny:
            config = tiny_shapes(args.layers)
        began = time.perf_counter()
        entry = write_synthetic(args.root, name, config, group_size=64 if args.tiny else 128)
        print(f"wrote {entry.path} ({entry.size_bytes / 1e9:.2f} GB) in {time.perf_counter() - began:.1f} s",
              file=sys.stderr)
    weights = entry.path / entry.manifest.extents[0].file

    def load(**extra) -> QwenMoeForward:
        return QwenMoeForward(entry, LoadOptions(device=args.device, host_cache=0,
                                                 extra={"dtype": args.dtype, "expert_vram_bytes": 0, **extra}))

    forward = load()
    default_reader = ExtentReader(entry.path, entry.manifest, backend=forward.reader.backend)
    result = {"device": str(forward.device), "dtype": args.dtype, "backend": forward.reader.backend.name,
              "backend_reason": getattr(forward.reader.backend, "reason", ""),
              "expert_reader": {"threads": forward.reader.threads, "piece_bytes": forward.reader.chunk_bytes},
              "expert_bytes": entry.manifest.extent("blk.0.expert.0").nbytes,
              "ceiling": storage_ceiling(forward, weights, args.ceiling_gb, default_reader)}
    result["ceiling_gb_s"] = result["ceiling"]["ceiling_gb_s"]
    result["random_ceiling_gb_s"] = result["ceiling"]["random_ceiling_gb_s"]
    probe = (paired_ceiling(forward, weights, args.paired_gb, [default_reader, forward.reader])
             if args.paired_gb > 0 else None)
    others = {f"cold_prefetch_{limit}": load(expert_prefetch=limit > 0,
                                             **({"expert_prefetch_limit": limit} if limit else {}))
              for limit in (int(n) for n in args.prefetch_limits.split(",") if n)}
    for setting in filter(None, args.read_configs.split(",")):
        threads, piece_mib = setting.split("x")
        others[f"cold_{setting}"] = load(expert_read_threads=int(threads),
                                         expert_read_chunk=int(float(piece_mib) * (1 << 20)))
    runs = cold_decode({"cold": forward, **others}, weights, args.steps, probe)
    for other in others.values():
        other.close()
    result["prefetch"] = {"enabled": forward.prefetch, "limit": forward.prefetch_limit}
    for label in others:
        if label.startswith("cold_prefetch_"):
            result[f"prefetch_{label.rsplit('_', 1)[1]}_speedup"] = (
                sum(r["cold_s_per_layer"] for r in runs["cold"]["steps"])
                / sum(r["cold_s_per_layer"] for r in runs[label]["steps"]))
    for label, run in runs.items():
        for row in run["steps"]:
            row["io_bound_s_per_layer"] = row["bytes_per_layer"] / (result["ceiling_gb_s"] * 1e9)
            row["ratio_to_io_bound"] = row["cold_s_per_layer"] / row["io_bound_s_per_layer"]
            row["ratio_to_random_io_bound"] = row["cold_s_per_layer"] * result["random_ceiling_gb_s"] * 1e9 / row[
                "bytes_per_layer"]
            if "ceiling_gb_s_around" in row:  # against the mean of the probes either side of the step
                around = sum(row["ceiling_gb_s_around"]) / len(row["ceiling_gb_s_around"])
                row["paired_ratio_to_io_bound"] = row["cold_s_per_layer"] * around * 1e9 / row["bytes_per_layer"]
                # read-ahead's waste left out of the floor: the bytes the routing asked for
                row["paired_ratio_to_requested"] = (row["cold_s_per_layer"] * around * 1e9
                                                    / row["requested_bytes_per_layer"])
        keys = ["ratio_to_io_bound", "ratio_to_random_io_bound"]
        if all("paired_ratio_to_io_bound" in r for r in run["steps"]):
            keys += ["paired_ratio_to_io_bound", "paired_ratio_to_requested"]
        for key in keys:
            run[f"mean_{key}"] = sum(r[key] for r in run["steps"]) / len(run["steps"])
        result[label] = run
    if args.profile:
        try:
            result["profile"] = profile_step(forward, weights)
        except Exception as exc:  # a profiler that cannot start on this machine costs the run nothing else
            result["profile"] = {"error": repr(exc)}
    result["zipf"] = zipf_trace(forward, args.zipf_tokens, int(args.budget_gb * 1e9), args.zipf_exponent, seed=0)
    if args.vram_budget_gb > 0:
        result["zipf_two_tiers"] = zipf_trace(forward, args.zipf_tokens, int(args.budget_gb * 1e9),
                                              args.zipf_exponent, seed=0,
                                              vram_budget_bytes=int(args.vram_budget_gb * 1e9))
    default_reader.close()
    forward.close()
    print(json.dumps(result, indent=1))
    return result


def tiny_shapes(n_layers: int):
    """Small shapes with the same structure, for testing this script on a CPU."""
    config = qwen35_397b_shapes(n_layers)
    for field, value in dict(vocab_size=256, hidden_size=64, num_attention_heads=4, head_dim=32,
                             linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                             linear_num_value_heads=4, moe_intermediate_size=64, shared_expert_intermediate_size=64,
                             num_experts=16, num_experts_per_tok=4).items():
        setattr(config, field, value)
    return config


if __name__ == "__main__":
    main()
