"""Choosing the storage backend (GDSLLM_IO=auto|cufile|posix|cpu) and remembering why.

auto: cufile if it really works on the model's file system (driver open + a handle registered there), else posix
(O_DIRECT through pinned bounce buffers), else cpu. Every backend has `.name`, `.reason` (why it was chosen) and
`.fallbacks` (why each better one was not)."""

import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from gdsllm_core import settings
from gdsllm_core.errors import BackendUnavailableError, BadRequestError
from gdsllm_core.storage.reader import CHUNK_BYTES, CpuBackend

CHOICES = ("auto", "cufile", "posix", "cpu")

_cache: dict[tuple, object] = {}
_cache_lock = threading.Lock()


def gpu_status(device: str | torch.device | None = None) -> tuple[bool, str]:
    """(usable, why): is there a CUDA GPU to read into? Never raises; touches CUDA only when asked."""
    wanted = str(device) if device is not None else settings.device()
    if wanted.startswith("cpu"):
        return False, f"device {wanted!r} requested (GDSLLM_DEVICE / device argument)"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build (no CUDA support compiled in)"
    if not torch.cuda.is_available():
        if not any(Path("/dev").glob("nvidia[0-9]*")):
            return False, "no NVIDIA driver or GPU: /dev/nvidia* is absent (torch.cuda.is_available() is False)"
        return False, ("torch.cuda.is_available() is False: the NVIDIA driver may be older than torch's CUDA "
                       f"{torch.version.cuda}, or CUDA_VISIBLE_DEVICES hides every GPU")
    return True, f"{torch.cuda.device_count()} CUDA device(s), torch CUDA {torch.version.cuda}"


def choose_backend(device: str | torch.device | None = None, probe_path: Path | None = None, refresh: bool = False):
    """The backend to use for reads into `device` memory (default: GDSLLM_DEVICE, else the GPU when there is one).

    `probe_path` is where the model's files live (default GDSLLM_MODEL_ROOT): cuFile is probed on that file system.
    A forced backend (GDSLLM_IO=cufile|posix) that cannot run raises BackendUnavailableError saying why."""
    requested = settings.io_backend()
    if requested not in CHOICES:
        raise BadRequestError(f"GDSLLM_IO={requested!r} is not a storage backend", f"use one of {', '.join(CHOICES)}")
    probe_path = Path(probe_path) if probe_path is not None else settings.model_root()
    key = (requested, str(device), _filesystem_id(probe_path))
    with _cache_lock:
        if refresh or key not in _cache:
            _cache[key] = _build(requested, device, probe_path)
        return _cache[key]


def _filesystem_id(path: Path) -> int:
    existing = path if path.exists() else next((p for p in path.parents if p.exists()), Path("/"))
    return os.stat(existing).st_dev


def _build(requested: str, device, probe_path: Path):
    if requested == "cpu":
        return CpuBackend("GDSLLM_IO=cpu: plain pread into host memory")
    has_gpu, gpu_reason = gpu_status(device)
    if requested == "posix":
        from gdsllm_core.storage.posix import PosixBackend

        return PosixBackend(reason="GDSLLM_IO=posix: O_DIRECT reads" + (
            " into pinned bounce buffers, async copies to the GPU" if has_gpu else f" into host memory ({gpu_reason})"))
    if requested == "cufile":
        if not has_gpu:
            raise BackendUnavailableError(f"GDSLLM_IO=cufile but there is no usable GPU: {gpu_reason}",
                                          "unset GDSLLM_IO (auto) or set GDSLLM_IO=posix or cpu")
        try:
            return _cufile_backend(probe_path, [])
        except Exception as exc:
            raise BackendUnavailableError(f"GDSLLM_IO=cufile but cuFile cannot be used here: {exc}",
                                          "unset GDSLLM_IO (auto) to fall back to posix, or see `gdsllm doctor`"
                                          ) from exc
    fallbacks: list[str] = []
    if not has_gpu:
        fallbacks.append(f"cufile: no GPU ({gpu_reason})")
        fallbacks.append("posix: only worth it for GPU destinations (pinned staging + async copies)")
        return CpuBackend(f"no GPU: reading into host memory ({gpu_reason})", fallbacks)
    try:
        return _cufile_backend(probe_path, fallbacks)
    except Exception as exc:
        fallbacks.append(f"cufile: {exc}")
    try:
        from gdsllm_core.storage.posix import PosixBackend

        return PosixBackend(reason="cuFile unusable here: O_DIRECT reads into pinned bounce buffers, "
                                   "async copies to the GPU on a side stream", fallbacks=fallbacks)
    except Exception as exc:  # pinned memory could not be had
        fallbacks.append(f"posix: {exc}")
    return CpuBackend("neither cuFile nor pinned staging works here: plain pread into host memory", fallbacks)


def _cufile_backend(probe_path: Path, fallbacks: list[str]):
    from gdsllm_core.storage import cufile

    torch.cuda.init()  # cuFile then shares torch's primary context
    mode = cufile.probe(probe_path)
    return cufile.CufileBackend(reason=f"{mode}; handle registered on {probe_path}", fallbacks=fallbacks)


# -- whole-file reads (doctor, benchmark) ----------------------------------------------------------------------

def read_file(backend, path: Path, dest: torch.Tensor, threads: int = 8, chunk_bytes: int = CHUNK_BYTES) -> float:
    """Read the whole of `path` into `dest` (uint8, at least the file's size) with `threads` readers in
    `chunk_bytes` pieces; returns the seconds taken until every byte has landed."""
    nbytes = os.stat(path).st_size
    handle = backend.open(path)
    try:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gdsllm-read") as pool:
            began = time.perf_counter()
            jobs = [pool.submit(backend.read_into, handle, start, min(chunk_bytes, nbytes - start), dest, start)
                    for start in range(0, nbytes, chunk_bytes)]
            for job in jobs:
                job.result()
            if dest.is_cuda:
                torch.cuda.synchronize(dest.device)
            return time.perf_counter() - began
    finally:
        backend.close(handle)


def drop_page_cache(path: Path, everything: bool = False) -> str:
    """Make the next read of `path` come from the disk; returns how it was done. By default only this file's pages
    are evicted (fsync + POSIX_FADV_DONTNEED, no root needed, other programs' caches untouched); everything=True
    drops the whole page cache first when root (echo 3 > /proc/sys/vm/drop_caches), as a benchmark wants."""
    os.sync()
    if everything:
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            return "page cache dropped (echo 3 > /proc/sys/vm/drop_caches)"
        except OSError:
            pass
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return "file evicted from the page cache (fsync + posix_fadvise DONTNEED)"


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free
