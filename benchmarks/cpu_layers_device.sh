#!/usr/bin/env bash
# Issue 7's "8 layers in VRAM, 24 in pinned RAM" decode with some host-tier layers computed on the CPU, in one
# device call (repo root; .whl carried): the CPU-layer GPU tests while the synthetic LLaMA-7B Q4_0 is made and
# converted (as device_bench.sh does), then the PCIe ceiling, `gdsllm bench --vram-layers 8` with --cpu-layers
# auto and 0 in the same run, a sweep of CPU-layer counts, the CPU int4 kernel alone and beside PCIe copies, and
# batched decode with auto and 0. Results in $OUT.
set -o pipefail
. benchmarks/device_setup.sh > /dev/null || exit 1
export GDSLLM_MODEL_ROOT=/root/models
TG=${TG:-32}
{ nproc; python3 -c "import torch; print('torch', torch.__version__, 'threads', torch.get_num_threads(),
'int4 cpu op', hasattr(torch.ops.aten, '_weight_int4pack_mm_for_cpu'))"; } | tee $OUT/summary.txt
( [ -d /root/models/7b-Q4_0 ] || { timeout 100 python3 benchmarks/synth_llama_gguf.py /root/7b-Q4_0.gguf --type Q4_0 > /dev/null &&
  timeout 120 python3 -c "from gdsllm_core.convert import convert; from gdsllm_core.layout.store import ModelStore; \
from gdsllm_core import plugins; plugins.load_plugins(); print(convert('/root/7b-Q4_0.gguf', ModelStore(), '7b-Q4_0').path)"; }
) > $OUT/convert.log 2>&1 &
made=$!
timeout 120 python3 -m pytest -p no:cacheprovider tests/gpu/test_cpu_layers_gpu.py -q --tb=short -rA > $OUT/tests.log 2>&1
tail -6 $OUT/tests.log
wait $made; tail -2 $OUT/convert.log
timeout 30 python3 benchmarks/cpu_layers_probe.py --no-model 2>&1 | head -1 | tee $OUT/probe.jsonl
bench() { tag=$1; shift; echo "== $tag: $*"; timeout 100 python3 -c "import sys; from gdsllm_core.cli.main import main; \
sys.argv[0] = 'gdsllm'; main()" bench "$@" --json > /root/$tag.json 2> /root/$tag.err; rc=$?; tail -3 /root/$tag.err
  python3 -c "import json; d=json.load(open('/root/$tag.json')); d['tag']='$tag'; print(json.dumps(d))" >> $BJ \
  || echo "$tag failed rc $rc"; }
BJ=$OUT/bench.jsonl
bench cpu_auto 7b-Q4_0 --vram-layers 8 --tg $TG --cpu-layers auto
bench cpu_0 7b-Q4_0 --vram-layers 8 --tg $TG --cpu-layers 0
show() { python3 - $BJ <<'PY' | tee -a $OUT/summary.txt
import json, sys
for r in (json.loads(line) for line in open(sys.argv[1])):
    print(f"{r['tag']}: layers {r['placement']['layers']} pp{r['pp']} {r['pp_tok_s']:,.0f} tok/s, tg{r['tg']} "
          f"{r['tg_tok_s']:.2f} tok/s ({r['tg_s'] / r['tg'] * 1e3:.2f} ms/token), host bytes/token "
          f"{r['tg_host_bytes_per_token'] / 1e9:.3f} GB, streamed {r['tg_streamed_gbps']:.1f} GB/s, GPU copy "
          f"{r.get('gpu_bandwidth_gbps', 0):,.0f} GB/s, storage {r.get('storage', {}).get('gbps', 0):.2f} GB/s")
    for b in r["batches"] if len(r["batches"]) > 1 else []:
        print(f"   batch {b['batch']}: {b['tg_tok_s']:.2f} tok/s aggregate, {b['tg_host_bytes_per_step'] / 1e9:.3f} GB/step")
PY
}
show
timeout 70 python3 benchmarks/cpu_layers_probe.py --model 7b-Q4_0 --vram-layers 8 2>&1 | grep '^{' | tee -a $OUT/probe.jsonl
timeout 40 python3 benchmarks/cpu_layers_probe.py 2>&1 | grep '^{' | tee -a $OUT/probe.jsonl
BJ=$OUT/batch.jsonl
bench batch_auto 7b-Q4_0 --vram-layers 8 --pp 64 --tg 16 --batch 1,4,16 --cpu-layers auto --no-ceilings
bench batch_0 7b-Q4_0 --vram-layers 8 --pp 64 --tg 16 --batch 1,4,16 --cpu-layers 0 --no-ceilings
show
