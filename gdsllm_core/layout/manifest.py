"""manifest.json: what a converted model is and where each of its tensors lies."""

import enum

import msgspec

FORMAT_VERSION = 2  # 2: extents declare their role (version 1 folders are given roles when read: `decode`)
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


class ExtentRole(enum.StrEnum):
    """What an extent is to the runtime, declared by the plugin's layout when it writes the extent."""

    LAYER = "layer"  # one decoder layer (dense models), or one layer's dense part (MoE); `index` is the layer
    EXPERT = "expert"  # one MoE expert of layer `index` (gate, up, down with their scales)
    EMBEDDINGS = "embeddings"  # the token embeddings (also the head when they are tied)
    HEAD = "head"  # the final norm and the output projection
    OTHER = "other"  # anything else the model needs resident (shared tables, vision towers)


class ExtentInfo(msgspec.Struct):
    """A run of bytes always read together (one layer, one MoE expert, the embeddings): one read. `role` and
    `index` say what it is (a layer or expert extent carries its layer's index; -1 otherwise)."""

    name: str
    file: str
    offset: int
    nbytes: int
    tensors: list[TensorInfo]
    role: ExtentRole = ExtentRole.OTHER
    index: int = -1


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
    manifest = msgspec.json.decode(data, type=Manifest)
    if manifest.format_version < 2:
        _declare_version1_roles(manifest)
    return manifest


def _declare_version1_roles(manifest: Manifest) -> None:
    """Version 1 folders predate declared roles; the two layouts that wrote them (LLaMA and Qwen3.5-MoE) named
    their extents `token_embd`, `blk.{i}`, `blk.{i}.expert.{e}`, `output_norm` and `output`, which say the role."""
    for extent in manifest.extents:
        parts = extent.name.split(".")
        if parts[0] == "blk" and len(parts) >= 2 and parts[1].isdigit():
            extent.index = int(parts[1])
            extent.role = ExtentRole.EXPERT if len(parts) == 4 and parts[2] == "expert" else ExtentRole.LAYER
        elif extent.name == "token_embd":
            extent.role = ExtentRole.EMBEDDINGS
        elif extent.name in ("output_norm", "output"):
            extent.role = ExtentRole.HEAD
