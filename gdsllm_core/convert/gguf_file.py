"""GGUF files for every converter: the header read without the weights (a local file, or the first bytes fetched by
an HTTP range request), the quant name the publisher gave the file, and files split into parts (`-00001-of-00003`).

`read_gguf(path)` opens a GGUF, or every part of a split one given its first part, through gguf-py's GGUFReader and
checks what a converter would otherwise trip over: a missing or truncated part (named), a tensor of a type gdsllm
cannot dequantize (named), tensors whose bytes are cut short.
"""

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from gguf import GGUFReader, LlamaFileType

from gdsllm_core.errors import ConversionError
from gdsllm_core.layout.qtypes import tensor_nbytes
from gdsllm_core.quant.ggml import check_supported

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32  # where `general.alignment` is absent (gguf's GGUF_DEFAULT_ALIGNMENT)
SPLIT_PART = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
FILE_TYPE_GUESSED = 1024  # a flag llama.cpp sets on file types it inferred from the tensors
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class IncompleteHeader(Exception):
    """The bytes given end before the header does: read more (at least `needed` bytes in all)."""

    def __init__(self, needed: int):
        super().__init__(f"the GGUF header needs at least {needed} bytes")
        self.needed = needed


@dataclass
class GgufHeader:
    """The scalar and string metadata of a GGUF (arrays are skipped) and where its tensor data begins."""

    metadata: dict = field(default_factory=dict)
    n_tensors: int = 0
    data_offset: int = 0

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")


class _Cursor:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise IncompleteHeader(max(end, 2 * len(self.data)))
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.unpack("<Q")).decode("utf-8", "replace")

    def value(self, value_type: int):
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type, count = self.unpack("<I"), self.unpack("<Q")
            if item_type in _SCALARS:
                self.take(struct.calcsize(_SCALARS[item_type]) * count)
            else:
                for _ in range(count):
                    self.value(item_type)
            return None
        if value_type not in _SCALARS:
            raise ConversionError(f"unknown GGUF value type {value_type}", "the file is corrupt: re-download it")
        return self.unpack(_SCALARS[value_type])


def parse_header(data: bytes, name: str = "the file") -> GgufHeader:
    """The header of a GGUF from its first bytes; IncompleteHeader when `data` ends too early."""
    cursor = _Cursor(data)
    if cursor.take(4) != GGUF_MAGIC:
        raise ConversionError(f"{name} is not a GGUF file (no GGUF magic)", "give a .gguf file written by llama.cpp")
    cursor.unpack("<I")  # version
    header = GgufHeader(n_tensors=cursor.unpack("<Q"))
    for _ in range(cursor.unpack("<Q")):
        key = cursor.string()
        value = cursor.value(cursor.unpack("<I"))
        if value is not None:
            header.metadata[key] = value
    for _ in range(header.n_tensors):
        cursor.string()
        n_dims = cursor.unpack("<I")
        cursor.take(8 * n_dims + 4 + 8)  # dims, type, offset
    alignment = int(header.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    header.data_offset = -(-cursor.pos // alignment) * alignment
    return header


def read_header(path: Path) -> GgufHeader:
    """The header of a local GGUF, reading only as much of the file as it takes."""
    path = Path(path)
    size, chunk = path.stat().st_size, 1 << 20
    with open(path, "rb") as handle:
        while True:
            handle.seek(0)
            data = handle.read(chunk)
            try:
                return parse_header(data, path.name)
            except IncompleteHeader as more:
                if len(data) >= size:
                    raise ConversionError(f"{path} ends inside its header ({size} bytes): a truncated or corrupt GGUF header",
                                          "the file is truncated: re-download it") from None
                chunk = more.needed



def gguf_architecture(path: Path) -> str | None:
    """`general.architecture` of a GGUF file; None for anything else or a header that cannot be read (what a
    converter's `detect` asks)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as handle:
            if handle.read(4) != GGUF_MAGIC:
                return None
        return read_header(path).architecture
    except (OSError, ConversionError):
        return None

def file_type_name(metadata: dict) -> str | None:
    """The quant the publisher named the file (`general.file_type`: Q4_K_M, IQ4_XS, F16…), or None if unknown."""
    value = metadata.get("general.file_type")
    if value is None:
        return None
    try:
        kind = LlamaFileType(int(value) & ~FILE_TYPE_GUESSED)
    except ValueError:
        return None
    return kind.name.removeprefix("MOSTLY_").removeprefix("ALL_")


def split_parts(path: Path) -> list[Path]:
    """Every part of a split GGUF given any of its parts (`Model-00001-of-00003.gguf`), or [path] if not split."""
    path = Path(path)
    match = SPLIT_PART.match(path.name)
    if match is None:
        return [path]
    count = int(match["count"])
    return [path.with_name(f"{match['stem']}-{no:05d}-of-{count:05d}.gguf") for no in range(1, count + 1)]


def model_stem(path: Path) -> str:
    """A GGUF's name without `.gguf` and without a split suffix: `Model-Q4_K_M-00001-of-00002.gguf` -> `Model-Q4_K_M`."""
    match = SPLIT_PART.match(Path(path).name)
    return match["stem"] if match else Path(path).stem


@dataclass
class GgufFile:
    """A GGUF (all parts of a split one): metadata from the first part, tensors from every part by name."""

    path: Path
    metadata: dict
    tensors: dict
    parts: list[Path]

    @property
    def quant(self) -> str:
        """The file's quant as its publisher named it, else its most common 2-D tensor type."""
        named = file_type_name(self.metadata)
        if named:
            return named
        counts: dict[str, int] = {}
        for tensor in self.tensors.values():
            if len(tensor.shape) > 1:
                counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
        return max(counts, key=counts.get) if counts else ""


def _open_part(path: Path) -> GGUFReader:
    if not path.is_file():
        raise ConversionError(f"{path.name}, a part of this split GGUF, is missing from {path.parent}",
                              "download every part (-0000k-of-0000N) into the same folder")
    try:
        read_header(path)
        return GGUFReader(path)
    except ConversionError:
        raise
    except Exception as exc:
        raise ConversionError(f"cannot read GGUF {path} (truncated or corrupt GGUF header): {type(exc).__name__}: {exc}",
                              "the file is truncated or corrupt: re-download it") from exc


def read_gguf(path: Path) -> GgufFile:
    """Open a GGUF (or every part of a split one, given a part) and check its tensors' types and sizes."""
    path = Path(path)
    parts = split_parts(path)
    readers = [_open_part(part) for part in parts]
    metadata = {key: value.contents() for key, value in readers[0].fields.items() if not key.startswith("GGUF.")}
    expected_parts = int(metadata.get("split.count", 1) or 1)
    if expected_parts != len(parts):
        raise ConversionError(f"{parts[0].name} says the model is split into {expected_parts} files, its name says "
                              f"{len(parts)}", "download the parts again under their original names")
    tensors = {}
    for part, reader in zip(parts, readers, strict=True):
        for tensor in reader.tensors:
            qtype = tensor.tensor_type.name
            check_supported(qtype, f"tensor {tensor.name} in {part.name}")
            shape = [int(d) for d in reversed(tensor.shape.tolist())]
            expected = tensor_nbytes(qtype, shape)
            if tensor.data.nbytes != expected:
                raise ConversionError(f"tensor {tensor.name} in {part} has {tensor.data.nbytes} of its "
                                      f"{expected} bytes", "the file is truncated: re-download it")
            tensors[tensor.name] = tensor
    return GgufFile(path=parts[0], metadata=metadata, tensors=tensors, parts=parts)
