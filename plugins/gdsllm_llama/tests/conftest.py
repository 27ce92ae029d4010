"""Fixtures of the LLaMA plugin's tests."""

import pytest

from gdsllm_core import plugins


@pytest.fixture(autouse=True, scope="session")
def _llama_plugin_registered():
    """Make sure the plugin is registered even when entry points are off in tests."""
    import gdsllm_llama.plugin

    plugins.load_plugins()
    if not any(p is gdsllm_llama.plugin for p in plugins.pm.get_plugins()):
        plugins.pm.register(gdsllm_llama.plugin, name="llama")
    yield


@pytest.fixture
def store_root(tmp_path):
    return tmp_path / "models"
