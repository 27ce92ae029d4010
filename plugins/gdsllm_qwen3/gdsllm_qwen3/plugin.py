"""Registrations of the Qwen2 / Qwen3 / Qwen3-MoE plugin."""

from gdsllm_core.api import hookimpl
from gdsllm_qwen3.config import ARCHITECTURES


@hookimpl
def register_converters(register):
    register("gguf-qwen3", "gdsllm_qwen3.convert:QwenGgufConverter")
    register("hf-qwen3", "gdsllm_qwen3.convert:QwenHfConverter")


@hookimpl
def register_forward_passes(register):
    for architecture in ARCHITECTURES:
        register(architecture, "gdsllm_qwen3.forward:QwenForward")
