"""LLaMA family (LLaMA 2/3.x, SmolLM2, Mistral) for gdsllm."""
