"""A ctypes binding of NVIDIA's libcufile (GPUDirect Storage) and the `cufile` storage backend.

Nothing here touches CUDA or loads the library at import time: `library()` loads it on first use. cuFile runs in
one of two modes: GDS (the nvidia-fs kernel module is loaded: NVMe DMAs straight into GPU memory) or compat mode
(no nvidia-fs; `allow_compat_mode` in cufile.json: cuFile itself reads through host memory). cuFileHandleRegister
fails with 5027 when cuFile cannot tell which file system a file lives on (no udev record for its block device).
"""

import ctypes
import ctypes.util
import importlib.util
import json
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from gdsllm_core.storage.posix import PosixBackend, PosixFile
from gdsllm_core.storage.reader import truncated_error

LIBRARY_NAMES = ("libcufile.so.0", "libcufile.so")
NVIDIA_FS_PROC = Path("/proc/driver/nvidia-fs")
DEFAULT_CONFIG = Path("/etc/cufile.json")
HANDLE_TYPE_OPAQUE_FD = 1
BATCH_MODE = 1
OPCODE_READ = 0
STATUS_COMPLETE = 0x10  # CUfileStatus_t

# CUfileOpError codes (cufile.h: 5000 + n) and what they mean to a user.
ERROR_REASONS = {
    5001: "cuFile driver not initialised (cuFileDriverOpen was not called or failed)",
    5002: "cuFile driver properties are invalid",
    5003: "cuFile driver limit not supported",
    5004: "cuFile library and nvidia-fs driver versions do not match",
    5005: "cannot read the nvidia-fs driver version",
    5006: "cuFile driver is closing",
    5007: "this platform is not supported by cuFile",
    5008: "this file system does not support cuFile I/O",
    5009: "this GPU is not supported by cuFile",
    5010: "nvidia-fs driver error",
    5011: "CUDA driver error inside cuFile",
    5012: "the buffer is not a valid CUDA pointer",
    5013: "the buffer's CUDA memory type is not supported",
    5014: "the read runs past the end of the registered buffer",
    5015: "the buffer belongs to another CUDA context",
    5016: "invalid mapping size",
    5017: "invalid mapping range",
    5018: "unsupported file type",
    5019: "the file was opened with unsupported flags",
    5020: "the file was not opened with O_DIRECT",
    5022: "invalid argument",
    5023: "the buffer is already registered",
    5024: "the buffer is not registered",
    5025: "permission denied",
    5026: "the cuFile driver is already open",
    5027: "cuFile cannot identify the filesystem (no udev record / volume attributes)",
    5028: "the file is already registered",
    5029: "no such device",
    5030: "cuFile internal error",
    5031: "cuFile could not get a new file descriptor",
    5033: "nvidia-fs setup error",
    5034: "cuFile I/O is disabled in cufile.json",
    5035: "batch submission failed",
    5036: "pinning GPU memory failed",
    5037: "the batch is full",
    5038: "asynchronous I/O is not supported",
    5043: "cuFile ran out of memory",
    5044: "I/O error",
    5047: "invalid CUDA context",
    5049: "batch I/O is not available in compat mode",
}


class CuFileUnavailable(Exception):
    """libcufile cannot be used here; the message says why."""


class CuFileError(Exception):
    """A cuFile call returned an error code."""

    def __init__(self, call: str, code: int, cuda_code: int = 0):
        self.call = call
        self.code = code
        self.reason = describe(code, cuda_code)
        super().__init__(f"{call} failed with cuFile error {code}: {self.reason}")


def describe(code: int, cuda_code: int = 0) -> str:
    reason = ERROR_REASONS.get(code, f"unknown cuFile error {code}")
    return f"{reason} (CUresult {cuda_code})" if code == 5011 and cuda_code else reason


# -- C types (cufile.h) ---------------------------------------------------------------------------------------

class _Status(ctypes.Structure):
    _fields_ = [("err", ctypes.c_int), ("cu_err", ctypes.c_int)]


class _HandleUnion(ctypes.Union):
    _fields_ = [("fd", ctypes.c_int), ("handle", ctypes.c_void_p)]


class _Descr(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("handle", _HandleUnion), ("fs_ops", ctypes.c_void_p)]


class _BatchParams(ctypes.Structure):
    _fields_ = [("devPtr_base", ctypes.c_void_p), ("file_offset", ctypes.c_int64),
                ("devPtr_offset", ctypes.c_int64), ("size", ctypes.c_size_t)]


class _ParamsUnion(ctypes.Union):
    _fields_ = [("batch", _BatchParams)]


class _IOParams(ctypes.Structure):
    _fields_ = [("mode", ctypes.c_int), ("u", _ParamsUnion), ("fh", ctypes.c_void_p), ("opcode", ctypes.c_int),
                ("cookie", ctypes.c_void_p)]


class _IOEvents(ctypes.Structure):
    _fields_ = [("cookie", ctypes.c_void_p), ("status", ctypes.c_int), ("ret", ctypes.c_ssize_t)]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_SIGNATURES = {  # name: (restype, argtypes)
    "cuFileDriverOpen": (_Status, []),
    "cuFileDriverClose": (_Status, []),
    "cuFileHandleRegister": (_Status, [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(_Descr)]),
    "cuFileHandleDeregister": (None, [ctypes.c_void_p]),
    "cuFileBufRegister": (_Status, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]),
    "cuFileBufDeregister": (_Status, [ctypes.c_void_p]),
    "cuFileRead": (ctypes.c_ssize_t, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64,
                                      ctypes.c_int64]),
}
_OPTIONAL_SIGNATURES = {
    "cuFileGetVersion": (_Status, [ctypes.POINTER(ctypes.c_int)]),
    "cuFileBatchIOSetUp": (_Status, [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint]),
    "cuFileBatchIOSubmit": (_Status, [ctypes.c_void_p, ctypes.c_uint, ctypes.POINTER(_IOParams), ctypes.c_uint]),
    "cuFileBatchIOGetStatus": (_Status, [ctypes.c_void_p, ctypes.c_uint, ctypes.POINTER(ctypes.c_uint),
                                         ctypes.POINTER(_IOEvents), ctypes.POINTER(_Timespec)]),
    "cuFileBatchIODestroy": (None, [ctypes.c_void_p]),
}


class Library:
    """The loaded libcufile with its functions typed; `has_batch` says whether the batch API is there."""

    def __init__(self, path: str):
        self.path = path
        self.lib = ctypes.CDLL(path, use_errno=True)
        for name, (restype, argtypes) in _SIGNATURES.items():
            function = getattr(self.lib, name)
            function.restype, function.argtypes = restype, argtypes
        self.optional = set()
        for name, (restype, argtypes) in _OPTIONAL_SIGNATURES.items():
            function = getattr(self.lib, name, None)
            if function is not None:
                function.restype, function.argtypes = restype, argtypes
                self.optional.add(name)
        self.has_batch = {"cuFileBatchIOSetUp", "cuFileBatchIOSubmit", "cuFileBatchIOGetStatus"} <= self.optional

    def call(self, name: str, *args) -> None:
        status = getattr(self.lib, name)(*args)
        if status.err != 0:
            raise CuFileError(name, status.err, status.cu_err)

    def version(self) -> str | None:
        """cuFileGetVersion's number as printed by the library, or None where it is not exported."""
        if "cuFileGetVersion" not in self.optional:
            return None
        value = ctypes.c_int(0)
        if self.lib.cuFileGetVersion(ctypes.byref(value)).err != 0:
            return None
        return str(value.value)


def candidate_paths() -> list[str]:
    """Where libcufile may be: the loader's path, the nvidia-* wheels, the CUDA toolkit."""
    candidates = list(LIBRARY_NAMES)
    found = ctypes.util.find_library("cufile")
    if found:
        candidates.append(found)
    folders = []
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        folders += [Path(root) / "cu13" / "lib", Path(root) / "cufile" / "lib"]
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(variable):
            folders.append(Path(os.environ[variable]) / "lib64")
    folders += [Path("/usr/local/cuda/lib64"), Path("/usr/local/cuda/targets/x86_64-linux/lib")]
    for folder in folders:
        candidates += [str(folder / name) for name in LIBRARY_NAMES if (folder / name).exists()]
    return candidates


_library: Library | None = None
_library_error: str | None = None
_lock = threading.Lock()


def library() -> Library:
    """Load libcufile once (raises CuFileUnavailable with the places tried)."""
    global _library, _library_error
    with _lock:
        if _library is None and _library_error is None:
            # cuFile writes cufile.log into the working directory unless told otherwise
            os.environ.setdefault("CUFILE_LOGFILE_PATH", str(Path(tempfile.gettempdir()) / "gdsllm-cufile.log"))
            errors = []
            for candidate in candidate_paths():
                try:
                    _library = Library(candidate)
                    break
                except (OSError, AttributeError) as exc:
                    errors.append(f"{candidate}: {exc}")
            else:
                _library_error = ("libcufile.so.0 not found (install the CUDA toolkit's GDS package or the "
                                  "nvidia-cufile wheel); tried " + "; ".join(errors[:3]))
        if _library is None:
            raise CuFileUnavailable(_library_error)
        return _library


# -- driver, files, buffers -----------------------------------------------------------------------------------

_driver_open = False


def open_driver() -> None:
    """cuFileDriverOpen, once per process (closed at exit by the library itself)."""
    global _driver_open
    lib = library()
    with _lock:
        if not _driver_open:
            lib.call("cuFileDriverOpen")
            _driver_open = True


def close_driver() -> None:
    global _driver_open
    with _lock:
        if _driver_open:
            library().call("cuFileDriverClose")
            _driver_open = False


class CuFileHandle:
    """A file registered with cuFile (opened O_DIRECT where the file system allows it)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        lib = library()
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
        except OSError:
            self.fd = os.open(self.path, os.O_RDONLY)
        descr = _Descr(type=HANDLE_TYPE_OPAQUE_FD)
        descr.handle.fd = self.fd
        self.handle = ctypes.c_void_p()
        try:
            lib.call("cuFileHandleRegister", ctypes.byref(self.handle), ctypes.byref(descr))
        except CuFileError:
            os.close(self.fd)
            raise
        self._lib = lib

    def read(self, buffer_base: int, size: int, file_offset: int, buffer_offset: int = 0) -> int:
        """cuFileRead: bytes read (0 at end of file) into GPU memory at buffer_base + buffer_offset."""
        got = self._lib.lib.cuFileRead(self.handle, buffer_base, size, file_offset, buffer_offset)
        if got == -1:
            err = ctypes.get_errno()
            raise OSError(err, f"cuFileRead of {self.path}: {os.strerror(err)}")
        if got < 0:
            raise CuFileError(f"cuFileRead of {self.path}", -got)
        return got

    def close(self) -> None:
        if self.fd >= 0:
            self._lib.lib.cuFileHandleDeregister(self.handle)
            os.close(self.fd)
            self.fd = -1


def register_buffer(pointer: int, nbytes: int) -> None:
    """cuFileBufRegister: pin a GPU buffer for cuFile (optional; speeds up repeated GDS reads into it)."""
    library().call("cuFileBufRegister", pointer, nbytes, 0)


def deregister_buffer(pointer: int) -> None:
    library().call("cuFileBufDeregister", pointer)


def batch_read(reads: list[tuple["CuFileHandle", int, int, int, int]], timeout_s: float = 60.0) -> list[int]:
    """Submit reads (handle, buffer_base, size, file_offset, buffer_offset) as one cuFile batch; bytes read each."""
    lib = library()
    if not lib.has_batch:
        raise CuFileUnavailable(f"{lib.path} has no batch API")
    batch = ctypes.c_void_p()
    lib.call("cuFileBatchIOSetUp", ctypes.byref(batch), len(reads))
    try:
        params = (_IOParams * len(reads))()
        for index, (handle, base, size, file_offset, buffer_offset) in enumerate(reads):
            params[index].mode, params[index].opcode = BATCH_MODE, OPCODE_READ
            params[index].fh, params[index].cookie = handle.handle, index + 1
            params[index].u.batch = _BatchParams(base, file_offset, buffer_offset, size)
        lib.call("cuFileBatchIOSubmit", batch, len(reads), params, 0)
        results: dict[int, int] = {}
        events = (_IOEvents * len(reads))()
        while len(results) < len(reads):
            count = ctypes.c_uint(len(reads) - len(results))
            timeout = _Timespec(int(timeout_s), 0)
            lib.call("cuFileBatchIOGetStatus", batch, 1, ctypes.byref(count), events, ctypes.byref(timeout))
            if count.value == 0:
                raise TimeoutError(f"cuFile batch of {len(reads)} reads did not finish in {timeout_s} s")
            for event in events[:count.value]:
                index = event.cookie - 1
                if event.status != STATUS_COMPLETE or event.ret < 0:
                    raise CuFileError(f"batch read of {reads[index][0].path}", -event.ret if event.ret < 0 else 5044)
                results[index] = event.ret
        return [results[index] for index in range(len(reads))]
    finally:
        lib.lib.cuFileBatchIODestroy(batch)


# -- environment ----------------------------------------------------------------------------------------------

@dataclass
class CuFileEnvironment:
    """What decides cuFile's mode on this machine."""

    nvidia_fs: bool
    config_path: str | None
    allow_compat_mode: bool | None  # None: no cufile.json found (cuFile's built-in default is true)

    @property
    def mode(self) -> str:
        if self.nvidia_fs:
            return "gds"
        return "compat" if self.allow_compat_mode is not False else "unavailable"


def environment() -> CuFileEnvironment:
    config = Path(os.environ.get("CUFILE_ENV_PATH_JSON") or DEFAULT_CONFIG)
    allow = None
    if config.is_file():
        allow = read_config(config).get("properties", {}).get("allow_compat_mode")
    return CuFileEnvironment(NVIDIA_FS_PROC.exists(), str(config) if config.is_file() else None, allow)


def read_config(path: Path) -> dict:
    """cufile.json allows // comments; strip them (outside strings) before parsing."""
    text = re.sub(r'("(?:\\.|[^"\\])*")|//[^\n]*', lambda m: m.group(1) or "", path.read_text())
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {}


def udev_record_path(path: Path) -> Path:
    """The udev database entry cuFile reads to identify the file system of `path`'s block device."""
    device = os.stat(path).st_dev
    return Path(f"/run/udev/data/b{os.major(device)}:{os.minor(device)}")


def probe(path: Path) -> str:
    """Open the driver and register a handle on `path` (a file, or a scratch file made in that folder).

    Returns a description of the working mode; raises CuFileUnavailable / CuFileError saying why not."""
    open_driver()
    path = Path(path)
    scratch = None
    if not path.is_file():
        folder = path if path.is_dir() else next(p for p in path.parents if p.is_dir())
        scratch = tempfile.NamedTemporaryFile(dir=folder, prefix=".gdsllm-probe-")
        scratch.write(b"\0" * 4096)
        scratch.flush()
        path = Path(scratch.name)
    try:
        CuFileHandle(path).close()
    except CuFileError as exc:
        if exc.code == 5027:
            raise CuFileError(f"cuFileHandleRegister on {path}", 5027) from None
        raise
    finally:
        if scratch is not None:
            scratch.close()
    env = environment()
    if env.mode == "gds":
        return "cuFile in GDS mode (nvidia-fs loaded): storage DMAs straight into GPU memory"
    return "cuFile in compat mode (no nvidia-fs; allow_compat_mode): cuFile stages reads through host memory"


# -- backend --------------------------------------------------------------------------------------------------

@dataclass
class CufileFile:
    path: Path
    cu: CuFileHandle
    host: PosixFile


class CufileBackend:
    """cuFileRead straight into GPU destinations; host destinations go through the posix backend."""

    name = "cufile"

    def __init__(self, reason: str = "cuFile", fallbacks: list[str] | None = None, host: PosixBackend | None = None):
        open_driver()
        self.reason = reason
        self.fallbacks = fallbacks or []
        self.host = host or PosixBackend(reason="host destinations of the cufile backend")
        self._local = threading.local()

    def open(self, path: Path) -> CufileFile:
        path = Path(path)
        return CufileFile(path, CuFileHandle(path), self.host.open(path))

    def close(self, handle: CufileFile) -> None:
        handle.cu.close()
        self.host.close(handle.host)

    def read_into(self, handle: CufileFile, file_offset: int, nbytes: int, dest: torch.Tensor, dest_offset: int) -> None:
        """Read `nbytes` at `file_offset` into `dest[dest_offset:]` (uint8)."""
        if dest.device.type != "cuda":
            self.host.read_into(handle.host, file_offset, nbytes, dest, dest_offset)
            return
        if getattr(self._local, "device", None) != dest.device:
            torch.cuda.set_device(dest.device)  # cuFile uses the calling thread's current context
            self._local.device = dest.device
        done = 0
        while done < nbytes:
            got = handle.cu.read(dest.data_ptr(), nbytes - done, file_offset + done, dest_offset + done)
            if got == 0:
                raise truncated_error(handle.path, file_offset, nbytes, done)
            done += got
