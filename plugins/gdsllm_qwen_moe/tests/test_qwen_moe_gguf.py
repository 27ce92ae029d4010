"""Qwen3.5-MoE from GGUF: the tiny transformers model converted by llama.cpp's own convert_hf_to_gguf.py (and
quantized by its llama-quantize where a build is at hand), converted by gdsllm, against transformers holding the
GGUF's values as gguf-py reads them (fp32): logits for a prompt and 16 cached decode steps, and expert reads counted
against transformers' router."""

import shutil

import pytest
import torch
from qwen_moe_gguf_helpers import convert_with_llamacpp, gguf_values, hf_state_from_gguf
from qwen_moe_helpers import make_hf_model

from gdsllm_core.convert import ConvertOptions
from gdsllm_core.engine.forward import LoadOptions
from gdsllm_core.errors import ConversionError
from gdsllm_core.layout.store import ModelEntry, ModelStore
from gdsllm_core.layout.writer import ModelWriter
from gdsllm_core.testing import llama_quantize, llama_quantize_binary
from gdsllm_qwen_moe.forward import QwenMoeForward
from gdsllm_qwen_moe.gguf_convert import QwenMoeGgufConverter

pytestmark = pytest.mark.reference

PROMPT_LENGTH = 70  # more than one 64-token chunk of the chunked delta rule
# (HF checkpoint layout, llama.cpp --outtype, converter flags) -> the experts' GGML type
VARIANTS = {"f32": ("per_expert", "f32", (), "F32"), "f32-fused-gate-up": ("fused", "f32", ("--fuse-gate-up-exps",), "F32"),
            "f16": ("fused", "f16", (), "F16"), "q8_0": ("per_expert", "q8_0", (), "Q8_0")}
# K-quants need rows of 256 values: every matrix of this model has 256 columns
K_QUANT_SHAPES = dict(hidden_size=256, head_dim=64, linear_key_head_dim=64, linear_value_head_dim=64,
                      moe_intermediate_size=256, shared_expert_intermediate_size=256)


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def convert_gguf(path, root, name: str) -> ModelEntry:
    with ModelWriter(root, name) as writer:
        QwenMoeGgufConverter().convert(path, writer, ConvertOptions())
    return ModelStore(root).get(name)


def reference_model(path, **shapes):
    """transformers' model holding the GGUF's values (gguf-py's dequantization, llama.cpp's changes undone)."""
    model = make_hf_model(**shapes)
    model.load_state_dict(hf_state_from_gguf(gguf_values(path), model.config))
    return model


@pytest.fixture(scope="module")
def ggufs(hf_checkpoints, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("qwen_gguf")
    return {variant: convert_with_llamacpp(hf_checkpoints[layout], root / f"{variant}.gguf", outtype, *flags)
            for variant, (layout, outtype, flags, _) in VARIANTS.items()}


def assert_matches_transformers(forward: QwenMoeForward, model, seed: int) -> None:
    """Prompt + 16 decode steps (teacher-forced with transformers' greedy token) within 1e-4 relative."""
    prompt = torch.randint(0, model.config.vocab_size, (PROMPT_LENGTH,), generator=torch.Generator().manual_seed(seed))
    cache = forward.new_cache(PROMPT_LENGTH + 16)
    ours = forward.prefill(prompt, cache, all_logits=True)
    with torch.no_grad():
        out = model(prompt[None], use_cache=True)
    assert relative_error(ours, out.logits[0]) < 1e-4
    hf_cache, token = out.past_key_values, out.logits[0, -1].argmax()
    for _ in range(16):
        ours = forward.decode(token.reshape(1), [cache])[0]
        with torch.no_grad():
            out = model(token.reshape(1, 1), past_key_values=hf_cache, use_cache=True)
        hf_cache, ref = out.past_key_values, out.logits[0, -1]
        assert relative_error(ours, ref) < 1e-4
        token = ref.argmax()


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
def test_llamacpp_gguf_matches_transformers(ggufs, hf_model, tmp_path, variant):
    path = ggufs[variant]
    entry = convert_gguf(path, tmp_path, variant)
    expert_type = VARIANTS[variant][3]
    assert entry.manifest.quant == expert_type  # llama.cpp's general.file_type (ALL_F32 named F32)
    extent = entry.manifest.extent("blk.1.expert.5")  # one read per expert, laid out as from safetensors
    assert [(t.name, t.qtype) for t in extent.tensors] == [(f"blk.1.expert.5.ffn_{m}.weight", expert_type)
                                                           for m in ("gate", "up", "down")]
    model = reference_model(path)
    if expert_type == "F32":  # nothing rounded: the reference is the original model
        for name, value in hf_model.state_dict().items():
            assert torch.allclose(model.state_dict()[name], value, rtol=1e-6, atol=1e-7), name
    forward = QwenMoeForward(entry, LoadOptions(host_cache=1 << 20))
    assert_matches_transformers(forward, model, seed=11)
    forward.close()


def test_gguf_expert_reads_are_the_routed_experts_minus_hits(ggufs, tmp_path):
    """Q8_0 experts: with no cache each layer reads exactly the experts transformers' router picks x the expert
    extent's size; with a cache holding them all, a repeated prompt reads nothing and every request is a hit."""
    path = ggufs["q8_0"]
    entry = convert_gguf(path, tmp_path, "q8")
    model = reference_model(path)
    expert_bytes = entry.manifest.extent("blk.0.expert.0").nbytes
    assert {e.nbytes for e in entry.manifest.extents if ".expert." in e.name} == {expert_bytes}
    prompt = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(2))
    forward = QwenMoeForward(entry, LoadOptions(host_cache=0))
    cache = forward.new_cache(24)
    logits = forward.prefill(prompt, cache)
    sequence, top_k = prompt, model.config.num_experts_per_tok
    for _ in range(3):
        token = logits.argmax().reshape(1)
        sequence = torch.cat([sequence, token])
        before = forward.reader.bytes_read
        logits = forward.decode(token, [cache])[0]
        reads = [forward.experts.counters.last_read_by_layer[layer] for layer in range(4)]
        assert [read.bytes for read in reads] == [top_k * expert_bytes] * 4
        assert forward.reader.bytes_read - before == 4 * top_k * expert_bytes
        with torch.no_grad():
            router = model(sequence[None], output_router_logits=True).router_logits
        assert [sorted(torch.topk(lg[-1], top_k).indices.tolist()) for lg in router] == \
               [sorted(read.ids) for read in reads]
    forward.close()
    forward = QwenMoeForward(entry, LoadOptions(host_cache=32 * expert_bytes))  # every expert fits
    first = forward.prefill(prompt, forward.new_cache(20))
    read, requests = forward.experts.counters.bytes_read, forward.experts.stats().requests
    assert read == forward.experts.counters.misses * expert_bytes
    assert torch.equal(forward.prefill(prompt, forward.new_cache(20)), first)
    assert forward.experts.counters.bytes_read == read
    assert forward.experts.counters.hits == requests
    forward.close()


def test_registered_for_qwen35moe_ggufs_only(ggufs, registered_plugin):
    from gdsllm_core import registry

    assert registry.detect_converter(ggufs["q8_0"]) == "qwen35moe_gguf"
    assert QwenMoeGgufConverter.detect(ggufs["f16"])


def test_truncated_gguf_names_the_file(ggufs, tmp_path):
    broken = tmp_path / "broken.gguf"
    shutil.copy(ggufs["q8_0"], broken)
    with open(broken, "r+b") as handle:
        handle.truncate(broken.stat().st_size // 2)
    with pytest.raises(ConversionError, match="broken.gguf"):
        convert_gguf(broken, tmp_path / "store", "broken")


@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", ["Q4_K_M", "Q6_K", "Q3_K_M"])
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
def test_k_quants_by_llama_quantize_match_transformers(tmp_path, qtype):
    """K-quant blocks written by llama-quantize (GDSLLM_LLAMACPP_BIN) read block for block."""
    if llama_quantize_binary() is None:
        pytest.skip("no llama.cpp build: set GDSLLM_LLAMACPP_BIN to its build/bin (`nox -s llamacpp`)")
    folder = tmp_path / "hf"
    make_hf_model(**K_QUANT_SHAPES).save_pretrained(folder)
    path = llama_quantize(convert_with_llamacpp(folder, tmp_path / "f32.gguf", "f32"), tmp_path / f"{qtype}.gguf",
                          qtype)
    entry = convert_gguf(path, tmp_path / "store", qtype.lower())
    assert entry.manifest.quant == qtype
    expert_types = {t.qtype for e in entry.manifest.extents if ".expert." in e.name for t in e.tensors}
    assert expert_types & {"Q3_K", "Q4_K", "Q5_K", "Q6_K"}, expert_types
    forward = QwenMoeForward(entry, LoadOptions(host_cache=1 << 22))
    assert_matches_transformers(forward, reference_model(path, **K_QUANT_SHAPES), seed=12)
    forward.close()


@pytest.mark.gpu
@pytest.mark.parametrize(("variant", "dtype", "tolerance"), [("q8_0", "float32", 1e-4), ("f16", "float32", 1e-4),
                                                             ("q8_0", "bfloat16", 0.1)])
def test_cuda_computes_gguf_blocks_like_the_cpu(ggufs, tmp_path, variant, dtype, tolerance):
    """On the GPU, GGML experts dequantized by its kernel (fp32) or through its GEMV kernels (bf16), dense weights
    dequantized once at load: the CPU's fp32 logits (bf16: within the loose bound of a random tiny model, see
    tests/gpu/test_qwen_gpu.py) and the same expert reads."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    entry = convert_gguf(ggufs[variant], tmp_path, variant)
    prompt = torch.randint(0, 512, (PROMPT_LENGTH,), generator=torch.Generator().manual_seed(13))
    results = []
    for device in ("cpu", "cuda"):
        forward = QwenMoeForward(entry, LoadOptions(device=device, host_cache=0, extra={
            "dtype": dtype if device == "cuda" else "float32", "expert_vram_bytes": 0, "expert_prefetch": False}))
        cache = forward.new_cache(PROMPT_LENGTH + 4)
        logits = [forward.prefill(prompt, cache, all_logits=True).cpu()]
        for token in (5, 6, 7, 8):
            logits.append(forward.decode(torch.tensor([token]), [cache]).cpu())
        results.append((logits, forward.experts.counters.bytes_read))
        forward.close()
    (cpu_logits, cpu_bytes), (gpu_logits, gpu_bytes) = results
    for ours, ref in zip(gpu_logits, cpu_logits, strict=True):
        assert relative_error(ours.float(), ref) < tolerance
    assert gpu_bytes == cpu_bytes
