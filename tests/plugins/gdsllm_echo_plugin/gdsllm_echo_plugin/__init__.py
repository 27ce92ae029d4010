"""A throw-away gdsllm plugin, written the way the README's "writing a plugin" section says."""
