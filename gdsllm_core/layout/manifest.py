"""manifest.json: what a converted model is and where each of its tensors lies."""

import dataclasses
from typing import Annotated, TypeVar

import msgspec
from msgspec import Meta

from gdsllm_core.errors import CorruptModelError, GdsllmError

T = TypeVar("T")

FORMAT_VERSION = 1
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


class ExtentInfo(msgspec.Struct):
    """A run of bytes always read together (one layer, one MoE expert, the embeddings): one read."""

    name: str
    file: RelativePath
    offset: ByteCount
    nbytes: ByteCount
    tensors: list[TensorInfo]


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
    return msgspec.json.decode(data, type=Manifest)
