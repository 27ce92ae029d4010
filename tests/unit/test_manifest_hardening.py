"""A manifest is untrusted input (issue 20, item 7): every corruption of the matrix below is one clear error that
names the field, from the store, `gdsllm run` and the server; paths never leave the model folder; `list` shows the
damaged model with a status instead of hiding it; a manifest is decoded once per version of the file."""

import json
import os

import pytest
from _cli_models import copy_store, invoke, shared_tiny
from litestar.testing import TestClient
from test_server_api import EchoEngine

from gdsllm_core.errors import CorruptModelError
from gdsllm_core.layout import ModelStore
from gdsllm_core.layout import store as store_mod
from gdsllm_core.server import create_app, urls


def first_layer(extents: list) -> dict:
    return next(extent for extent in extents if extent["name"] == "blk.0")


def _set(path: list, value):
    """A corruption: the manifest's field at `path` (keys and indices; a callable picks a dict) set to `value`."""
    def corrupt(manifest: dict) -> None:
        node = manifest
        for key in path[:-1]:
            node = key(node) if callable(key) else node[key]
        node[path[-1]] = value
    return corrupt


def _drop(path: list):
    def corrupt(manifest: dict) -> None:
        node = manifest
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return corrupt


def _rename_file(new_name: str):
    def corrupt(manifest: dict) -> None:
        old = next(iter(manifest["files"]))
        manifest["files"] = {new_name: manifest["files"].pop(old), **manifest["files"]}
        for extent in manifest["extents"]:
            extent["file"] = new_name if extent["file"] == old else extent["file"]
    return corrupt


# id -> (corruption, a fragment the error must contain)
CORRUPTIONS = {
    "empty files": (_set(["files"], {}), "files"),
    "files key ../": (_rename_file("../../../etc/passwd"), "outside the model folder"),
    "files key absolute": (_rename_file("/etc/passwd"), "outside the model folder"),
    "extent file ../": (_set(["extents", first_layer, "file"], "../tiny/weights.bin"), "outside the model folder"),
    "extent file absolute": (_set(["extents", first_layer, "file"], "/etc/passwd"), "outside the model folder"),
    "extent file not listed": (_set(["extents", first_layer, "file"], "other.bin"), "not listed in `files`"),
    "tokenizer file absolute": (_set(["tokenizer", "file"], "/etc/passwd"), "tokenizer.file"),
    "extent offset negative": (_set(["extents", first_layer, "offset"], -4096), "extents[1].offset"),
    "extent nbytes 1e12": (_set(["extents", first_layer, "nbytes"], 10 ** 12), "lies past the end"),
    "extent nbytes negative": (_set(["extents", first_layer, "nbytes"], -1), "extents[1].nbytes"),
    "tensor offset negative": (_set(["extents", first_layer, "tensors", 0, "offset"], -4096), "extents[1].tensors[0].offset"),
    "tensor nbytes negative": (_set(["extents", first_layer, "tensors", 0, "nbytes"], -1), "extents[1].tensors[0].nbytes"),
    "tensor nbytes 1e12": (_set(["extents", first_layer, "tensors", 0, "nbytes"], 10 ** 12), "lies past the end"),
    "shape negative": (_set(["extents", first_layer, "tensors", 0, "shape"], [-1, 128]), "shape"),
    "shape 2^40 x 576": (_set(["extents", first_layer, "tensors", 0, "shape"], [2 ** 40, 576]), "shape"),
    "file size 1e12": (lambda m: m["files"].update({next(iter(m["files"])): 10 ** 12}), "bytes"),
    "not json": (None, "cannot read"),
    "n_layers missing": (_drop(["config", "n_layers"]), "n_layers"),
    "n_layers 1e9": (_set(["config", "n_layers"], 1e9), "n_layers"),
    "n_layers 10**9": (_set(["config", "n_layers"], 10 ** 9), "n_layers"),
    "n_layers beyond the extents": (_set(["config", "n_layers"], 3), "no extent 'blk.2'"),
}
LOAD_TIME = {"n_layers missing", "n_layers 1e9", "n_layers 10**9", "n_layers beyond the extents"}  # only the plugin's config knows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_tiny(tmp_path_factory)


@pytest.fixture
def root(tmp_path, tiny, monkeypatch):
    root = copy_store(tiny[1], tmp_path / "models")
    monkeypatch.setenv("GDSLLM_MODEL_ROOT", str(root))
    monkeypatch.setenv("GDSLLM_IO", "cpu")
    monkeypatch.setenv("COLUMNS", "250")
    return root


def corrupt(root, kind: str) -> None:
    path = root / "tiny" / "manifest.json"
    change, _ = CORRUPTIONS[kind]
    if change is None:
        path.write_bytes(b'{"name": "tiny", "extents": [')
        return
    manifest = json.loads(path.read_bytes())
    change(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("kind", sorted(set(CORRUPTIONS) - LOAD_TIME))
def test_the_store_refuses_a_corrupted_manifest_naming_the_field(root, kind, monkeypatch):
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k))
    corrupt(root, kind)
    with pytest.raises(CorruptModelError, match="re-convert") as raised:
        ModelStore(root).get("tiny")
    assert CORRUPTIONS[kind][1] in str(raised.value)
    assert not any("passwd" in path for path in opened)


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_run_on_a_corrupted_manifest_is_one_error_line(root, kind):
    corrupt(root, kind)
    result = invoke(["run", "tiny", "--prompt", "hi", "--max-tokens", "2", "--temperature", "0"])
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert CORRUPTIONS[kind][1] in result.stderr.replace("\n", " "), result.stderr


@pytest.mark.parametrize("kind", sorted(set(CORRUPTIONS) - LOAD_TIME))
def test_list_shows_a_damaged_model_with_its_status(root, kind):
    copy_store(root / "tiny", root / "intact")
    corrupt(root, kind)
    result = invoke(["list"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert rows["intact"].split()[-1] == "ok"
    assert "damaged" in rows["tiny"]


def test_a_truncated_weight_file_is_listed_as_damaged(root):
    weights = next(path for path in (root / "tiny").iterdir() if path.suffix == ".bin")
    os.truncate(weights, weights.stat().st_size // 2)
    rows = {line.split()[0]: line for line in invoke(["list"]).stdout.splitlines()[1:]}
    assert "damaged" in rows["tiny"] and "bytes" in rows["tiny"]


def test_a_symlink_out_of_the_folder_is_refused(root, tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"\0" * 16)
    (root / "tiny" / "tokenizer.json").unlink()
    (root / "tiny" / "tokenizer.json").symlink_to(outside)
    with pytest.raises(CorruptModelError, match="outside the model folder"):
        ModelStore(root).get("tiny")


@pytest.mark.parametrize("kind", sorted(set(CORRUPTIONS) - LOAD_TIME))
def test_the_server_answers_a_damaged_model_with_its_problem_not_a_raw_exception(root, kind):
    corrupt(root, kind)
    app = create_app(store=ModelStore(root), engine_factory=EchoEngine, read_token_from_env=False)
    with TestClient(app) as client:
        assert client.get(urls.OLLAMA_TAGS).json() == {"models": []}
        response = client.post(urls.OLLAMA_SHOW, json={"model": "tiny"})
        assert response.status_code == 500 and "re-convert" in response.json()["error"]
        assert "internal server error" not in response.text


def test_a_manifest_is_decoded_once_per_version_of_the_file(root, monkeypatch):
    decoded = []
    real_decode = store_mod.decode_manifest
    monkeypatch.setattr(store_mod, "decode_manifest", lambda path: decoded.append(path) or real_decode(path))
    store = ModelStore(root)
    first = store.get("tiny")
    assert store.get("tiny").manifest is first.manifest and len(decoded) == 1
    path = root / "tiny" / "manifest.json"
    manifest = json.loads(path.read_bytes())
    manifest["created"] = "changed by another process"
    path.write_text(json.dumps(manifest))
    assert store.get("tiny").manifest.created == "changed by another process" and len(decoded) == 2
