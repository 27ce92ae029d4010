#!/usr/bin/env bash
# Issue 18's GPU run for the qwen3 / gemma plugins (repo root; .whl and .work/llamacpp/llama.cpp-src.tgz carried, as
# for device_bench.sh), in two device calls on one warm machine:
#   bash benchmarks/device_models.sh prepare   # GPU tests of both plugins; llama.cpp CUDA build (llama-bench) and
#                                              # the Qwen3-30B-A3B-shaped Q4_K_M GGUF written + converted meanwhile
#   bash benchmarks/device_models.sh bench     # storage ceiling, cold decode vs its I/O floor, pinned experts vs
#                                              # llama.cpp --n-cpu-moe 48 on the same file
# Results in $OUT.
set -o pipefail
. benchmarks/device_setup.sh > /dev/null || exit 1
export PYTHONPATH=$PYTHONPATH:$PWD/plugins/gdsllm_qwen3:$PWD/plugins/gdsllm_gemma
WORK=/root/qwen3moe
pin() { if command -v taskset > /dev/null; then taskset -c "$@"; else shift; "$@"; fi; }
case "${1:-prepare}" in
prepare)
  mkdir -p /root/llama && tar xzf .work/llamacpp/llama.cpp-src.tgz -C /root/llama
  ( cd /root/llama/llama.cpp && pin 6-15 nice -n 5 sh -c 'cmake -B build -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF \
    -DCMAKE_BUILD_TYPE=Release && cmake --build build -j10 --target llama-bench' > $OUT/build.log 2>&1
    echo "build rc $?" >> $OUT/build.log ) &
  build=$!
  ( pin 2-5 timeout 560 python3 -c "import sys; sys.argv = ['b', '$WORK', '--prepare-only']; \
sys.path.insert(0, 'benchmarks'); import qwen3moe_bench; qwen3moe_bench.main()" ) > $OUT/prepare.log 2>&1 &
  made=$!
  pin 0-1 timeout 300 python3 -m pytest -p no:cacheprovider plugins/gdsllm_qwen3/tests plugins/gdsllm_gemma/tests -m gpu \
    -q --tb=short -rs > $OUT/tests.log 2>&1; echo "tests rc $?" | tee $OUT/summary.txt
  tail -5 $OUT/tests.log | tee -a $OUT/summary.txt
  wait $made; tail -3 $OUT/prepare.log | tee -a $OUT/summary.txt
  wait $build; tail -2 $OUT/build.log | tee -a $OUT/summary.txt ;;
bench)
  LLAMA_BENCH=/root/llama/llama.cpp/build/bin/llama-bench timeout 580 python3 benchmarks/qwen3moe_bench.py $WORK \
    --tg ${TG:-16} 2>&1 | tee $OUT/qwen3moe.jsonl ;;
esac
