"""`gdsllm doctor`: what this machine offers gdsllm (GPU, cuFile, NVRTC), which storage backend runs and why, and
how fast it reads a file from the model root's file system."""

import importlib.metadata
import os
import platform
import re
import sys
import tempfile
from pathlib import Path

import msgspec
import numpy as np
import torch

from gdsllm_core import __version__, cpu_threads, settings
from gdsllm_core.storage import backends
from gdsllm_core.storage.pinned import aligned_host_buffer

SPEED_BYTES = 256 << 20


class GpuInfo(msgspec.Struct):
    index: int
    name: str
    memory_bytes: int
    compute_capability: str


class ReadSpeed(msgspec.Struct):
    backend: str
    nbytes: int
    seconds: float
    gb_per_s: float
    destination: str  # "cuda:0" or "host"
    cache: str  # how the page cache was emptied before the read
    warm_page_cache: bool  # True when the figure may come from RAM rather than the disk
    verified: bool  # the bytes that landed equal pread of the same file


class CuFileStatus(msgspec.Struct):
    library: str | None  # path of libcufile, None when not found
    library_detail: str  # version, or why it was not found
    nvidia_fs: bool  # /proc/driver/nvidia-fs: true GDS (storage DMA into GPU memory) is possible
    config: str | None  # cufile.json in effect
    compat_mode_allowed: bool | None
    mode: str  # gds | compat | unavailable
    probe: str  # result of driver open + handle register on the model root's file system
    probe_ok: bool
    udev_record: str | None  # the udev entry cuFile reads for the model root's block device
    batch_api: bool


class DoctorReport(msgspec.Struct):
    gdsllm: str
    python: str
    platform: str
    torch: str
    torch_cuda: str | None
    cupy: str | None
    cpu_threads: str  # torch's thread count and how idle threads wait (see gdsllm_core.cpu_threads)
    nvrtc: str
    gpus: list[GpuInfo]
    gpu_status: str
    driver: str | None
    cufile: CuFileStatus
    model_root: str
    backend: str
    backend_reason: str
    fallbacks: list[str]
    read_speed: ReadSpeed | None
    read_speed_note: str
    hints: list[str]


def collect(model_root: Path | None = None, speed_bytes: int = SPEED_BYTES) -> DoctorReport:
    """Build the report; speed_bytes=0 skips the read-speed test."""
    root = Path(model_root) if model_root is not None else settings.model_root()
    has_gpu, gpu_reason = backends.gpu_status()
    hints: list[str] = []
    cufile_status = _cufile_status(root, has_gpu, gpu_reason, hints)
    try:
        backend = backends.choose_backend(probe_path=root, refresh=True)
        name, reason, fallbacks = backend.name, backend.reason, list(backend.fallbacks)
    except Exception as exc:
        backend, name, reason, fallbacks = None, "none", str(exc), []
    speed, speed_note = None, "skipped (--no-speed)"
    if backend is not None and speed_bytes:
        speed, speed_note = _read_speed(backend, root, speed_bytes, has_gpu)
    return DoctorReport(
        gdsllm=__version__, python=sys.version.split()[0], platform=platform.platform(),
        torch=str(torch.__version__), torch_cuda=torch.version.cuda, cupy=_version("cupy", "cupy-cuda13x", "cupy-cuda12x"),
        cpu_threads=cpu_threads.describe(), nvrtc=_nvrtc(), gpus=_gpus() if has_gpu else [], gpu_status=gpu_reason,
        driver=_driver(),
        cufile=cufile_status, model_root=str(root), backend=name, backend_reason=reason, fallbacks=fallbacks,
        read_speed=speed, read_speed_note=speed_note, hints=hints)


def _version(*distributions: str) -> str | None:
    for distribution in distributions:
        try:
            return f"{importlib.metadata.version(distribution)} ({distribution})"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _nvrtc() -> str:
    try:
        from cupy_backends.cuda.libs import nvrtc

        major, minor = nvrtc.getVersion()
        return f"{major}.{minor}"
    except Exception as exc:
        return f"unavailable: {type(exc).__name__}: {exc}"


def _gpus() -> list[GpuInfo]:
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append(GpuInfo(index, props.name, props.total_memory, f"{props.major}.{props.minor}"))
    return gpus


def _driver() -> str | None:
    version_file = Path("/proc/driver/nvidia/version")
    if version_file.is_file():
        first = version_file.read_text().splitlines()[0]  # "NVRM version: NVIDIA UNIX ... Module  580.159.04  ..."
        match = re.search(r"\s(\d+\.\d+(?:\.\d+)*)\s", first)
        return match.group(1) if match else first
    return None


def _cufile_status(root: Path, has_gpu: bool, gpu_reason: str, hints: list[str]) -> CuFileStatus:
    from gdsllm_core.storage import cufile

    env = cufile.environment()
    try:
        udev = str(cufile.udev_record_path(_existing(root)))
    except OSError:
        udev = None
    try:
        lib = cufile.library()
        library, detail, batch = lib.path, f"cuFileGetVersion {lib.version() or 'not exported'}", lib.has_batch
    except cufile.CuFileUnavailable as exc:
        library, detail, batch = None, str(exc), False
    probe_ok = False
    if library is None:
        probe = "not run: libcufile not found"
    elif not has_gpu:
        probe = f"not run: no GPU ({gpu_reason})"
    else:
        try:
            torch.cuda.init()
            probe, probe_ok = cufile.probe(root), True
        except Exception as exc:
            probe = str(exc)
            if getattr(exc, "code", None) == 5027 and udev:
                hints.append(f"cuFile found no udev record {udev} for the model root's disk. Create it to use cuFile "
                             f"(compat mode): mkdir -p /run/udev/data; printf 'E:ID_FS_USAGE=filesystem\\n"
                             f"E:ID_FS_TYPE={_fs_type(root)}\\n' > {udev}")
    if library is not None and not env.nvidia_fs:
        hints.append("nvidia-fs is not loaded: no true GPUDirect Storage; cuFile can only run in compat mode")
    return CuFileStatus(library, detail, env.nvidia_fs, env.config_path, env.allow_compat_mode, env.mode, probe,
                        probe_ok, udev if udev and Path(udev).exists() else (f"absent ({udev})" if udev else None),
                        batch)


def _existing(path: Path) -> Path:
    return path if path.exists() else next(p for p in path.parents if p.exists())


def _fs_type(path: Path) -> str:
    """The file system type of `path` from /proc/self/mounts (longest matching mount point)."""
    target, best, kind = str(_existing(path).resolve()), -1, "ext4"
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        mount = fields[1]
        if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) > best:
            best, kind = len(mount), fields[2]
    return kind


def _read_speed(backend, root: Path, nbytes: int, has_gpu: bool) -> tuple[ReadSpeed | None, str]:
    """Write a scratch file of `nbytes` in the model root, empty the page cache, read it back with `backend`."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        if backends.free_bytes(root) < 2 * nbytes:
            return None, f"skipped: less than {2 * nbytes >> 20} MiB free in {root}"
        with tempfile.NamedTemporaryFile(dir=root, prefix=".gdsllm-doctor-", suffix=".bin") as scratch:
            block = np.random.default_rng().integers(0, 256, 16 << 20, dtype=np.uint8).tobytes()
            for start in range(0, nbytes, len(block)):
                scratch.write(block[:nbytes - start])
            scratch.flush()
            path = Path(scratch.name)
            cache = backends.drop_page_cache(path)
            on_gpu = has_gpu and backend.name != "cpu"
            dest = torch.empty(nbytes, dtype=torch.uint8, device="cuda") if on_gpu else aligned_host_buffer(nbytes, False)
            seconds = backends.read_file(backend, path, dest)
            fd = os.open(path, os.O_RDONLY)
            try:
                sample = min(nbytes, 1 << 20)
                verified = (dest[:sample].cpu().numpy().tobytes() == os.pread(fd, sample, 0) and
                            dest[nbytes - sample:].cpu().numpy().tobytes() == os.pread(fd, sample, nbytes - sample))
            finally:
                os.close(fd)
        speed = ReadSpeed(backend.name, nbytes, seconds, nbytes / seconds / 1e9, str(dest.device) if on_gpu else "host",
                          cache, warm_page_cache=False, verified=verified)
        return speed, f"{nbytes >> 20} MiB scratch file in {root}, cold (page cache emptied first)"
    except Exception as exc:  # the speed figure is a nicety: report why it is missing, never fail the doctor
        return None, f"failed: {type(exc).__name__}: {exc}"
