"""Fixtures: tiny random Gemma 3 text models from transformers (with a SentencePiece tokenizer, as Gemma ships), saved
once per session, and their GGUFs made by llama.cpp's converter."""

from pathlib import Path

import pytest
from gemma_testing import VARIANTS, make_model

from gdsllm_core import plugins, testing
from gdsllm_gemma import plugin as gemma_plugin


@pytest.fixture(autouse=True, scope="session")
def _gemma_plugin_registered():
    """Make sure the plugin is registered even when entry points are off in tests."""
    plugins.ensure_registered(gemma_plugin, "gemma")
    yield


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory) -> dict[str, tuple[object, Path]]:
    """variant -> (transformers model, its saved folder with a tokenizer.model)."""
    root = tmp_path_factory.mktemp("gemma_hf")
    made = {}
    for variant in VARIANTS:
        model = make_model(variant)
        model.save_pretrained(root / variant)
        testing.add_sentencepiece_tokenizer(root / variant)
        made[variant] = (model, root / variant)
    return made


@pytest.fixture(scope="session")
def ggufs(hf_models, tmp_path_factory) -> dict[str, Path]:
    """outtype -> the GGUF llama.cpp's convert_hf_to_gguf.py writes of the "gguf" variant (f16, q8_0)."""
    root = tmp_path_factory.mktemp("gemma_gguf")
    folder = hf_models["gguf"][1]
    return {outtype: testing.convert_hf_to_gguf(folder, root / f"gemma3-{outtype}.gguf", outtype)
            for outtype in ("f16", "q8_0")}
