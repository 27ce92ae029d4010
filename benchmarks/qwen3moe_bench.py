"""Qwen3-30B-A3B-shaped qwen3moe decode on the GPU machine (issue 18), all figures from one run:

1. writes a synthetic qwen3moe GGUF with gguf-py (48 layers, 128 experts, top-8, hidden 2048, expert ffn 768,
   32 heads / 4 KV heads of 128, vocab 151936; Q4_K matrices, Q6_K ffn_down and head as Q4_K_M does; random
   blocks with small fp16 scales: the weights are noise, which is all timing needs) and converts it;
2. the storage ceiling: random expert extents read cold (page cache dropped per file) through the same reader;
3. cold-cache decode with no host cache (every routed expert read from storage each step), against the I/O floor
   (bytes the step read / the ceiling);
4. decode with every expert in pinned host RAM (warmed first);
5. llama.cpp `llama-bench --n-cpu-moe 48 -ngl 99` on the same file when LLAMA_BENCH names a CUDA build.
Prints one JSON line per figure. Usage: python3 benchmarks/qwen3moe_bench.py WORKDIR [--tg 16] [--layers 48] [--prepare-only]
(on the GPU machine: benchmarks/device_models.sh)"""

import argparse
import json
import os
import re
import subprocess
import time
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

HIDDEN, EXPERT_FFN, EXPERTS, TOP_K, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 2048, 768, 128, 8, 32, 4, 128, 151936
FP16_FIELDS = {"Q4_K": (0, 2), "Q6_K": (208,)}  # byte offsets of each block's fp16 scales (ggml-common.h)
rng = np.random.default_rng(0)


def blocks(qtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Random `qtype` blocks for a tensor of `shape` (torch order), fp16 scales small and positive."""
    values, nbytes = gguf.GGML_QUANT_SIZES[Q[qtype]]
    n_blocks = int(np.prod(shape)) // values
    raw = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint8)
    for offset in FP16_FIELDS[qtype]:
        raw[:, offset:offset + 2] = np.full(n_blocks, 1e-3, dtype=np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(*shape[:-1], shape[-1] // values * nbytes)


def write_gguf(path: Path, n_layers: int) -> None:
    writer = gguf.GGUFWriter(str(path), arch="qwen3moe")
    writer.add_block_count(n_layers)
    writer.add_context_length(4096)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(6144)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_rope_freq_base(1e6)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_expert_count(EXPERTS)
    writer.add_expert_used_count(TOP_K)
    writer.add_expert_feed_forward_length(EXPERT_FFN)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list([f"t{i}" for i in range(VOCAB)])
    writer.add_token_types([1] * VOCAB)
    writer.add_token_merges([])
    writer.add_eos_token_id(0)

    def add(name: str, qtype: str, shape: tuple[int, ...]) -> None:
        if qtype == "F32":
            writer.add_tensor(name, np.ones(shape, dtype=np.float32))
        else:
            writer.add_tensor(name, blocks(qtype, shape), raw_dtype=Q[qtype])

    add("token_embd.weight", "Q4_K", (VOCAB, HIDDEN))
    for i in range(n_layers):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", "F32", (HIDDEN,))
        add(p + "attn_q.weight", "Q4_K", (HEADS * HEAD_DIM, HIDDEN))
        add(p + "attn_k.weight", "Q4_K", (KV_HEADS * HEAD_DIM, HIDDEN))
        add(p + "attn_v.weight", "Q6_K", (KV_HEADS * HEAD_DIM, HIDDEN))
        add(p + "attn_output.weight", "Q4_K", (HIDDEN, HEADS * HEAD_DIM))
        add(p + "attn_q_norm.weight", "F32", (HEAD_DIM,))
        add(p + "attn_k_norm.weight", "F32", (HEAD_DIM,))
        add(p + "ffn_norm.weight", "F32", (HIDDEN,))
        writer.add_tensor(p + "ffn_gate_inp.weight", rng.standard_normal((EXPERTS, HIDDEN), dtype=np.float32))
        add(p + "ffn_gate_exps.weight", "Q4_K", (EXPERTS, EXPERT_FFN, HIDDEN))
        add(p + "ffn_up_exps.weight", "Q4_K", (EXPERTS, EXPERT_FFN, HIDDEN))
        add(p + "ffn_down_exps.weight", "Q6_K", (EXPERTS, HIDDEN, EXPERT_FFN))
    add("output_norm.weight", "F32", (HIDDEN,))
    add("output.weight", "Q6_K", (VOCAB, HIDDEN))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def drop_cache(path: Path) -> None:
    with open(path, "rb") as handle:
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def storage_ceiling(entry, n_experts: int = 512) -> float:
    """GB/s reading `n_experts` random expert extents cold, all submitted at once, into pinned buffers."""
    from gdsllm_core.storage.reader import ExtentReader

    experts = [e for e in entry.manifest.extents if ".expert." in e.name]
    picked = [experts[i] for i in rng.choice(len(experts), n_experts, replace=False)]
    buffers = [torch.empty(e.nbytes, dtype=torch.uint8, pin_memory=True) for e in picked]
    for file in entry.manifest.files:
        drop_cache(entry.path / file)
    with ExtentReader(entry.path, entry.manifest) as reader:
        began = time.perf_counter()
        reader.read(picked, buffers)
        seconds = time.perf_counter() - began
    return sum(e.nbytes for e in picked) / seconds / 1e9


def decode(entry, host_cache: int, tg: int, warm_steps: int = 0) -> dict:
    """Decode `tg` tokens (after `warm_steps` untimed ones); per-step seconds and expert bytes read."""
    from gdsllm_qwen3.forward import QwenForward

    from gdsllm_core.engine.forward import LoadOptions

    for file in entry.manifest.files:
        drop_cache(entry.path / file)
    forward = QwenForward(entry, LoadOptions(device="cuda", host_cache=host_cache))
    try:
        cache = forward.new_cache(tg + warm_steps + 16)
        logits = forward.prefill(torch.arange(8, device="cuda"), cache)
        token = torch.tensor([int(logits.argmax())], device="cuda")
        for _ in range(warm_steps):
            token = forward.decode(token, [cache]).argmax(-1)
        torch.cuda.synchronize()
        read_before = forward.stats()["expert_cache"]["bytes_read"]
        steps = []
        for _ in range(tg):
            began = time.perf_counter()
            token = forward.decode(token, [cache]).argmax(-1)
            torch.cuda.synchronize()
            steps.append(time.perf_counter() - began)
        stats = forward.stats()
        return {"tok_s": tg / sum(steps), "ms_per_token": 1e3 * sum(steps) / tg,
                "expert_bytes_per_token": (stats["expert_cache"]["bytes_read"] - read_before) / tg,
                "expert_cache": stats["expert_cache"], "backend": stats["backend"]}
    finally:
        forward.close()


def llamacpp(gguf_path: Path, tg: int) -> dict | None:
    binary = os.environ.get("LLAMA_BENCH")
    if not binary:
        return None
    out = subprocess.run([binary, "-m", str(gguf_path), "-ngl", "99", "--n-cpu-moe", "48", "-p", "0", "-n", str(tg),
                          "-r", "2", "-o", "json"], capture_output=True, text=True, timeout=300)
    if out.returncode:
        return {"error": out.stderr[-2000:]}
    runs = json.loads(out.stdout[out.stdout.index("["):])
    return {"tok_s": runs[0]["avg_ts"], "n_cpu_moe": 48}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--tg", type=int, default=16)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--prepare-only", action="store_true", help="write and convert the GGUF, measure nothing")
    args = parser.parse_args()
    from gdsllm_qwen3 import plugin

    from gdsllm_core import plugins
    from gdsllm_core.convert import convert
    from gdsllm_core.layout.store import ModelStore

    plugins.ensure_registered(plugin, "qwen3")
    args.workdir.mkdir(parents=True, exist_ok=True)
    gguf_path = args.workdir / f"qwen3moe-30b-a3b-shaped-{args.layers}l.Q4_K_M.gguf"
    store = ModelStore(args.workdir / "models")
    name = re.sub(r"[^a-z0-9.-]", "-", gguf_path.stem.lower())
    if not gguf_path.exists():
        began = time.perf_counter()
        write_gguf(gguf_path, args.layers)
        print(json.dumps({"wrote": str(gguf_path), "bytes": gguf_path.stat().st_size,
                          "seconds": time.perf_counter() - began}), flush=True)
    if name not in [m.name for m in store.list()]:
        convert(gguf_path, store, name)
    entry = store.get(name)
    if args.prepare_only:
        print(json.dumps({"converted": str(entry.path)}), flush=True)
        return
    ceiling = storage_ceiling(entry)
    print(json.dumps({"storage_ceiling_gbps": ceiling}), flush=True)
    cold = decode(entry, host_cache=0, tg=args.tg)
    floor_ms = cold["expert_bytes_per_token"] / (ceiling * 1e9) * 1e3
    print(json.dumps({"cold": cold, "io_floor_ms_per_token": floor_ms,
                      "ratio_to_floor": cold["ms_per_token"] / floor_ms}), flush=True)
    expert_bytes = sum(e.nbytes for e in entry.manifest.extents if ".expert." in e.name)
    pinned = decode(entry, host_cache=expert_bytes, tg=args.tg, warm_steps=args.tg)
    print(json.dumps({"pinned": pinned}), flush=True)
    reference = llamacpp(gguf_path, args.tg)
    print(json.dumps({"llamacpp_n_cpu_moe_48": reference,
                      "speedup": pinned["tok_s"] / reference["tok_s"] if reference and "tok_s" in reference else None}),
          flush=True)


if __name__ == "__main__":
    main()
