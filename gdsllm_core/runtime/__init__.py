"""The streamed-decoder runtime: residency of layers and experts, the decode driver, step statistics."""
