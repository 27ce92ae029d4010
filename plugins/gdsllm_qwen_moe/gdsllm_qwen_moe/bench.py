"""`python -m gdsllm_qwen_moe.bench`: expert streaming on a synthetic model with the 397B's layer shapes.

1. ceiling: the same reader reading `--ceiling-gb` of expert extents cold (page cache dropped), GB/s;
2. cold decode: page cache dropped before each step, host cache off: seconds per layer against
   bytes read per layer / ceiling (the I/O-bound lower bound), and the compute-only time of the same step re-run
   with every expert cached;
3. Zipf trace: routing drawn from a Zipf law per layer through the host cache under `--budget-gb`: hit rate and
   bytes read per token, against the cold bytes per token x (1 - hit rate).
With `--prefetch`, step 2 is run again with next-layer expert read-ahead on (`cold_prefetch`: per step, the
read-ahead's experts, hits, waste and bytes; `prefetch_speedup`: cold seconds off / on). On this synthetic model the
routers are random, so its hit rate says little about a real checkpoint: the timings show what overlap buys."""

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from gdsllm_core.engine.forward import LoadOptions
from gdsllm_core.layout.store import ModelStore
from gdsllm_core.storage.backends import drop_page_cache
from gdsllm_qwen_moe.experts import ExpertCache
from gdsllm_qwen_moe.forward import QwenMoeForward
from gdsllm_qwen_moe.synthetic import qwen35_397b_shapes, write_synthetic


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def storage_ceiling(forward: QwenMoeForward, weights: Path, gigabytes: float) -> float:
    """GB/s of the model's own reader over consecutive expert extents, read cold in one batched call."""
    extents = [e for e in forward.entry.manifest.extents if ".expert." in e.name]
    chosen, total = [], 0
    for extent in reversed(extents):  # the last layers: far from anything read at load time
        if total >= gigabytes * 1e9:
            break
        chosen.append(extent)
        total += extent.nbytes
    buffers = [torch.empty(e.nbytes, dtype=torch.uint8, pin_memory=forward.device.type == "cuda") for e in chosen]
    drop_page_cache(weights)
    began = time.perf_counter()
    forward.reader.read(chosen, buffers)
    return total / (time.perf_counter() - began) / 1e9


def cold_decode(forward: QwenMoeForward, weights: Path, steps: int) -> dict:
    """Decode `steps` tokens, page cache dropped before each; then re-run each step with its experts cached."""
    layers = forward.config.num_hidden_layers
    cache = forward.new_cache(steps + 1)
    forward.prefill(torch.tensor([1]), cache)
    token, rows = 2, []
    for _ in range(steps):
        before = copy.deepcopy(cache)
        drop_page_cache(weights)
        read_before = forward.experts.stats.bytes_read
        ahead_before = forward.experts.as_dict()["prefetch"]
        _sync(forward.device)
        began = time.perf_counter()
        logits = forward.decode(torch.tensor([token]), [cache])
        _sync(forward.device)
        cold = time.perf_counter() - began
        read = forward.experts.stats.bytes_read - read_before
        ahead = {k: v - ahead_before[k] for k, v in forward.experts.as_dict()["prefetch"].items()}
        forward.experts.budget_bytes = 1 << 40  # warm re-run: same routing, every expert now kept
        forward.decode(torch.tensor([token]), [copy.deepcopy(before)])  # fills the cache
        _sync(forward.device)
        began = time.perf_counter()
        forward.decode(torch.tensor([token]), [before])
        _sync(forward.device)
        warm = time.perf_counter() - began
        forward.experts = ExpertCache(forward.reader, forward.entry.manifest, 0, forward.device)
        rows.append({"cold_s_per_layer": cold / layers, "bytes_per_layer": read / layers,
                     "compute_s_per_layer": warm / layers, "prefetch": ahead})
        token = int(logits[0].argmax()) % forward.vocab_size
    return {"steps": rows}


def zipf_trace(forward: QwenMoeForward, tokens: int, budget_bytes: int, exponent: float, seed: int) -> dict:
    """Requests drawn per layer from a Zipf law over the experts (each layer its own popularity order)."""
    config = forward.config
    generator = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, config.num_experts + 1, dtype=torch.float64)
    weights = ranks.pow(-exponent)
    orders = [torch.randperm(config.num_experts, generator=generator) for _ in range(config.num_hidden_layers)]
    cache = ExpertCache(forward.reader, forward.entry.manifest, budget_bytes, forward.device)
    began = time.perf_counter()
    for _ in range(tokens):
        for layer in range(config.num_hidden_layers):
            picks = torch.multinomial(weights, config.num_experts_per_tok, replacement=False, generator=generator)
            cache.get(layer, orders[layer][picks].tolist())
    elapsed = time.perf_counter() - began
    expert_bytes = forward.entry.manifest.extent("blk.0.expert.0").nbytes
    stats = cache.as_dict()
    cold_per_token = config.num_hidden_layers * config.num_experts_per_tok * expert_bytes
    return {"tokens": tokens, "budget_bytes": budget_bytes, "exponent": exponent,
            "hit_rate": stats["host"]["hit_rate"], "bytes_read_per_token": stats["storage"]["bytes_read"] / tokens,
            "cold_bytes_per_token": cold_per_token,
            "cold_bytes_per_token_x_miss_rate": cold_per_token * (1 - stats["host"]["hit_rate"]),
            "seconds_per_token": elapsed / tokens, "read_seconds_per_token": stats["storage"]["read_ns"] / 1e9 / tokens}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="model store folder for the synthetic model")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--ceiling-gb", type=float, default=2.0)
    parser.add_argument("--zipf-tokens", type=int, default=64)
    parser.add_argument("--zipf-exponent", type=float, default=1.1)
    parser.add_argument("--budget-gb", type=float, default=4.0)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a self-test of this script)")
    parser.add_argument("--prefetch", action="store_true",
                        help="also run the cold decode with next-layer expert read-ahead, to compare on/off")
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
        print(f"wrote {entry.path} ({entry.size_bytes / 1e9:.2f} GB) in {time.perf_counter() - began:.1f} s")
    weights = entry.path / entry.manifest.extents[0].file
    forward = QwenMoeForward(entry, LoadOptions(device=args.device, host_cache=0, extra={"dtype": args.dtype}))
    result = {"device": str(forward.device), "dtype": args.dtype, "backend": forward.reader.backend.name,
              "backend_reason": getattr(forward.reader.backend, "reason", ""),
              "expert_bytes": entry.manifest.extent("blk.0.expert.0").nbytes,
              "ceiling_gb_s": storage_ceiling(forward, weights, args.ceiling_gb)}
    result["cold"] = cold_decode(forward, weights, args.steps)
    if args.prefetch:
        ahead = QwenMoeForward(entry, LoadOptions(device=args.device, host_cache=0,
                                                  extra={"dtype": args.dtype, "expert_prefetch": True}))
        result["cold_prefetch"] = cold_decode(ahead, weights, args.steps)
        ahead.close()
        result["prefetch_speedup"] = (sum(r["cold_s_per_layer"] for r in result["cold"]["steps"]) /
                                      sum(r["cold_s_per_layer"] for r in result["cold_prefetch"]["steps"]))
    for run in ("cold", "cold_prefetch")[:1 + args.prefetch]:
        for row in result[run]["steps"]:
            row["io_bound_s_per_layer"] = row["bytes_per_layer"] / (result["ceiling_gb_s"] * 1e9)
            row["ratio_to_io_bound"] = row["cold_s_per_layer"] / row["io_bound_s_per_layer"]
    result["zipf"] = zipf_trace(forward, args.zipf_tokens, int(args.budget_gb * 1e9), args.zipf_exponent, seed=0)
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
