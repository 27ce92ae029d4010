"""The I-quant and MXFP4 kernels (dequantize, GEMV, gated GEMV) against the CPU dequantization (bit-exact with
gguf-py): on blocks written by llama-quantize (tests/unit/data) and on random blocks reaching every grid point."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))  # the CPU tests' block makers and fixture
from test_quant_iq import NEW_TYPES, fixture_tensors, random_blocks  # noqa: E402

from gdsllm_core.quant.ggml import dequantize as cpu_dequantize  # noqa: E402
from gdsllm_kernels import ops  # noqa: E402

CUDA = torch.device("cuda")


def weight_and_reference(qtype: str, source: str, rows: int = 37) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(raw blocks, their CPU dequantization, columns): llama-quantize's rows or random blocks of odd size."""
    if source == "llama-quantize":
        raw = torch.from_numpy(fixture_tensors()[qtype])
    else:
        cols = 256 * 3 if ops.BLOCKS[qtype][0] == 256 else 32 * 7
        raw = torch.from_numpy(random_blocks(qtype, rows, cols, np.random.default_rng(NEW_TYPES.index(qtype))))
    want = cpu_dequantize(raw, qtype)
    return raw, want, want.shape[1]


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    assert torch.isfinite(got).all()
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize("source", ["llama-quantize", "random"])
@pytest.mark.parametrize("qtype", NEW_TYPES)
def test_dequantize_matches_cpu(qtype, source):
    raw, want, cols = weight_and_reference(qtype, source)
    out = torch.full(tuple(want.shape), float("nan"), device=CUDA)  # poisoned: every element must be written
    ops.dequantize(raw.to(CUDA), qtype, cols, out=out, dtype=torch.float32)
    torch.testing.assert_close(out.cpu(), want, rtol=0, atol=0)  # the same float32 operations, in the same order
    half = ops.dequantize(raw.to(CUDA), qtype, cols, dtype=torch.float16)
    torch.testing.assert_close(half.cpu(), want.half(), rtol=1e-3, atol=1e-6)
    picked = torch.tensor([2, 0, 2], dtype=torch.int64)
    gathered = ops.dequantize(raw.to(CUDA), qtype, cols, rows=picked.to(CUDA), dtype=torch.float32)
    torch.testing.assert_close(gathered.cpu(), want[picked], rtol=0, atol=0)


@pytest.mark.parametrize("source", ["llama-quantize", "random"])
@pytest.mark.parametrize("batch", [1, 3, 8, 11])
@pytest.mark.parametrize("qtype", NEW_TYPES)
def test_gemv_matches_float64(qtype, batch, source):
    raw, want, cols = weight_and_reference(qtype, source)
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch)).half()
    out = torch.full((batch, raw.shape[0]), float("nan"), device=CUDA)
    ops.gemv([raw.to(CUDA)], qtype, x.to(CUDA), [out])
    assert rel_error(out, x.double() @ want.double().t()) < 2e-6
    start = torch.randn(batch, raw.shape[0])
    acc = start.to(CUDA)
    ops.gemv([raw.to(CUDA)], qtype, x.to(CUDA), [acc], accumulate=True)
    assert rel_error(acc, start.double() + x.double() @ want.double().t()) < 2e-6


@pytest.mark.parametrize("qtype", NEW_TYPES)
def test_gemv_swiglu(qtype):
    gate, gate_ref, cols = weight_and_reference(qtype, "random", rows=40)
    up = torch.from_numpy(random_blocks(qtype, 40, cols, np.random.default_rng(99)))
    up_ref = cpu_dequantize(up, qtype)
    x = (torch.randn(3, cols, generator=torch.Generator().manual_seed(5)) * 0.05).half()
    out = torch.empty(3, 40, dtype=torch.float16, device=CUDA)
    ops.gemv_swiglu(gate.to(CUDA), up.to(CUDA), qtype, x.to(CUDA), out)
    g, u = x.double() @ gate_ref.double().t(), x.double() @ up_ref.double().t()
    assert rel_error(out, F.silu(g) * u) < 2e-3
