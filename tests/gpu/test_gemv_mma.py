"""The tensor-core GEMV (kernels/gemv_mma.cu) on repacked Q4_0/Q8_0 weights against float64 products of the
reference dequantization (the LLaMA plugin's ggml decoder, bit-exact with gguf-py): every batch size through 16
and beyond (chunked), several matrices in one launch, accumulation and the gated FFN form."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from test_kernels import CUDA, random_weight, reference, rel_error  # noqa: E402  (same folder)

from gdsllm_kernels import ops  # noqa: E402

TOLERANCE = 1e-3  # weights enter the MMA as fp16 (code x scale rounded once); sums are fp32


def repacked(qtype: str, rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(GPU weight in the repacked layout, its float reference [rows, cols], the repacked type)."""
    weight = random_weight(qtype, rows, cols, np.random.default_rng(seed))
    want = reference(weight, qtype, cols)
    gpu = weight.to(CUDA)
    kind = ops.repack(gpu, qtype, cols, torch.empty(gpu.numel(), dtype=torch.uint8, device=CUDA))
    return gpu, want, kind


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
@pytest.mark.parametrize("batch", [1, 2, 5, 8, 9, 16, 19])
def test_mma_gemv_matches_float64(qtype, batch):
    rows, cols = 48, 1280
    gpu, want, kind = repacked(qtype, rows, cols, batch)
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch)).half()
    out = torch.full((batch, rows), float("nan"), device=CUDA)  # poisoned: every element must be written
    ops.gemv([gpu], kind, x.to(CUDA), [out], tensor_cores=True)
    assert rel_error(out, x.double() @ want.double().t()) < TOLERANCE


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_mma_three_matrices_accumulate(qtype):
    cols = 768
    parts = [repacked(qtype, n, cols, seed) for seed, n in enumerate((64, 32, 16))]
    x = torch.randn(11, cols).half()
    start = [torch.randn(11, want.shape[0]) for _, want, _ in parts]
    outs = [s.to(CUDA) for s in start]
    ops.gemv([gpu for gpu, _, _ in parts], parts[0][2], x.to(CUDA), outs, accumulate=True, tensor_cores=True)
    for (_, want, _), s, out in zip(parts, start, outs, strict=True):
        assert rel_error(out, s.double() + x.double() @ want.double().t()) < TOLERANCE


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
@pytest.mark.parametrize("batch", [1, 6, 13])
def test_mma_swiglu(qtype, batch):
    rows, cols = 80, 1024
    gate, g_want, kind = repacked(qtype, rows, cols, 1)
    up, u_want, _ = repacked(qtype, rows, cols, 2)
    x = (torch.randn(batch, cols) * 0.02).half()  # keeps silu(g) * u inside fp16's range
    g, u = x.double() @ g_want.double().t(), x.double() @ u_want.double().t()
    out = torch.full((batch, rows), float("nan"), dtype=torch.float16, device=CUDA)
    ops.gemv_swiglu(gate, up, kind, x.to(CUDA), out, tensor_cores=True)
    assert rel_error(out, F.silu(g) * u) < 2e-3


def test_default_picks_mma_and_agrees_with_simt():
    gpu, want, kind = repacked("Q4_0", 4096 // 8, 4096, 5)
    assert ops.use_mma(kind, [gpu.shape[0]]) and not ops.use_mma("Q4_0", [gpu.shape[0]])
    x = torch.randn(8, 4096).half().to(CUDA)
    mma, simt = (torch.empty(8, gpu.shape[0], device=CUDA) for _ in range(2))
    ops.gemv([gpu], kind, x, [mma], tensor_cores=True)
    ops.gemv([gpu], kind, x, [simt], tensor_cores=False)
    assert rel_error(mma, simt) < TOLERANCE


def test_mma_refuses_rows_off_the_tile():
    gpu, _, kind = repacked("Q8_0", 40, 256, 3)
    out = torch.empty(1, 40, device=CUDA)
    with pytest.raises(ValueError, match="multiple of 16 rows"):
        ops.gemv([gpu], kind, torch.randn(1, 256).half().to(CUDA), [out], tensor_cores=True)
    ops.gemv([gpu], kind, torch.randn(1, 256).half().to(CUDA), [out])  # the default falls back to the SIMT kernel
