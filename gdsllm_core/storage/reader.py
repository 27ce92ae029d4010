"""ExtentReader: the one reader API every scheduler uses.

`submit(extents, destinations)` reads each extent's bytes into the matching destination tensor (uint8, contiguous,
at least `extent.nbytes` long; on the GPU, in pinned host memory or in plain host memory) on the reader's threads
and returns a Future. Files are opened once per reader. The backend is chosen by `storage.backends.choose_backend`.

Each extent is read in pieces that the threads take from one FIFO queue, so earlier extents land first. Beside
its read a piece costs a queue get and a counter update, no Future of its own: small pieces (the Qwen plugin reads
experts in 512 KiB) stay cheap. With a thread pool, a thread spent a median 108-125 us between one piece and the
next on the H100 machine (bookkeeping, `read_into`'s own Python, the GIL); on a 2-core machine, 12 threads reading
page-cached 512 KiB pieces moved 9.6-12.2 GB/s through this queue against 6.9-8.9 through the pool.
"""

import os
import queue
import threading
import weakref
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch

from gdsllm_core.errors import CorruptModelError, StorageReadError
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
        self.threads = threads
        self.chunk_bytes = chunk_bytes  # each extent is read in pieces of this size, spread over the threads
        self.bytes_read = 0
        self._pieces: queue.SimpleQueue = queue.SimpleQueue()
        self._workers = [threading.Thread(target=_read_pieces, args=(self._pieces, self.backend.read_into),
                                          name=f"gdsllm-io-{i}", daemon=True) for i in range(threads)]
        for worker in self._workers:
            worker.start()
        self._close = weakref.finalize(self, _shut_down, self._pieces, self._workers, self.backend,
                                       self._handles)  # also if the reader is dropped without close()

    def __enter__(self) -> "ExtentReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def submit(self, extents: list[ExtentInfo], destinations: list[torch.Tensor]) -> Future:
        """Read every extent into its destination; the Future resolves when all bytes have landed."""
        landing = _Landing()
        self._queue_pieces(extents, destinations, lambda _: landing)
        return landing.close()

    def submit_each(self, extents: list[ExtentInfo], destinations: list[torch.Tensor]) -> list[Future]:
        """As `submit`, with one Future per extent (resolved when that extent has landed), so that a caller can use
        each extent as soon as it is in."""
        landings = [_Landing() for _ in extents]
        self._queue_pieces(extents, destinations, landings.__getitem__)
        return [landing.close() for landing in landings]

    def _queue_pieces(self, extents: list[ExtentInfo], destinations: list[torch.Tensor], landing_of) -> None:
        """Queue the pieces of every extent, in order; extent i's pieces count towards `landing_of(i)`."""
        if not self._close.alive:
            raise RuntimeError(f"the reader of {self.folder} is closed")
        if len(extents) != len(destinations):
            raise ValueError(f"{len(extents)} extents but {len(destinations)} destinations")
        for extent, dest in zip(extents, destinations, strict=True):
            if dest.numel() * dest.element_size() < extent.nbytes:
                raise ValueError(f"destination for extent {extent.name} holds {dest.nbytes} bytes, needs {extent.nbytes}")
        for index, (extent, dest) in enumerate(zip(extents, destinations, strict=True)):
            handle, landing = self._handles[extent.file], landing_of(index)
            for start in range(0, extent.nbytes, self.chunk_bytes):
                landing.expect()
                self._pieces.put((handle, extent.offset + start, min(self.chunk_bytes, extent.nbytes - start), dest,
                                  start, landing))
        self.bytes_read += sum(extent.nbytes for extent in extents)

    def read(self, extents: list[ExtentInfo], destinations: list[torch.Tensor]) -> None:
        self.submit(extents, destinations).result()

    def close(self) -> None:
        """Wait for the queued reads to finish, stop the threads, close the files."""
        self._close()


class _Landing:
    """The Future of a group of pieces: resolved once every expected piece has landed (or failed with the first
    error). `expect` counts a queued piece; `close` ends the counting and returns the Future."""

    def __init__(self):
        self.future: Future = Future()
        self._lock = threading.Lock()
        self._remaining = 1  # the count stays open until close()

    def expect(self) -> None:
        with self._lock:
            self._remaining += 1

    def close(self) -> Future:
        self.landed()
        return self.future

    def landed(self) -> None:
        with self._lock:
            self._remaining -= 1
            if self._remaining == 0 and not self.future.done():
                self.future.set_result(None)

    def failed(self, error: BaseException) -> None:
        with self._lock:
            if self.future.done():
                return
            self.future.set_exception(error)


def _read_pieces(pieces: queue.SimpleQueue, read_into) -> None:
    """A reader thread: read queued pieces until a None arrives."""
    while (piece := pieces.get()) is not None:
        handle, file_offset, nbytes, dest, dest_offset, landing = piece
        try:
            read_into(handle, file_offset, nbytes, dest, dest_offset)
        except OSError as error:  # the disk or the file system: a clear error for whoever waits on the read
            landing.failed(StorageReadError(
                f"reading {nbytes} bytes at offset {file_offset} of {getattr(handle, 'path', 'a weight file')} "
                f"failed: {error.strerror or error}", "check the disk (dmesg) and the file; the request was ended"))
        except BaseException as error:  # handed to whoever waits on the read
            landing.failed(error)
        else:
            landing.landed()


def _shut_down(pieces: queue.SimpleQueue, workers: list[threading.Thread], backend, handles: dict) -> None:
    """After the pieces already queued: one None per thread, wait for each to end, close the files."""
    for _ in workers:
        pieces.put(None)
    for worker in workers:
        worker.join()
    for handle in handles.values():
        backend.close(handle)
    handles.clear()


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
