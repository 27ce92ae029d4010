#!/usr/bin/env bash
# Issue 17's before/after run on the GPU machine, in one call (repo root; .whl, .work/before and .work/smol/part00
# carried): the same `gdsllm bench` lines and the Qwen expert bench, first on the tree before the runtime moved into
# core (.work/before, a `git archive` of 569631e), then on this tree, alternated on one warm machine. Logs in $OUT.
set -o pipefail
. benchmarks/device_setup.sh > /dev/null || exit 1
after=$PWD; before=$PWD/.work/before
export GDSLLM_MODEL_ROOT=/root/models
tree() { export PYTHONPATH=/tmp/site:$1:$1/kernels:$1/plugins/gdsllm_llama:$1/plugins/gdsllm_qwen_moe:/root/smolpkg; cd $1; }
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/summary.txt
tree $before  # version-1 store: both trees read it
timeout 120 python3 benchmarks/synth_llama_gguf.py /root/7b-Q4_0.gguf --type Q4_0 > /dev/null &&
timeout 180 python3 -c "from gdsllm_core.convert import convert; from gdsllm_core.layout.store import ModelStore; \
from gdsllm_core import plugins; plugins.load_plugins(); print(convert('/root/7b-Q4_0.gguf', ModelStore(), '7b-Q4_0').path)" 2>&1 | tail -1
bench() { label=$1; tag=$2; shift 2; echo "== $label $tag: $*"; timeout 150 python3 -c "import sys; from gdsllm_core.cli.main import main; \
sys.argv[0] = 'gdsllm'; main()" bench "$@" --json > /root/$label-$tag.json 2> /root/$label-$tag.err; rc=$?; tail -2 /root/$label-$tag.err
  python3 -c "import json; d=json.load(open('/root/$label-$tag.json')); d['tag']='$label-$tag'; print(json.dumps(d))" >> $OUT/bench.jsonl || echo "$label-$tag failed rc $rc"; }
for label in before after; do
  [ $label = before ] && tree $before || tree $after
  bench $label resident 7b-Q4_0 --tg 64
  bench $label pinned_cpu_auto 7b-Q4_0 --vram-layers 8 --tg 16
  bench $label storage 7b-Q4_0 --vram-layers 8 --host-cache 0 --cpu-layers 0 --tg 8
  timeout 100 python3 -m gdsllm_qwen_moe.bench --root /root/qstore --layers 4 --steps 6 --ceiling-gb 1 --zipf-tokens 16 > $OUT/qwen-$label.json 2> $OUT/qwen-$label.err
  echo "qwen $label rc $?"; tail -2 $OUT/qwen-$label.err
done
cd $after; python3 benchmarks/summarize.py $OUT/bench.jsonl | tee -a $OUT/summary.txt
for label in before after; do python3 - $OUT/qwen-$label.json $label <<'PY' | tee -a $OUT/summary.txt
import json, sys
t = open(sys.argv[1]).read()
r = json.loads(t[t.index("{"):])
for k, v in r.items():
    if isinstance(v, dict) and "steps" in v:
        print(sys.argv[2], "qwen", k, "mean ratio to the I/O floor %.3f" % v["mean_ratio_to_io_bound"],
              "compute ms/layer", [round(s.get("compute_s_per_layer", 0) * 1e3, 2) for s in v["steps"]][:6])
print(sys.argv[2], "qwen ceiling", r.get("ceiling"))
PY
done
