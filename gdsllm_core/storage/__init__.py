"""Storage moves extents from weight files into GPU, pinned-host or host memory, and nothing else."""

from gdsllm_core.storage.reader import ExtentReader, extent_views

__all__ = ["ExtentReader", "extent_views"]
