"""The on-disk model format: a manifest plus 4 KiB-aligned weight files grouped into extents."""

from gdsllm_core.layout.manifest import FORMAT_VERSION, ExtentInfo, Manifest, TensorInfo, TokenizerInfo
from gdsllm_core.layout.qtypes import ALIGNMENT, align_up, tensor_nbytes
from gdsllm_core.layout.store import ModelStore
from gdsllm_core.layout.writer import ModelWriter

__all__ = ["ALIGNMENT", "FORMAT_VERSION", "ExtentInfo", "Manifest", "ModelStore", "ModelWriter", "TensorInfo",
           "TokenizerInfo", "align_up", "tensor_nbytes"]
