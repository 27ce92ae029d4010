"""Page-aligned host buffers for O_DIRECT reads: pinned (page-locked) when CUDA is up, so GPU copies run async."""

import mmap
import queue
import threading
from contextlib import contextmanager

import torch

ALIGN = 4096  # O_DIRECT needs the buffer address, the file offset and the length on logical-block boundaries


def align_down(value: int, alignment: int = ALIGN) -> int:
    return value - value % alignment


def align_up(value: int, alignment: int = ALIGN) -> int:
    return -(-value // alignment) * alignment


def aligned_host_buffer(nbytes: int, pin: bool) -> torch.Tensor:
    """A uint8 host tensor of `nbytes` whose first byte sits on a 4 KiB boundary.

    pin=True takes page-locked memory from torch's CUDA host allocator (over-allocated, then sliced to the boundary);
    pin=False maps anonymous memory, which the kernel hands out page-aligned."""
    if pin:
        raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=True)
        skip = (-raw.data_ptr()) % ALIGN
        return raw[skip:skip + nbytes]
    region = mmap.mmap(-1, max(nbytes, 1))
    return torch.frombuffer(region, dtype=torch.uint8, count=nbytes) if nbytes else torch.empty(0, dtype=torch.uint8)


class BouncePool:
    """A fixed set of aligned host buffers, allocated once on first use and handed out to reader threads."""

    def __init__(self, count: int, nbytes: int, pin: bool):
        self.count = count
        self.nbytes = nbytes
        self.pin = pin
        self._free: queue.Queue[torch.Tensor] | None = None
        self._lock = threading.Lock()  # one taker at a time, so two threads never each hold half of what they need

    def _allocate(self) -> queue.Queue:
        free: queue.Queue[torch.Tensor] = queue.Queue()
        for _ in range(self.count):
            free.put(aligned_host_buffer(self.nbytes, self.pin))
        return free

    @contextmanager
    def take(self, n: int = 1):
        """Borrow `n` buffers (blocks while other threads hold them all); returned when the block exits."""
        with self._lock:
            if self._free is None:
                self._free = self._allocate()
            buffers = [self._free.get() for _ in range(n)]
        try:
            yield buffers
        finally:
            for buffer in buffers:
                self._free.put(buffer)
