#!/usr/bin/env bash
# The GPU-machine run of issue 9 and the GPU tests of issues 7-9, in one call (repo root; .whl carried): every GPU
# test (core and both plugins) while a synthetic LLaMA-7B Q4_0 is written and converted on other cores, then
# `gdsllm bench --batch 1,8,16` with all layers resident, with 8 layers in VRAM and 24 streamed from pinned host RAM,
# and from storage (caches dropped), the ceilings measured in each run. Results land in $OUT.
set -o pipefail
. benchmarks/device_setup.sh > /dev/null || exit 1
export GDSLLM_MODEL_ROOT=/root/models
pin() { if command -v taskset > /dev/null; then taskset -c "$@"; else shift; "$@"; fi; }
( pin 8-15 timeout 120 python3 benchmarks/synth_llama_gguf.py /root/7b-Q4_0.gguf --type Q4_0 > /dev/null &&
  pin 8-15 timeout 150 python3 -c "from gdsllm_core.convert import convert; from gdsllm_core.layout.store import \
ModelStore; from gdsllm_core import plugins; plugins.load_plugins(); print(convert('/root/7b-Q4_0.gguf', ModelStore(), \
'7b-Q4_0').path)"; echo "convert rc $?" ) > $OUT/convert.log 2>&1 &
made=$!
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/summary.txt
pin 0-7 timeout 240 python3 -m pytest -p no:cacheprovider tests/gpu plugins/gdsllm_qwen_moe/tests -m gpu -q --tb=short -rs \
  --durations=5 > $OUT/tests.log 2>&1; echo "tests rc $?" | tee -a $OUT/summary.txt
grep -E "passed|failed|FAILED|SKIPPED|Error" $OUT/tests.log | tail -20 | tee -a $OUT/summary.txt
wait $made; tail -2 $OUT/convert.log
bench() { tag=$1; shift; echo "== $tag: $*"; timeout 150 python3 -c "import sys; from gdsllm_core.cli.main import main; \
sys.argv[0] = 'gdsllm'; main()" bench 7b-Q4_0 "$@" --json > /root/$tag.json 2> /root/$tag.err; rc=$?; tail -2 /root/$tag.err
  python3 -c "import json; d=json.load(open('/root/$tag.json')); d['tag']='$tag'; print(json.dumps(d))" >> $OUT/bench.jsonl \
  || echo "$tag failed rc $rc"; }
bench batch_resident --pp 64 --tg 32 --batch 1,8,16
bench batch_8vram_host --vram-layers 8 --cpu-layers 0 --pp 64 --tg 8 --batch 1,8,16
bench batch_8vram_storage --vram-layers 8 --host-cache 0 --cpu-layers 0 --pp 16 --tg 3 --batch 1,8,16
python3 benchmarks/summarize.py $OUT/bench.jsonl | tee -a $OUT/summary.txt
