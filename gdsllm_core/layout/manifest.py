"""manifest.json: what a converted model is and where each of its tensors lies."""

import dataclasses
import enum
from typing import Annotated, TypeVar

import msgspec
from msgspec import Meta

from gdsllm_core.errors import CorruptModelError, GdsllmError

T = TypeVar("T")

FORMAT_VERSION = 2  # 2: extents declare their role (version 1 folders are given roles when read: `decode`)
MANIFEST_NAME = "manifest.json"
MAX_BYTES = 1 << 50  # 1 PiB: no offset or size of a real model comes near
MAX_DIM = 1 << 40  # a tensor dimension; nbytes must still agree with the whole shape

ByteCount = Annotated[int, Meta(ge=0, le=MAX_BYTES)]
Dimension = Annotated[int, Meta(ge=0, le=MAX_DIM)]
RelativePath = Annotated[str, Meta(min_length=1, max_length=4096)]


class TensorInfo(msgspec.Struct):
    """One tensor inside an extent. `offset` is relative to the extent's start and a multiple of 4 KiB.

    `qtype` is a GGML type name (F32, F16, BF16, Q4_0 … Q6_K) or a plain integer type (U8, U32, I32) for packed
    formats; `shape` is in torch order (rows first), logical (dequantized) for GGML types, storage for plain ones.
    `extra` carries format details a plugin needs (e.g. affine bits and group size)."""

    name: str
    qtype: str
    shape: list[Dimension]
    offset: ByteCount
    nbytes: ByteCount
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
    file: RelativePath
    offset: ByteCount
    nbytes: ByteCount
    tensors: list[TensorInfo]
    role: ExtentRole = ExtentRole.OTHER
    index: int = -1


class TokenizerInfo(msgspec.Struct):
    """How to build the tokenizer: `kind` is "hf" (tokenizer.json) or "sentencepiece" (tokenizer.model)."""

    kind: str
    file: str  # "" when the tokenizer lives in the manifest's own fields
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
    files: Annotated[dict[RelativePath, ByteCount], Meta(min_length=1)]
    quant: str = ""
    source: dict = {}
    created: str = ""
    format_version: int = FORMAT_VERSION

    def extent(self, name: str) -> ExtentInfo:
        for extent in self.extents:
            if extent.name == name:
                return extent
        raise CorruptModelError(f"model {self.name!r} has no extent {name!r} (its config names more than its "
                                "manifest holds)", "the manifest is damaged: re-convert the model with `gdsllm pull`")

    def tensor_count(self) -> int:
        return sum(len(extent.tensors) for extent in self.extents)


def config_of(config_type: type[T], config: dict) -> T:
    """A plugin's typed config (a dataclass or Struct) from `manifest.config`, its types and required fields checked
    (keys it does not know are left out); CorruptModelError names the field that is wrong."""
    known = {field.name for field in dataclasses.fields(config_type)} if dataclasses.is_dataclass(config_type) \
        else set(config_type.__struct_fields__)
    try:
        return msgspec.convert({key: value for key, value in config.items() if key in known}, config_type)
    except msgspec.ValidationError as exc:
        raise CorruptModelError(f"the model's config is invalid: {exc}".replace("`$.", "`config."),
                                "the manifest is damaged: re-convert the model with `gdsllm pull`") from None
    except GdsllmError as exc:  # raised by the config's own checks
        raise CorruptModelError(f"the model's config is invalid: {exc.message}", exc.hint) from None


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
