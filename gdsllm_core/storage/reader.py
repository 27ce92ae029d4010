"""ExtentReader: the one reader API every scheduler uses.

`submit(extents, destinations)` reads each extent's bytes into the matching destination tensor (uint8, contiguous,
at least `extent.nbytes` long; on the GPU, in pinned host memory or in plain host memory) on a thread pool and
returns a Future. Files are opened once per reader. The backend is chosen by `storage.backends.choose_backend`.
"""

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from gdsllm_core.errors import CorruptModelError
from gdsllm_core.layout.manifest import ExtentInfo, Manifest, TensorInfo
from gdsllm_core.layout.qtypes import PLAIN_DTYPES, raw_row_bytes

CHUNK_BYTES = 16 << 20  # large enough to reach the disk's ceiling, small enough to spread over threads


@dataclass
class OpenFile:
    """A weight file opened by a backend: the path is kept so that errors can name it."""

    path: Path
    fd: int


def truncated_error(path: Path, file_offset: int, wanted: int, got: int) -> CorruptModelError:
    """The error for a read that ran past the end of a weight file."""
    return CorruptModelError(
        f"weight file {path} ends early: reading {wanted} bytes at offset {file_offset} got only {got}",
        "the file is truncated or was modified: re-convert the model with `gdsllm pull`")


class CpuBackend:
    """pread straight into host tensors; used when there is no GPU (or GDSLLM_IO=cpu)."""

    name = "cpu"

    def __init__(self, reason: str = "no GPU: reading into host memory", fallbacks: list[str] | None = None):
        self.reason = reason
        self.fallbacks = fallbacks or []

    def open(self, path: Path) -> OpenFile:
        return OpenFile(Path(path), os.open(path, os.O_RDONLY))

    def close(self, handle: OpenFile) -> None:
        os.close(handle.fd)

    def read_into(self, handle: OpenFile, file_offset: int, nbytes: int, dest: torch.Tensor, dest_offset: int) -> None:
        """Read `nbytes` at `file_offset` into `dest[dest_offset:]` (a host uint8 tensor)."""
        view = memoryview(dest.numpy()).cast("B")[dest_offset:dest_offset + nbytes]
        done = 0
        while done < nbytes:
            got = os.preadv(handle.fd, [view[done:]], file_offset + done)
            if got <= 0:
                raise truncated_error(handle.path, file_offset, nbytes, done)
            done += got


class ExtentReader:
    """Reads one model's extents. Use as a context manager or call close()."""

    def __init__(self, folder: Path, manifest: Manifest, backend=None, threads: int = 8,
                 chunk_bytes: int = CHUNK_BYTES):
        from gdsllm_core.storage.backends import choose_backend

        self.folder = Path(folder)
        self.manifest = manifest
        first_file = next(iter(manifest.files), None)
        self.backend = backend if backend is not None else choose_backend(
            probe_path=self.folder / first_file if first_file else self.folder)
        self._handles = {name: self.backend.open(self.folder / name) for name in manifest.files}
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gdsllm-io")
        self.threads = threads
        self.chunk_bytes = chunk_bytes  # each extent is read in pieces of this size, spread over the threads
        self.bytes_read = 0

    def __enter__(self) -> "ExtentReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def submit(self, extents: list[ExtentInfo], destinations: list[torch.Tensor]) -> Future:
        """Read every extent into its destination; the Future resolves when all bytes have landed."""
        return _gather([job for jobs in self._jobs(extents, destinations) for job in jobs])

    def submit_each(self, extents: list[ExtentInfo], destinations: list[torch.Tensor]) -> list[Future]:
        """As `submit`, with one Future per extent (resolved when that extent has landed), so that a caller can use
        each extent as soon as it is in."""
        return [_gather(jobs) for jobs in self._jobs(extents, destinations)]

    def _jobs(self, extents: list[ExtentInfo], destinations: list[torch.Tensor]) -> list[list[Future]]:
        """Queue the pieces of every extent (in order, so earlier extents land first); their jobs per extent."""
        per_extent = []
        for extent, dest in zip(extents, destinations, strict=True):
            jobs: list[Future] = []
            per_extent.append(jobs)
            if dest.numel() * dest.element_size() < extent.nbytes:
                raise ValueError(f"destination for extent {extent.name} holds {dest.nbytes} bytes, needs {extent.nbytes}")
            handle = self._handles[extent.file]
            for start in range(0, extent.nbytes, self.chunk_bytes):
                size = min(self.chunk_bytes, extent.nbytes - start)
                jobs.append(self._pool.submit(self.backend.read_into, handle, extent.offset + start, size, dest, start))
        self.bytes_read += sum(extent.nbytes for extent in extents)
        return per_extent

    def read(self, extents: list[ExtentInfo], destinations: list[torch.Tensor]) -> None:
        self.submit(extents, destinations).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for handle in self._handles.values():
            self.backend.close(handle)
        self._handles.clear()


def _gather(jobs: list[Future]) -> Future:
    """One Future for many: done when all are, failing with the first error."""
    result: Future = Future()
    remaining = [len(jobs)]
    if not jobs:
        result.set_result(None)
        return result

    def on_done(job: Future) -> None:
        error = job.exception()
        if error is not None and not result.done():
            result.set_exception(error)
            return
        remaining[0] -= 1
        if remaining[0] == 0 and not result.done():
            result.set_result(None)

    for job in jobs:
        job.add_done_callback(on_done)
    return result


def tensor_view(info: TensorInfo, buffer: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes inside its extent's buffer: typed and shaped for plain types, else uint8 [rows, row_bytes]."""
    raw = buffer[info.offset:info.offset + info.nbytes]
    if info.qtype in PLAIN_DTYPES:
        return raw.view(PLAIN_DTYPES[info.qtype]).view(info.shape)
    rows = 1
    for dim in info.shape[:-1]:
        rows *= dim
    return raw.view(rows, raw_row_bytes(info.qtype, info.shape[-1]))


def extent_views(extent: ExtentInfo, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
    """name -> view of every tensor of an extent held in `buffer` (uint8, extent-sized)."""
    return {info.name: tensor_view(info, buffer) for info in extent.tensors}
