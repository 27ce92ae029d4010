"""Reading a GGUF file for a converter: its architecture from the header alone, its metadata, and its tensors as
(qtype, shape, raw data), each checked against what gdsllm can dequantize and against its size."""

import struct
from pathlib import Path

import numpy as np
from gguf import GGUFReader, LlamaFileType

from gdsllm_core.errors import ConversionError
from gdsllm_core.layout.qtypes import tensor_nbytes
from gdsllm_core.quant.ggml import check_supported

GGUF_MAGIC = b"GGUF"
_STRING_TYPE = 8
_HEADER_KEYS = 16  # general.architecture is among the first keys llama.cpp writes


def is_gguf(path: Path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as handle:
        return handle.read(4) == GGUF_MAGIC


def gguf_architecture(path: Path) -> str | None:
    """`general.architecture` read from the header without parsing the whole file (None if not found early)."""
    try:
        with open(path, "rb") as handle:
            if handle.read(4) != GGUF_MAGIC:
                return None
            handle.read(4 + 8)  # version, tensor count
            (n_kv,) = struct.unpack("<Q", handle.read(8))
            for _ in range(min(n_kv, _HEADER_KEYS)):
                (key_len,) = struct.unpack("<Q", handle.read(8))
                key = handle.read(key_len).decode("utf-8", "replace")
                (value_type,) = struct.unpack("<I", handle.read(4))
                if value_type != _STRING_TYPE:
                    return None
                (value_len,) = struct.unpack("<Q", handle.read(8))
                value = handle.read(value_len).decode("utf-8", "replace")
                if key == "general.architecture":
                    return value
    except (OSError, struct.error):
        return None
    return None


class GgufTensor:
    """One tensor of a GGUF: its GGML type name, its shape in torch order ([rows, cols] or [experts, rows, cols])
    and its raw data (a numpy view into the mapped file; uint8 rows of blocks for quantized types)."""

    def __init__(self, name: str, qtype: str, shape: list[int], data: np.ndarray):
        self.name, self.qtype, self.shape, self.data = name, qtype, shape, data


def read_gguf(source: Path) -> tuple[dict, dict[str, GgufTensor]]:
    """(metadata key -> value, tensor name -> GgufTensor) of a GGUF file. A file gguf-py cannot parse, a tensor of a
    type gdsllm cannot dequantize (named) or a truncated tensor is a clear error."""
    try:
        reader = GGUFReader(source)
    except Exception as exc:
        raise ConversionError(f"cannot read GGUF {source}: {type(exc).__name__}: {exc}",
                              "the file is truncated or corrupt: re-download it") from exc
    meta = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    tensors = {}
    for tensor in reader.tensors:
        qtype = tensor.tensor_type.name
        check_supported(qtype, f"tensor {tensor.name} in {Path(source).name}")
        shape = [int(d) for d in reversed(tensor.shape.tolist())]
        expected = tensor_nbytes(qtype, shape)
        if tensor.data.nbytes != expected:
            raise ConversionError(f"tensor {tensor.name} in {source} has {tensor.data.nbytes} of its {expected} bytes",
                                  "the file is truncated: re-download it")
        tensors[tensor.name] = GgufTensor(tensor.name, qtype, shape, tensor.data)
    return meta, tensors


def file_type_name(meta: dict, tensors: dict[str, GgufTensor]) -> str:
    """The file's quant as its publisher named it (`general.file_type`: Q4_K_M, IQ4_XS, ...), else the most common
    type among its matrices."""
    file_type = meta.get("general.file_type")
    if file_type is not None:
        try:
            return LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
        except ValueError:
            pass
    kinds = [t.qtype for t in tensors.values() if len(t.shape) > 1]
    return max(set(kinds), key=kinds.count) if kinds else ""
