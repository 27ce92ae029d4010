"""Fixtures: tiny random Qwen2 / Qwen3 / Qwen3-MoE models from transformers (with a real tokenizer, so llama.cpp's
converter accepts them), saved once per session, and their GGUFs made by llama.cpp's converter."""

from pathlib import Path

import pytest
from qwen3_testing import ARCHS, add_tokenizer, make_model

from gdsllm_core import plugins, testing
from gdsllm_qwen3 import plugin as qwen3_plugin


@pytest.fixture(autouse=True, scope="session")
def _qwen3_plugin_registered():
    """Make sure the plugin is registered even when entry points are off in tests."""
    plugins.ensure_registered(qwen3_plugin, "qwen3")
    yield


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory) -> dict[str, tuple[object, Path]]:
    """arch -> (transformers model, its saved folder with a tokenizer llama.cpp's converter accepts)."""
    root = tmp_path_factory.mktemp("qwen3_hf")
    made = {}
    for arch in ARCHS:
        model = make_model(arch)
        model.save_pretrained(root / arch)
        add_tokenizer(arch, root / arch)
        made[arch] = (model, root / arch)
    return made


@pytest.fixture(scope="session")
def ggufs(hf_models, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """(arch, outtype) -> the GGUF llama.cpp's convert_hf_to_gguf.py writes, for outtypes f16 and q8_0."""
    root = tmp_path_factory.mktemp("qwen3_gguf")
    return {(arch, outtype): testing.convert_hf_to_gguf(folder, root / f"{arch}-{outtype}.gguf", outtype)
            for arch, (_model, folder) in hf_models.items() for outtype in ("f16", "q8_0")}
