"""The `gdsllm` command."""
