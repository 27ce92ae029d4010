"""Choosing the storage backend (GDSLLM_IO=auto|cufile|posix|cpu) and remembering why."""

from gdsllm_core import settings
from gdsllm_core.storage.reader import CpuBackend


def choose_backend():
    """The backend to use here, with `.name` and `.reason` set. Without a GPU this is always the CPU backend."""
    requested = settings.io_backend()
    return CpuBackend("GDSLLM_IO=cpu" if requested == "cpu" else "no GPU: reading into host memory")
