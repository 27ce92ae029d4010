"""Extents declare their role: the writer records it (a layer or expert extent must name its layer), version-1
folders get the roles their names implied when read, and the residency takes decoder layers by role, not name."""

import msgspec
import numpy as np
import pytest

from gdsllm_core.errors import ConversionError
from gdsllm_core.layout import manifest as manifest_mod
from gdsllm_core.layout.manifest import ExtentInfo, ExtentRole, Manifest, TokenizerInfo
from gdsllm_core.layout.writer import ModelWriter
from gdsllm_core.runtime.residency import decoder_layers


def vector(name: str) -> list[tuple]:
    return [(name, "F32", [4], np.zeros(4, np.float32))]


def test_the_writer_records_roles_and_wants_a_layer_index(tmp_path):
    with ModelWriter(tmp_path, "m") as writer:
        writer.add_extent("embeddings", vector("e"), ExtentRole.EMBEDDINGS)
        writer.add_extent("second", vector("b"), ExtentRole.LAYER, 1)
        writer.add_extent("first", vector("a"), ExtentRole.LAYER, 0)
        writer.add_extent("moe", vector("x"), ExtentRole.EXPERT, 0)
        with pytest.raises(ConversionError, match="needs its layer index"):
            writer.add_extent("lost", vector("l"), ExtentRole.LAYER)
        manifest = writer.finish(architecture="toy", config={}, tokenizer=TokenizerInfo(kind="none", file=""))
    read = manifest_mod.decode((tmp_path / "m" / manifest_mod.MANIFEST_NAME).read_bytes())
    assert read.format_version == manifest_mod.FORMAT_VERSION == manifest.format_version
    assert [(e.name, e.role, e.index) for e in read.extents] == [
        ("embeddings", ExtentRole.EMBEDDINGS, -1), ("second", ExtentRole.LAYER, 1), ("first", ExtentRole.LAYER, 0),
        ("moe", ExtentRole.EXPERT, 0)]
    # names say nothing: the layers are those declared so, in layer order
    assert [e.name for e in decoder_layers(read.extents)] == ["first", "second"]


def test_version_1_folders_get_the_roles_their_layouts_implied():
    names = ["token_embd", "blk.0", "blk.0.expert.3", "blk.1", "output_norm", "output", "rope_freqs"]
    old = Manifest(name="old", architecture="llama", config={}, tokenizer=TokenizerInfo(kind="hf", file="t"),
                   extents=[ExtentInfo(name=n, file="w", offset=0, nbytes=0, tensors=[]) for n in names], files={"w": 0},
                   format_version=1)
    read = manifest_mod.decode(msgspec.json.encode(old))
    assert [(e.role, e.index) for e in read.extents] == [
        (ExtentRole.EMBEDDINGS, -1), (ExtentRole.LAYER, 0), (ExtentRole.EXPERT, 0), (ExtentRole.LAYER, 1),
        (ExtentRole.HEAD, -1), (ExtentRole.HEAD, -1), (ExtentRole.OTHER, -1)]
