"""The streamed-decoder runtime every architecture gets from core: a plugin gives the math (`DecoderModel`), core
gives residency (VRAM, pinned host RAM, storage, streamed through a ring), the decode driver (workspace, sequence
table, prefill chunks, batch groups, CUDA graphs, CPU-computed host-tier layers) and typed statistics.

Modules: `protocols` (the contracts), `stats` (typed statistics), `kv` (KV caches), `workspace` (what GPU math
is handed), `blocks` (shared CPU math), `experts` (MoE expert residency and routing). Plugins import all of these through
`gdsllm_core.api`."""
