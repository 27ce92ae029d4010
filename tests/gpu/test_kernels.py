"""The CUDA kernels against CPU references: the LLaMA plugin's ggml dequantization (itself bit-exact with gguf-py),
float64 matrix products, and the CPU forward's RMSNorm / RoPE / attention. Odd shapes; tolerance per dtype."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from gdsllm_core.quant.ggml import dequantize as cpu_dequantize  # noqa: E402
from gdsllm_kernels import ops  # noqa: E402

QTYPES = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
# byte offsets of the fp16 scale fields in one block (ggml-common.h): set to small finite values
FP16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82),
               "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
CUDA = torch.device("cuda")


def random_weight(qtype: str, rows: int, cols: int, rng: np.random.Generator) -> torch.Tensor:
    """A weight as the kernels read it: typed [rows, cols] for F32/F16/BF16, raw GGML blocks otherwise."""
    if qtype in ("F32", "F16", "BF16"):
        return torch.from_numpy(rng.standard_normal((rows, cols)).astype(np.float32)).to(ops.PLAIN[qtype])
    values, nbytes = ops.BLOCKS[qtype]
    n_blocks = rows * cols // values
    blocks = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint8)
    for offset in FP16_FIELDS[qtype]:
        scale = (rng.standard_normal(n_blocks) * 0.05).astype(np.float16)
        blocks[:, offset:offset + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return torch.from_numpy(blocks.reshape(rows, -1))


def reference(weight: torch.Tensor, qtype: str, cols: int) -> torch.Tensor:
    if qtype in ("F32", "F16", "BF16"):
        return weight.float()
    return cpu_dequantize(weight, qtype).reshape(weight.shape[0], cols)


def odd_cols(qtype: str) -> int:
    return 256 * 3 if ops.BLOCKS[qtype][0] == 256 else 32 * 7


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    assert torch.isfinite(got).all()
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_dequantize_matches_cpu_reference(qtype, dtype):
    rng = np.random.default_rng(hash((qtype, str(dtype))) % 2**32)
    rows, cols = 37, odd_cols(qtype)
    weight = random_weight(qtype, rows, cols, rng)
    want = reference(weight, qtype, cols)
    out = torch.full((rows, cols), float("nan"), dtype=dtype, device=CUDA)  # poisoned: every element must be written
    ops.dequantize(weight.to(CUDA), qtype, cols, out=out, dtype=dtype)
    if dtype == torch.float32:
        torch.testing.assert_close(out.cpu(), want, rtol=1e-6, atol=1e-7)
    else:
        torch.testing.assert_close(out.cpu(), want.half(), rtol=1e-3, atol=1e-6)


def test_dequantize_gathers_rows():
    rng = np.random.default_rng(1)
    weight = random_weight("Q8_0", 50, 64, rng)
    rows = torch.tensor([3, 49, 0, 3], dtype=torch.int64)
    out = ops.dequantize(weight.to(CUDA), "Q8_0", 64, rows=rows.to(CUDA), dtype=torch.float32)
    torch.testing.assert_close(out.cpu(), reference(weight, "Q8_0", 64)[rows], rtol=1e-6, atol=1e-7)


def gemv_tolerance(qtype: str, fast: bool) -> float:
    """fp32 accumulation: float rounding; Q4_0's fast path sums 8 products in fp16 first."""
    return 1e-3 if fast and qtype in ops.FAST_TYPES else 2e-6


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("batch", [1, 3, 8, 11])
@pytest.mark.parametrize("fast", [False, True])
def test_gemv_matches_float64(qtype, batch, fast):
    rng = np.random.default_rng(hash((qtype, batch)) % 2**32)
    rows, cols = 45, odd_cols(qtype)
    weight = random_weight(qtype, rows, cols, rng)
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch)).half()
    want = x.double() @ reference(weight, qtype, cols).double().t()
    out = torch.full((batch, rows), float("nan"), device=CUDA)
    ops.gemv([weight.to(CUDA)], qtype, x.to(CUDA), [out], fast=fast)
    assert rel_error(out, want) < gemv_tolerance(qtype, fast)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
@pytest.mark.parametrize("fast", [False, True])
def test_repacked_layout_computes_the_same(qtype, fast):
    """Resident Q4_0/Q8_0 rows rewritten into the GPU layout: dequantization and GEMV (also the swiglu form)
    against the reference of the original blocks."""
    rng = np.random.default_rng(11)
    rows, cols = 41, 768
    weight = random_weight(qtype, rows, cols, rng)
    want = reference(weight, qtype, cols)
    gpu = weight.to(CUDA)
    scratch = torch.empty(gpu.numel() + 5, dtype=torch.uint8, device=CUDA)
    repacked = ops.repack(gpu, qtype, cols, scratch)
    assert repacked == qtype + "R" and not torch.equal(gpu.cpu(), weight)
    torch.testing.assert_close(ops.dequantize(gpu, repacked, cols, dtype=torch.float32).cpu(), want,
                               rtol=1e-6, atol=1e-7)
    x = torch.randn(3, cols).half()
    out = torch.full((3, rows), float("nan"), device=CUDA)
    ops.gemv([gpu], repacked, x.to(CUDA), [out], fast=fast)
    assert rel_error(out, x.double() @ want.double().t()) < gemv_tolerance(repacked, fast)
    act = torch.empty(3, rows, dtype=torch.float16, device=CUDA)
    ops.gemv_swiglu(gpu, gpu, repacked, (x * 0.02).half().to(CUDA), act, fast=fast)
    y = (x * 0.02).half().double() @ want.double().t()
    assert rel_error(act, F.silu(y) * y) < 2e-3
    with pytest.raises(ValueError, match="multiple of 256"):
        ops.repack(random_weight(qtype, 2, 224, rng).to(CUDA), qtype, 224, scratch)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q6_K", "F16"])
def test_gemv_three_matrices_and_accumulate(qtype):
    rng = np.random.default_rng(7)
    cols = 512
    weights = [random_weight(qtype, n, cols, rng) for n in (64, 19, 19)]
    x = torch.randn(2, cols).half()
    start = [torch.randn(2, w.shape[0]) for w in weights]
    outs = [s.to(CUDA) for s in start]
    ops.gemv([w.to(CUDA) for w in weights], qtype, x.to(CUDA), outs, accumulate=True)
    for w, s, out in zip(weights, start, outs, strict=True):
        want = s.double() + x.double() @ reference(w, qtype, cols).double().t()
        assert rel_error(out, want) < 2e-6


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K", "Q8_0"])
def test_gemv_swiglu(qtype):
    rng = np.random.default_rng(3)
    rows, cols = 77, 1024
    gate, up = random_weight(qtype, rows, cols, rng), random_weight(qtype, rows, cols, rng)
    x = (torch.randn(4, cols) * 0.02).half()  # keeps silu(g) * u inside fp16's range
    g = x.double() @ reference(gate, qtype, cols).double().t()
    u = x.double() @ reference(up, qtype, cols).double().t()
    want = F.silu(g) * u
    out = torch.empty(4, rows, dtype=torch.float16, device=CUDA)
    ops.gemv_swiglu(gate.to(CUDA), up.to(CUDA), qtype, x.to(CUDA), out)
    assert rel_error(out, want) < 1e-3


@pytest.mark.parametrize("rows,d", [(1, 576), (5, 4096), (3, 100)])
def test_rmsnorm_matches_cpu_forward(rows, d):
    from gdsllm_llama.forward import rms_norm

    x, w = torch.randn(rows, d) * 3, torch.randn(d)
    want = rms_norm(x.double(), w.double(), 1e-5)
    out = ops.rmsnorm(x.to(CUDA), w.to(CUDA), 1e-5)
    assert rel_error(out, want) < 1e-3


def test_swiglu_elementwise():
    g, u = torch.randn(7, 333).half(), torch.randn(7, 333).half()
    out = ops.swiglu(g.to(CUDA), u.to(CUDA))
    assert rel_error(out, F.silu(g.double()) * u.double()) < 1e-3


def seq_caches(n_layers: int, max_tokens: list[int], n_kv: int, hd: int, fill=torch.zeros):
    """Per-sequence fp16 caches [n_layers, max_T, n_kv, hd] on the GPU, each of its own length (own layer stride)."""
    ks = [fill(n_layers, t, n_kv, hd).half().to(CUDA) for t in max_tokens]
    vs = [fill(n_layers, t, n_kv, hd).half().to(CUDA) for t in max_tokens]
    return ks, vs


@pytest.mark.parametrize("n_head,n_kv,hd,tokens,starts", [(9, 3, 64, 1, [0, 5, 1000]), (4, 4, 128, 5, [1000]),
                                                          (8, 2, 64, 3, [17, 0]), (8, 2, 128, 1, [3, 0, 40])])
def test_rope_store_batched_matches_cpu_forward(n_head, n_kv, hd, tokens, starts):
    """B sequences of T tokens at their own positions, into layer 1 of caches of different sizes: q rotated,
    k rotated and v copied into the right sequence's cache at the right place, nothing written elsewhere."""
    from gdsllm_llama.forward import apply_rope, rope_tables

    B, layer = len(starts), 1
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
    q, k, v = (torch.randn(B * tokens, n * hd) for n in (n_head, n_kv, n_kv))
    ks, vs = seq_caches(2, [start + tokens + 3 + 7 * b for b, start in enumerate(starts)], n_kv, hd)
    slots = ops.seq_slots(ks, vs, starts, [start + tokens for start in starts]).to(CUDA)
    q_out = torch.full((B * tokens, n_head * hd), float("nan"), dtype=torch.float16, device=CUDA)
    ops.rope_store(q.to(CUDA), k.to(CUDA), v.to(CUDA), slots, layer, inv_freq.to(CUDA), n_head, n_kv, hd, hd, True,
                   q_out)
    for b, start in enumerate(starts):
        rows = slice(b * tokens, (b + 1) * tokens)
        cos, sin = rope_tables(inv_freq.double(), torch.arange(start, start + tokens))
        want_q = apply_rope(q[rows].double().view(tokens, n_head, hd), cos, sin).reshape(tokens, -1)
        want_k = apply_rope(k[rows].double().view(tokens, n_kv, hd), cos, sin)
        assert rel_error(q_out[rows], want_q) < 1e-3
        assert rel_error(ks[b][layer, start:start + tokens], want_k) < 1e-3
        assert rel_error(vs[b][layer, start:start + tokens], v[rows].view(tokens, n_kv, hd).double()) < 1e-3
        for cache in (ks[b], vs[b]):  # nothing written elsewhere
            assert not cache[0].any() and not cache[layer, :start].any() and not cache[layer, start + tokens:].any()


@pytest.mark.parametrize("n_head,n_kv,hd,lengths", [(9, 3, 64, [1, 37, 300]), (32, 32, 128, [37, 1, 5]),
                                                    (8, 2, 128, [1000, 1, 4097]), (4, 1, 64, [4097]),
                                                    (32, 8, 128, [1 + 29 * i for i in range(32)])])
def test_attention_decode_batched_matches_cpu_forward(n_head, n_kv, hd, lengths):
    """One new token of each of B sequences over its own length of layer 1 of its own cache (GQA, head_dim 64 and
    128, from 1 position to more than every split can hold at once, up to 32 sequences: one split each)."""
    from gdsllm_llama.forward import attend

    B, layer = len(lengths), 1
    q = torch.randn(B, n_head, hd).half()
    ks, vs = seq_caches(2, [n + 5 + b for b, n in enumerate(lengths)], n_kv, hd, fill=torch.randn)
    slots = ops.seq_slots(ks, vs, [n - 1 for n in lengths], lengths).to(CUDA)
    out = torch.full((B, n_head, hd), float("nan"), dtype=torch.float16, device=CUDA)
    ops.attention_decode(q.to(CUDA), slots, layer, n_kv, 1.0 / math.sqrt(hd), out,
                         ops.attention_scratch(n_head, hd, CUDA, max_batch=B))
    for b, n in enumerate(lengths):
        k, v = ks[b][layer, :n].cpu().double(), vs[b][layer, :n].cpu().double()
        want = attend(q[b].double().view(n_head, 1, hd), k.transpose(0, 1), v.transpose(0, 1), n - 1)
        assert rel_error(out[b], want.view(n_head, hd)) < 2e-3, f"sequence {b} (length {n})"


def test_launchers_reject_bad_input():
    weight = random_weight("Q4_0", 4, 64, np.random.default_rng(0)).to(CUDA)
    x = torch.randn(1, 64, device=CUDA).half()
    out = torch.empty(1, 4, device=CUDA)
    with pytest.raises(ValueError, match="float16"):
        ops.gemv([weight], "Q4_0", x.float(), [out])
    with pytest.raises(ValueError, match="shape"):
        ops.gemv([weight], "Q4_0", x, [torch.empty(1, 5, device=CUDA)])
    with pytest.raises(ValueError, match="B >= 1"):
        ops.gemv([weight], "Q4_0", torch.empty(0, 64, device=CUDA).half(), [torch.empty(0, 4, device=CUDA)])
    with pytest.raises(ValueError, match="no GPU kernel"):
        ops.dequantize(weight, "IQ2_XS", 64)
    with pytest.raises(ValueError, match="multiple of"):
        ops.dequantize(weight, "Q4_0", 48)
    ks, vs = seq_caches(1, [4], 1, 96)
    slots = ops.seq_slots(ks, vs, [0], [1]).to(CUDA)
    q96 = torch.zeros(1, 2, 96, dtype=torch.float16, device=CUDA)
    with pytest.raises(ValueError, match="head_dim"):
        ops.attention_decode(q96, slots, 0, 1, 1.0, torch.zeros_like(q96), ops.attention_scratch(2, 96, CUDA))
    q = torch.zeros(2, 2, 64, dtype=torch.float16, device=CUDA)
    with pytest.raises(ValueError, match="2 sequences but slots 1"):
        ops.attention_decode(q, slots, 0, 1, 1.0, torch.zeros_like(q), ops.attention_scratch(2, 64, CUDA, 2))
    with pytest.raises(ValueError, match="too small"):
        ops.attention_decode(q, torch.cat([slots, slots]), 0, 1, 1.0, torch.zeros_like(q),
                             ops.attention_scratch(2, 64, CUDA))
    with pytest.raises(ValueError, match="outside a cache of 4 tokens"):
        ops.seq_slots(ks, vs, [4], [5])
