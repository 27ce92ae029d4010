"""Registrations of the Gemma 3 plugin."""

from gdsllm_core.api import hookimpl
from gdsllm_gemma.config import ARCHITECTURE


@hookimpl
def register_converters(register):
    register("gguf-gemma3", "gdsllm_gemma.convert:GemmaGgufConverter")
    register("hf-gemma3", "gdsllm_gemma.convert:GemmaHfConverter")


@hookimpl
def register_forward_passes(register):
    register(ARCHITECTURE, "gdsllm_gemma.forward:GemmaForward")
