"""posix backend: O_DIRECT reads into pinned bounce buffers, then async copies to the GPU on a side stream.

Each read is cut into bounce-sized pieces that alternate between two buffers: while piece k is copied to the GPU,
piece k+1 is read from disk (double buffering), so disk and PCIe overlap. Where a file system refuses O_DIRECT the
file is read buffered (through the page cache) and the reason is kept in `notes`. Host destinations are read
straight into the destination when its address and the file offset sit on 4 KiB boundaries, else staged too.
"""

import errno
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from gdsllm_core.storage.pinned import ALIGN, BouncePool, align_down, align_up
from gdsllm_core.storage.reader import truncated_error

BOUNCE_BYTES = 4 << 20  # one piece: big enough for the disk, small enough that two pieces per thread overlap well
BOUNCE_COUNT = 32  # two per reader thread, for up to 16 threads


@dataclass
class PosixFile:
    """A weight file opened twice: with O_DIRECT (None where refused) and buffered."""

    path: Path
    fd: int
    direct_fd: int | None
    use_direct: bool = True  # cleared (for good) when the file system refuses an O_DIRECT read

    @property
    def direct(self) -> bool:
        return self.direct_fd is not None and self.use_direct


class PosixBackend:
    """O_DIRECT (or buffered, where refused) reads staged through pinned bounce buffers."""

    name = "posix"

    def __init__(self, reason: str = "O_DIRECT reads into pinned bounce buffers", fallbacks: list[str] | None = None,
                 bounce_bytes: int = BOUNCE_BYTES, bounce_count: int = BOUNCE_COUNT, pin: bool | None = None):
        if bounce_bytes % ALIGN:
            raise ValueError(f"bounce_bytes must be a multiple of {ALIGN}, got {bounce_bytes}")
        self.reason = reason
        self.fallbacks = fallbacks or []
        self.notes: list[str] = []
        self.bounce_bytes = bounce_bytes
        pin = torch.cuda.is_available() if pin is None else pin
        self._pool = BouncePool(bounce_count, bounce_bytes, pin=pin)
        self._local = threading.local()

    def open(self, path: Path) -> PosixFile:
        path = Path(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            direct_fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError as exc:
            direct_fd = None
            self._note(f"{path}: O_DIRECT refused ({exc.strerror}); reading it buffered")
        return PosixFile(path, fd, direct_fd)

    def close(self, handle: PosixFile) -> None:
        os.close(handle.fd)
        if handle.direct_fd is not None:
            os.close(handle.direct_fd)

    def read_into(self, handle: PosixFile, file_offset: int, nbytes: int, dest: torch.Tensor, dest_offset: int) -> None:
        """Read `nbytes` at `file_offset` into `dest[dest_offset:]` (uint8; GPU, pinned or plain host memory)."""
        target = dest[dest_offset:dest_offset + nbytes]
        if dest.device.type == "cuda":
            self._staged_to_gpu(handle, file_offset, nbytes, target)
            return
        body = 0
        if handle.direct and file_offset % ALIGN == 0 and target.data_ptr() % ALIGN == 0:
            body = align_down(nbytes)
            if body:
                self._pread(handle, target[:body], file_offset, body, (file_offset, nbytes))
        if body < nbytes:
            self._staged_to_host(handle, file_offset + body, nbytes - body, target[body:], (file_offset, nbytes))

    # -- pieces -----------------------------------------------------------------------------------------------

    def _pieces(self, file_offset: int, nbytes: int):
        """(done, size, aligned_start, skip): pieces whose aligned reads fit one bounce buffer; all but the first
        start on a 4 KiB boundary."""
        done = 0
        while done < nbytes:
            position = file_offset + done
            skip = position % ALIGN
            size = min(self.bounce_bytes - skip, nbytes - done)
            yield done, size, position - skip, skip
            done += size

    def _staged_to_host(self, handle: PosixFile, file_offset: int, nbytes: int, target: torch.Tensor, request) -> None:
        with self._pool.take(1) as (buffer,):
            for done, size, start, skip in self._pieces(file_offset, nbytes):
                self._pread(handle, buffer[:align_up(skip + size)], start, skip + size, request)
                target[done:done + size].copy_(buffer[skip:skip + size])

    def _staged_to_gpu(self, handle: PosixFile, file_offset: int, nbytes: int, target: torch.Tensor) -> None:
        stream = self._side_stream(target.device)
        pending: list[torch.cuda.Event | None] = [None, None]
        with self._pool.take(2) as buffers:
            try:
                for index, (done, size, start, skip) in enumerate(self._pieces(file_offset, nbytes)):
                    slot = index % 2
                    if pending[slot] is not None:
                        pending[slot].synchronize()  # the copy out of this buffer has finished: it may be refilled
                    buffer = buffers[slot]
                    self._pread(handle, buffer[:align_up(skip + size)], start, skip + size, (file_offset, nbytes))
                    with torch.cuda.stream(stream):
                        target[done:done + size].copy_(buffer[skip:skip + size], non_blocking=True)
                        event = torch.cuda.Event()
                        event.record(stream)
                    pending[slot] = event
            finally:  # never hand a buffer back to the pool while a copy still reads from it
                for event in pending:
                    if event is not None:
                        event.synchronize()

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        """This thread's copy stream for `device` (one per thread: waiting on it never waits for other threads)."""
        streams = self._local.__dict__.setdefault("streams", {})
        if device not in streams:
            streams[device] = torch.cuda.Stream(device=device)
        return streams[device]

    # -- disk -------------------------------------------------------------------------------------------------

    def _pread(self, handle: PosixFile, buffer: torch.Tensor, offset: int, needed: int, request) -> None:
        """Fill `buffer` from `offset` until at least `needed` bytes have landed (O_DIRECT reads may stop at EOF)."""
        view = memoryview(buffer.numpy()).cast("B")
        done = 0
        while done < needed:
            direct = handle.direct
            try:
                got = os.preadv(handle.direct_fd if direct else handle.fd, [view[done:]], offset + done)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not direct:
                    raise
                self._note(f"{handle.path}: O_DIRECT read refused ({exc.strerror}); reading it buffered")
                handle.use_direct = False
                continue
            if got <= 0:
                raise truncated_error(handle.path, request[0], request[1], max(0, offset + done - request[0]))
            done += got

    def _note(self, note: str) -> None:
        if note not in self.notes:
            self.notes.append(note)
