"""Print the `gdsllm bench --json` results of the device scripts (one JSON object a line) as tables: one row per run,
then one row per batch size of the runs made with `--batch`.
usage: python benchmarks/summarize.py bench.jsonl"""

import json
import sys


def main(path: str) -> None:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    print("| run | layers vram/host/cpu/storage | pp tok/s | tg tok/s | ms/token | decode GB/s (frac of GPU copy) "
          "| streamed GB/s (tg) | s/token over storage floor | VRAM peak GiB | GPU copy GB/s | storage GB/s |")
    print("|" + " --- |" * 11)
    for r in rows:
        layers = r["placement"]["layers"] or {}
        frac = r.get("tg_fraction_of_gpu_bandwidth")
        storage = r.get("storage", {})
        print(f"| {r['tag']} | {layers.get('vram')}/{layers.get('host')}/{layers.get('cpu', 0)}/{layers.get('storage')} "
              f"| {r['pp_tok_s']:,.0f} | {r['tg_tok_s']:,.2f} | {r['tg_s'] / r['tg'] * 1e3:,.2f} "
              f"| {r['tg_effective_gbps']:,.0f}" + (f" ({frac:.1%})" if frac else "") +
              f" | {r['tg_streamed_gbps']:.2f} | " +
              (f"{r['tg_s_per_token_over_floor']:.2f}x" if "tg_s_per_token_over_floor" in r else "-") +
              f" | {r['vram_peak_bytes'] / 2**30:.2f} | {r.get('gpu_bandwidth_gbps', 0):,.0f} "
              f"| {storage.get('gbps', 0):.2f} ({storage.get('caches', 'not measured')}) |")
    batched = [r for r in rows if len(r.get("batches", [])) > 1]
    if batched:
        print("\n| run | sequences | decode steps/s | aggregate tok/s | x batch 1 | bytes moved per step (MB) |")
        print("|" + " --- |" * 6)
    for r in batched:
        for run in r["batches"]:
            print(f"| {r['tag']} | {run['batch']} | {run['decoded_tokens'] / run['batch'] / run['tg_s']:,.2f} "
                  f"| {run['tg_tok_s']:,.2f} | {run.get('tg_speedup_vs_batch1', 1.0):.2f}x "
                  f"| {run.get('weight_bytes_per_step', 0) / 1e6:,.0f} |")


if __name__ == "__main__":
    main(sys.argv[1])
