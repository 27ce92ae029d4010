"""Registrations of the Qwen3.5-MoE plugin."""

from gdsllm_core import hookimpl

ARCHITECTURE = "qwen3_5_moe"
