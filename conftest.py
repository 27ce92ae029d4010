"""Shared fixtures: a fresh model store per test, and the bundled SmolLM2 converted once per session."""

import os
from pathlib import Path

import pytest

from gdsllm_core.layout.store import ModelEntry, ModelStore


def pytest_collection_modifyitems(config, items):
    """GPU tests are skipped where torch sees no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `nox -s gpu` on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def model_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty model store; GDSLLM_MODEL_ROOT points at it for the test."""
    root = tmp_path / "models"
    root.mkdir()
    monkeypatch.setenv("GDSLLM_MODEL_ROOT", str(root))
    return root


@pytest.fixture(scope="session")
def smollm2_store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    """A store holding the bundled SmolLM2-135M-Instruct, converted once for the whole session."""
    from gdsllm_core.bundled import DEFAULT_MODEL, default_gguf
    from gdsllm_core.convert import convert

    store = ModelStore(tmp_path_factory.mktemp("smollm2-store"))
    convert(default_gguf(), store, name=DEFAULT_MODEL)
    return store


@pytest.fixture(scope="session")
def smollm2(smollm2_store: ModelStore) -> ModelEntry:
    from gdsllm_core.bundled import DEFAULT_MODEL

    return smollm2_store.get(DEFAULT_MODEL)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
