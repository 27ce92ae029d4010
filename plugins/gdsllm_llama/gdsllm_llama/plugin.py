"""Registrations of the LLaMA plugin."""

from gdsllm_core.api import hookimpl

ARCHITECTURE = "llama"


@hookimpl
def register_converters(register):
    register("gguf", "gdsllm_llama.gguf_convert:GgufConverter")
    register("hf-safetensors", "gdsllm_llama.hf_convert:HfSafetensorsConverter")


@hookimpl
def register_forward_passes(register):
    register(ARCHITECTURE, "gdsllm_llama.forward_gpu:make_forward")  # CPU reference or GPU by device
