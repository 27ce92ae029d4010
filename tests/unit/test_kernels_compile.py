"""Every CUDA kernel source compiles with NVRTC for sm_90 (H100/H200), on a machine without a GPU."""

import importlib.util
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARCH = "-arch=sm_90"
INLINE_KERNEL = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>
extern "C" __global__ void gdsllm_selftest_scale_bf16(const __half* x, __nv_bfloat16* y, float s, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = __float2bfloat16(__half2float(x[i]) * s);
}
"""


def kernel_files() -> list[Path]:
    return sorted([*(ROOT / "kernels" / "gdsllm_kernels").glob("*.cu"), *ROOT.glob("plugins/*/*/kernels/*.cu")])


def include_dirs() -> list[str]:
    """Folders holding cuda_fp16.h / cuda_bf16.h: the nvidia-cuda-runtime wheel, then a CUDA toolkit."""
    candidates = []
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidates += [Path(root) / "cu13" / "include", Path(root) / "cuda_runtime" / "include"]
    for variable in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(variable):
            candidates.append(Path(os.environ[variable]) / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    found = [str(c) for c in candidates if (c / "cuda_fp16.h").is_file()]
    cupy_spec = importlib.util.find_spec("cupy")
    if cupy_spec and cupy_spec.origin:
        found.append(str(Path(cupy_spec.origin).parent / "_core" / "include"))
    return found


def compile_cubin(nvrtc, source: str, name: str) -> bytes:
    headers = include_dirs()
    program = nvrtc.createProgram(source, name, [], [])
    try:
        try:
            nvrtc.compileProgram(program, [ARCH, "-std=c++17", *(f"-I{d}" for d in headers)])
        except Exception as exc:
            log = nvrtc.getProgramLog(program)
            where = headers or "EMPTY: no cuda_fp16.h found, install nvidia-cuda-runtime==13.0.*"
            pytest.fail(f"{name} does not compile for {ARCH} ({exc}); include path {where}\n{log}")
        return nvrtc.getCUBIN(program)
    finally:
        nvrtc.destroyProgram(program)


def test_nvrtc_compiles_an_inline_kernel(nvrtc):
    cubin = compile_cubin(nvrtc, INLINE_KERNEL, "gdsllm_selftest.cu")
    assert cubin[:4] == b"\x7fELF", "NVRTC did not return an ELF cubin"
    assert b"gdsllm_selftest_scale_bf16" in cubin, "the kernel's symbol is missing from the cubin"


@pytest.mark.parametrize(
    "path", kernel_files() or [pytest.param(None, marks=pytest.mark.skip(
        reason="no *.cu files under kernels/gdsllm_kernels/ or plugins/*/*/kernels/ yet"))],
    ids=lambda p: str(p.relative_to(ROOT)) if p else "none")
def test_kernel_file_compiles(nvrtc, path):
    source = f'#line 1 "{path}"\n' + path.read_text()
    cubin = compile_cubin(nvrtc, source, str(path))
    assert cubin[:4] == b"\x7fELF"
    missing = [name for name in extern_c_kernels(source) if name.encode() not in cubin]
    assert not missing, f"{path}: kernels missing from the cubin: {missing}"


def extern_c_kernels(source: str) -> list[str]:
    """Names of `extern "C" __global__` kernels declared one by one in a source."""
    return re.findall(r'extern\s+"C"\s+__global__\s+(?:__launch_bounds__\([^)]*\)\s+)?void\s+(\w+)', source)
