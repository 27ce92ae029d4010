"""Gemma 3 (text) for gdsllm."""
