"""The engine: tokenizer and chat template, sampling, stop conditions, caches and the generation loop."""
