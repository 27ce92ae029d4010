"""Fails on import, as a plugin built against another gdsllm version might."""

raise RuntimeError("gdsllm-broken-plugin cannot start: needs gdsllm-core 99")
