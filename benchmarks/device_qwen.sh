# The Qwen3.5-MoE plugin's GPU run (source it from the repo root on the GPU machine, after benchmarks/device_setup.sh):
# GPU tests, then the streaming bench on the 397B's layer shapes. Logs under $OUT. Usage:
#   . benchmarks/device_qwen.sh LAYERS BENCH_TIMEOUT [extra bench args]
layers=${1:-4}; bench_timeout=${2:-170}; shift 2
nvidia-smi -L; df -h / | tail -1; free -g | head -2
python3 -c 'import transformers; print("transformers", transformers.__version__); from transformers import Qwen3_5MoeForCausalLM; print("has qwen3_5_moe")' 2>&1 | tail -2
timeout 110 python3 -m pytest tests/gpu/test_qwen_gpu.py plugins/gdsllm_qwen_moe/tests/test_qwen_moe_reference.py -m gpu -q -rs \
  -p no:cacheprovider 2>&1 | tee $OUT/gpu_tests.log | tail -40
timeout $bench_timeout python3 -m gdsllm_qwen_moe.bench --root /tmp/qstore --layers $layers "$@" > $OUT/bench.json 2> $OUT/bench.err
echo "bench rc=$?"; tail -5 $OUT/bench.err
python3 - <<'PY'
import json, os
t = open(os.environ["OUT"] + "/bench.json").read()
r = json.loads(t[t.index("{"):])
print("ceiling", r["ceiling"], "reader", r["expert_reader"], r["backend"])
for k, v in r.items():
    if isinstance(v, dict) and "steps" in v:  # the cold runs and reads_only
        print(k, "mean ratio %.3f" % v["mean_ratio_to_io_bound"],
              "paired %.3f" % v.get("mean_paired_ratio_to_io_bound", float("nan")),
              [(round(s["cold_s_per_layer"] * 1e3, 1), round(s["io_bound_s_per_layer"] * 1e3, 1),
                round(s.get("read_wait_s_per_layer", 0) * 1e3, 1), round(s.get("compute_s_per_layer", 0) * 1e3, 2))
               for s in v["steps"]])
for k in ("prefetch", "zipf", "zipf_two_tiers"):
    print(k, r.get(k))
print({k: v for k, v in r.items() if k.endswith("_speedup")})
for label, p in r.get("profile", {}).items():
    print("profile", label, p if isinstance(p, str) else
          {k: (v if not isinstance(v, list) else v[:8]) for k, v in p.items()})
PY
