#!/usr/bin/env bash
# The GPU-machine benchmark of issue 7, in one call (repo root; .whl, .work/llamacpp and the SmolLM2 parts carried,
# see device_setup.sh): llama.cpp builds in the background (cores 4-15) while the LLaMA GPU tests and the GPU-bound
# benchmarks run (cores 0-3) on synthetic LLaMA-7B-shaped Q4_0 / Q8_0 GGUFs; once the build is done, the runs that
# compute layers on the CPU (all 16 cores: never beside the build), then llama-bench on the same files. Results
# land in $OUT. QWEN_LAYERS=N (and QWEN_ARGS) also runs issue 8's bench during the build.
set -o pipefail
. benchmarks/device_setup.sh > /dev/null || exit 1
export GDSLLM_MODEL_ROOT=/root/models
mkdir -p /root/llama && tar xzf .work/llamacpp/llama.cpp-src.tgz -C /root/llama
pin() { if command -v taskset > /dev/null; then taskset -c "$@"; else shift; "$@"; fi; }
( cd /root/llama/llama.cpp && pin 4-15 nice -n 5 sh -c 'cmake -B build -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release \
  && cmake --build build -j12 --target llama-bench' > $OUT/build.log 2>&1; echo "build rc $?" >> $OUT/build.log ) &
build=$!
run() { pin 0-3 "$@"; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee $OUT/summary.txt
TYPES=${TYPES:-Q4_0 Q8_0}  # the synthetic files to make and measure
TESTS=${TESTS:-tests/gpu/test_llama_gpu.py tests/gpu/test_cpu_layers_gpu.py}
run timeout 150 python3 -m pytest -p no:cacheprovider $TESTS -q --tb=short -rs > $OUT/tests.log 2>&1; tail -12 $OUT/tests.log
NOREPACK=""
if grep -qE "FAILED.*(repacked|synthetic)" $OUT/tests.log; then
  NOREPACK="--no-repack"; echo "repacked-layout tests failed: benchmarking without repacking" | tee -a $OUT/summary.txt
fi
for q in $TYPES; do
  run timeout 120 python3 benchmarks/synth_llama_gguf.py /root/7b-$q.gguf --type $q > /dev/null &&
  run timeout 180 python3 -c "from gdsllm_core.convert import convert; from gdsllm_core.layout.store import ModelStore; \
from gdsllm_core import plugins; plugins.load_plugins(); print(convert('/root/7b-$q.gguf', ModelStore(), '7b-$q').path)" 2>&1 | tail -2
done
wanted() { [ -z "$ONLY" ] || [[ $1 =~ $ONLY ]]; }  # ONLY: a regex of the run tags to do (default: all)
bench() { tag=$1; shift; wanted $tag || return 0; echo "== $tag: $*"; run timeout 150 python3 -c "import sys; from gdsllm_core.cli.main import main; sys.argv[0] = 'gdsllm'; main()" \
  bench "$@" --json > /root/$tag.json 2> /root/$tag.err; rc=$?; tail -3 /root/$tag.err
  python3 -c "import json,sys; d=json.load(open('/root/$tag.json')); d['tag']='$tag'; print(json.dumps(d))" >> $OUT/bench.jsonl || echo "$tag failed rc $rc"; }
bench q4_resident 7b-Q4_0 $NOREPACK
case "$TYPES" in *Q8_0*) bench q8_resident 7b-Q8_0 $NOREPACK;; esac
bench q4_resident_batch 7b-Q4_0 --pp 64 --tg 32 --batch 1,8,16 --no-ceilings $NOREPACK
bench q4_8vram_storage 7b-Q4_0 --vram-layers 8 --host-cache 0 --cpu-layers 0 --tg 8 $NOREPACK
if [ -n "$QWEN_LAYERS" ]; then  # while llama.cpp builds: the Qwen3.5-MoE expert streaming bench (issue 8), 397B shapes
  run timeout 200 python3 -m gdsllm_qwen_moe.bench --root /root/qstore --layers $QWEN_LAYERS ${QWEN_ARGS:---prefetch-limits 0 \
    --vram-budget-gb 2 --zipf-tokens 32} > $OUT/qwen.json 2> $OUT/qwen.err; echo "qwen bench rc $?"; tail -2 $OUT/qwen.err
  python3 - $OUT/qwen.json <<'PY' | tee -a $OUT/summary.txt
import json, sys
text = open(sys.argv[1]).read()
r = json.loads(text[text.index("{"):])
print("qwen: ceiling", r["ceiling"], "| read-ahead", r["prefetch"], "| without it, speed", r.get("prefetch_0_speedup"))
for key, v in r.items():
    if not key.startswith("cold"):
        continue
    print(f"qwen {key}: mean ratio to the I/O floor {v['mean_ratio_to_io_bound']:.3f};", [
        (round(s["cold_s_per_layer"] * 1e3, 1), round(s["io_bound_s_per_layer"] * 1e3, 1)) for s in v["steps"]])
for key in ("zipf", "zipf_two_tiers"):
    print("qwen", key, r.get(key))
PY
fi
began=$(date +%s); wait $build; echo "waited $(( $(date +%s) - began )) s for the build"; tail -3 $OUT/build.log
run() { "$@"; }  # the build is done: every core for the runs that compute layers on the CPU
for round in $(seq ${HOST_ROUNDS:-1}); do  # alternated: the machine's speed drifts between runs
  bench q4_8vram_host_cpu_auto_$round 7b-Q4_0 --vram-layers 8 $NOREPACK  # --cpu-layers auto, the default
  bench q4_8vram_host_gpu_only_$round 7b-Q4_0 --vram-layers 8 --cpu-layers 0 $NOREPACK
done
bench q4_8vram_host_cpu_8 7b-Q4_0 --vram-layers 8 --cpu-layers 8 $NOREPACK
lb=/root/llama/llama.cpp/build/bin/llama-bench
if [ -x $lb ]; then
  for q in $TYPES; do wanted llamacpp_ngl99 && timeout 120 $lb -m /root/7b-$q.gguf -p 512 -n 128 -ngl 99 -r 3 2>&1 |
    grep -E '^\|' | tee -a $OUT/llamacpp.md; done
  wanted llamacpp_ngl8 && timeout 150 $lb -m /root/7b-Q4_0.gguf -p 512 -n 128 -ngl 8 -r ${NGL8_REPS:-2} 2>&1 | grep -E '^\|' |
    tee -a $OUT/llamacpp.md
fi
python3 benchmarks/summarize.py $OUT/bench.jsonl | tee -a $OUT/summary.txt
