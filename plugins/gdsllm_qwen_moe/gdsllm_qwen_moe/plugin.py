"""Registrations of the Qwen3.5-MoE plugin."""

from gdsllm_core.api import hookimpl

ARCHITECTURE = "qwen3_5_moe"


@hookimpl
def register_converters(register):
    register("qwen3_5_moe", "gdsllm_qwen_moe.convert:QwenMoeConverter")
    register("qwen35moe_gguf", "gdsllm_qwen_moe.gguf_convert:QwenMoeGgufConverter")


@hookimpl
def register_forward_passes(register):
    register(ARCHITECTURE, "gdsllm_qwen_moe.forward:QwenMoeForward")
