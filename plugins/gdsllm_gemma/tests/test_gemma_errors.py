"""Gemma 3 checkpoints the plugin does not run are refused at conversion, naming what is wrong."""

import json

import pytest

from gdsllm_core.convert import convert
from gdsllm_core.errors import ConversionError
from gdsllm_core.layout.store import ModelStore


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["Gemma3ForConditionalGeneration"]}, "vision tower"),
    ({"hidden_activation": "gelu"}, "activation 'gelu'"),
    ({"attn_logit_softcapping": 50.0}, "soft-capping"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}, "rope scaling 'yarn'"),
])
def test_unsupported_configs_are_refused(change, message, hf_models, tmp_path):
    folder = hf_models["hf"][1]
    copy = tmp_path / "hf"
    copy.mkdir()
    for file in folder.iterdir():
        if file.name != "config.json":
            (copy / file.name).symlink_to(file)
    config = json.loads((folder / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ConversionError, match=message):
        convert(copy, ModelStore(tmp_path / "store"), "bad")
    assert not any((tmp_path / "store").glob("*"))
