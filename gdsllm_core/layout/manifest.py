"""manifest.json: what a converted model is and where each of its tensors lies."""

import msgspec

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


class TensorInfo(msgspec.Struct):
    """One tensor inside an extent. `offset` is relative to the extent's start and a multiple of 4 KiB.

    `qtype` is a GGML type name (F32, F16, BF16, Q4_0 … Q6_K) or a plain integer type (U8, U32, I32) for packed
    formats; `shape` is in torch order (rows first), logical (dequantized) for GGML types, storage for plain ones.
    `extra` carries format details a plugin needs (e.g. affine bits and group size)."""

    name: str
    qtype: str
    shape: list[int]
    offset: int
    nbytes: int
    crc32: int
    extra: dict = {}


class ExtentInfo(msgspec.Struct):
    """A run of bytes always read together (one layer, one MoE expert, the embeddings): one read."""

    name: str
    file: str
    offset: int
    nbytes: int
    tensors: list[TensorInfo]


class TokenizerInfo(msgspec.Struct):
    """How to build the tokenizer: `kind` is "hf" (tokenizer.json) or "sentencepiece" (tokenizer.model)."""

    kind: str
    file: str
    bos_id: int | None = None
    eos_ids: list[int] = []
    add_bos: bool = False
    chat_template: str | None = None


class Manifest(msgspec.Struct):
    """Everything the runtime knows about a converted model, besides its bytes."""

    name: str
    architecture: str
    config: dict
    tokenizer: TokenizerInfo
    extents: list[ExtentInfo]
    files: dict[str, int]
    quant: str = ""
    source: dict = {}
    created: str = ""
    format_version: int = FORMAT_VERSION

    def extent(self, name: str) -> ExtentInfo:
        for extent in self.extents:
            if extent.name == name:
                return extent
        raise KeyError(f"model {self.name!r} has no extent {name!r}")

    def tensor_count(self) -> int:
        return sum(len(extent.tensors) for extent in self.extents)


def encode(manifest: Manifest) -> bytes:
    return msgspec.json.format(msgspec.json.encode(manifest), indent=1)


def decode(data: bytes) -> Manifest:
    return msgspec.json.decode(data, type=Manifest)
