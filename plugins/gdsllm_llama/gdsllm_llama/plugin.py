"""Registrations of the LLaMA plugin."""

from gdsllm_core import hookimpl

ARCHITECTURE = "llama"
