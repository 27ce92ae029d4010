"""Loader for the CUDA kernels in this folder (`*.cu`, one file per op family) and in plugins' kernel folders.

A plugin ships its own `.cu` files in a folder of its package and passes that folder to `get_kernel`/`launch`
(`folder=`); its sources may `#include` this folder's headers (`ggml_blocks.cuh`, `seq_slots.cuh`).

Modules are compiled with NVRTC through CuPy the first time a kernel is asked for, never at import. Each source is
prefixed with a `#line` directive so compile errors name the `.cu` file; the program is named by its full path so
`#include "ggml_blocks.cuh"` resolves beside it. Kernels run on torch's current stream: torch owns tensors and
streams, CuPy only launches.
"""

from functools import cache
from pathlib import Path

import numpy as np
import torch

KERNEL_DIR = Path(__file__).resolve().parent
NVRTC_OPTIONS = ("-std=c++17",)
# Template instances the compile check builds (every block decoder, each gemv mode, each attention head size).
IQ_CODES = range(32, 42)  # the I-quants and MXFP4 (ops.QTYPE_CODES)
CHECK_INSTANCES = {
    "dequant.cu": tuple(f"dequant<{code},0>" for code in (*range(15), *IQ_CODES)) + ("dequant<3,1>", "dequant<34,1>"),
    "gemv.cu": tuple(f"gemv<{code},1,1,0,false>" for code in (*range(15), *IQ_CODES))
    + tuple(f"gemv<{code},4,2,1,false>" for code in IQ_CODES) + tuple(f"gemv<{code},2,1,2,false>" for code in IQ_CODES)
    + ("gemv<3,1,1,0,true>", "gemv<7,4,2,1,false>", "gemv<13,1,1,2,true>", "gemv<14,1,1,0,false>",
       "gemv<10,2,1,2,false>"),
    "gemv_mma.cu": tuple(f"gemv_mma<{code},{nt},{mode}>" for code in (13, 14) for nt in (1, 2) for mode in (0, 1, 2)),
    "repack.cu": ("repack<3>", "repack<7>"),
    "attention.cu": tuple(f"attn_{part}<{hd}>" for part in ("partial", "combine") for hd in (64, 128, 256)),
    "affine.cu": tuple(f"affine_dequant<{bits},2,2>" for bits in (1, 2, 3, 4, 5, 6, 8))
    + ("affine_dequant<4,0,0>", "affine_dequant<3,1,0>", "affine_dequant<8,2,1>")
    + tuple(f"affine_gemv<{bits},2,2,1,1>" for bits in (2, 3, 4, 5, 6, 8))
    + ("affine_gemv<4,2,2,8,2>", "affine_gemv<8,1,0,3,2>", "affine_gemv<6,0,1,2,1>")
    + ("affine_swiglu<4,2,2,1,1>", "affine_swiglu<3,1,0,4,2>", "affine_swiglu<8,0,1,8,1>")
    + ("affine_swiglu_grouped<4,2,2,1,1>", "affine_gemv_grouped<4,2,2,1,2>", "affine_gemv_grouped<6,0,1,3,1>"),
}


def kernel_sources() -> list[Path]:
    """Every kernel source shipped with the package (what the compile check builds)."""
    return sorted(KERNEL_DIR.glob("*.cu"))


def source_text(file_name: str, folder: Path = KERNEL_DIR) -> str:
    """A source prefixed with a `#line` directive naming its file."""
    path = Path(folder) / file_name
    return f'#line 1 "{path}"\n' + path.read_text()


def include_options(folder: Path) -> tuple[str, ...]:
    """NVRTC options for a source in `folder`: its own folder first, then this package's headers."""
    folders = dict.fromkeys((str(Path(folder).resolve()), str(KERNEL_DIR)))
    return (*NVRTC_OPTIONS, *(f"-I{f}" for f in folders))


@cache
def _module(folder: Path, file_name: str, name_expressions: tuple[str, ...]):
    import cupy

    module = cupy.RawModule(code=source_text(file_name, folder), options=include_options(folder),
                            name_expressions=list(name_expressions) or None)
    module.compile()
    return module


@cache
def get_kernel(file_name: str, name: str, folder: Path = KERNEL_DIR):
    """The kernel `name` (a plain extern "C" name or a template instance such as `gemv<2,1,0>`) of `file_name` in
    `folder` (this package's, or a plugin's kernel folder)."""
    templated = "<" in name
    module = _module(Path(folder), file_name, (name,) if templated else ())
    return module.get_function(name)


@cache
def _external_stream(handle: int, device: int):
    import cupy

    return cupy.cuda.ExternalStream(handle, device)


def current_stream():
    """Torch's current CUDA stream as a CuPy stream object (cached per handle)."""
    stream = torch.cuda.current_stream()
    return _external_stream(stream.cuda_stream, stream.device_index)


def ptr(tensor: torch.Tensor | None) -> np.uint64:
    """A tensor's device address as a kernel argument (0 for None)."""
    return np.uint64(0 if tensor is None else tensor.data_ptr())


def launch(file_name: str, name: str, grid: tuple[int, ...], block: tuple[int, ...], args: tuple,
           shared_mem: int = 0, folder: Path = KERNEL_DIR) -> None:
    """Launch a kernel of `folder` on torch's current stream."""
    kernel = get_kernel(file_name, name, folder)
    kernel(grid, block, args, stream=current_stream(), shared_mem=shared_mem)


def compile_for_arch(path: Path, arch: str = "sm_90", instances: tuple[str, ...] | None = None) -> bytes:
    """Compile one source (and its template `instances`, by default its CHECK_INSTANCES) to a cubin with NVRTC, no
    GPU needed: the CI compile check, for this package's sources and plugins' alike. Raises RuntimeError with the
    compiler log on failure."""
    from cupy_backends.cuda.libs import nvrtc

    path = Path(path).resolve()
    program = nvrtc.createProgram(source_text(path.name, path.parent), str(path), [], [])
    for name in CHECK_INSTANCES.get(path.name, ()) if instances is None else instances:
        nvrtc.addNameExpression(program, name)
    try:
        nvrtc.compileProgram(program, [f"-arch={arch}", *include_options(path.parent)])
    except Exception as exc:
        raise RuntimeError(f"{path.name} does not compile:\n{nvrtc.getProgramLog(program)}") from exc
    return nvrtc.getCUBIN(program)
