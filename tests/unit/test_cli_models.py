"""`list`, `show`, `rm`, `verify` (in-process through click's runner) on a tiny LLaMA converted from a transformers
checkpoint; facts are checked against the checkpoint itself (safetensors header, config.json) and the filesystem."""

import json
import math
import re

import pytest
from _cli_models import CHATML, copy_store, invoke, shared_tiny
from rich.filesize import decimal
from safetensors import safe_open


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_tiny(tmp_path_factory)


@pytest.fixture
def store(tmp_path, tiny, monkeypatch):
    """A private copy of the store holding "tiny", as GDSLLM_MODEL_ROOT."""
    root = copy_store(tiny[1], tmp_path / "models")
    monkeypatch.setenv("GDSLLM_MODEL_ROOT", str(root))
    monkeypatch.setenv("GDSLLM_IO", "cpu")
    monkeypatch.setenv("COLUMNS", "200")
    return root


def folder_bytes(folder) -> int:
    return sum(path.stat().st_size for path in folder.iterdir() if path.is_file())


def test_list(store, tmp_path, monkeypatch):
    result = invoke(["list"])
    assert result.exit_code == 0
    header, row = result.stdout.splitlines()
    assert header.split() == ["NAME", "ARCHITECTURE", "QUANT", "SIZE", "MODIFIED", "STATUS"]
    assert row.split()[:3] == ["tiny", "llama", "F32"] and row.split()[-1] == "ok"  # the checkpoint is float32
    assert decimal(folder_bytes(store / "tiny")) in row
    monkeypatch.setenv("GDSLLM_MODEL_ROOT", str(tmp_path / "empty"))
    empty = invoke(["list"])
    assert empty.exit_code == 0 and "no models" in empty.stderr


def test_show(store, tiny):
    checkpoint = tiny[0]
    result = invoke(["show", "tiny"])
    assert result.exit_code == 0, result.output
    rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in result.stdout.split("chat template")[0].splitlines()
                if line.strip())
    with safe_open(checkpoint / "model.safetensors", "pt") as weights:
        shapes = [weights.get_slice(key).get_shape() for key in weights.keys()]
    n_params = sum(math.prod(shape) for shape in shapes)
    config = json.loads((checkpoint / "config.json").read_text())
    assert rows["parameters"].startswith(f"{n_params:,} (")
    assert rows["layers"].strip() == str(config["num_hidden_layers"])
    assert rows["context"].strip() == str(config["max_position_embeddings"])
    assert rows["tensors"].strip() == str(len(shapes))
    assert rows["tensor types"].strip() == f"F32 ×{len(shapes)}"
    assert rows["bytes on disk"].startswith(f"{folder_bytes(store / 'tiny'):,}")
    assert rows["I/O path"].startswith("cpu")
    assert CHATML in result.stdout


def test_rm_refuses_paths_and_deletes_nothing_outside(store, tmp_path):
    victim = tmp_path / "outside" / "victim"
    victim.mkdir(parents=True)
    (victim / "manifest.json").write_text("{}")
    (store / "evil").symlink_to(victim, target_is_directory=True)
    for name in ("../outside/victim", str(victim), "..", "tiny/../../outside/victim"):
        result = invoke(["rm", "--yes", name])
        assert result.exit_code == 1 and "invalid model name" in result.stderr, (name, result.output)
    for args in (["rm", "--yes", "evil"], ["rm", "evil"]):  # a link inside the root that leads out of it
        result = invoke(args, input="y\n")
        assert result.exit_code == 1 and "refusing to delete" in result.stderr and "delete evil" not in result.stderr
    result = invoke(["rm", "--yes", "tiny", "../outside/victim"])  # all names checked before any deletion
    assert result.exit_code == 1
    assert (victim / "manifest.json").is_file() and (store / "tiny" / "manifest.json").is_file()


def test_rm_asks_unless_yes(store):
    kept = invoke(["rm", "tiny"], input="n\n")
    assert kept.exit_code == 0 and "kept tiny" in kept.stderr and (store / "tiny").is_dir()
    gone = invoke(["rm", "tiny"], input="y\n")
    assert gone.exit_code == 0 and "deleted tiny" in gone.stdout and not (store / "tiny").exists()
    missing = invoke(["rm", "--yes", "tiny"])
    assert missing.exit_code == 1 and "not found" in missing.stderr


def test_verify_finds_a_flipped_byte(store):
    ok = invoke(["verify", "tiny"])
    assert ok.exit_code == 0 and "all" in ok.stdout and "match their checksums" in ok.stdout
    manifest = json.loads((store / "tiny" / "manifest.json").read_text())
    extent = next(e for e in manifest["extents"] if e["name"] == "blk.1")
    tensor = extent["tensors"][1]
    with open(store / "tiny" / extent["file"], "r+b") as handle:
        handle.seek(extent["offset"] + tensor["offset"] + 10)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0xFF]))
    bad = invoke(["verify", "tiny"])
    assert bad.exit_code == 1
    assert f"tensor {tensor['name']}" in bad.stderr and "does not match its checksum" in bad.stderr
