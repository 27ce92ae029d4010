"""Qwen3.5-MoE (hybrid Gated DeltaNet + MoE) for gdsllm."""
