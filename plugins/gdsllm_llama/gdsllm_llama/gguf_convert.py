"""GGUF -> gdsllm model folder, for `general.architecture == "llama"`.

Quantized tensors are copied in their GGUF block format (no re-quantization). llama.cpp's converter permutes the
rows of attn_q / attn_k so that its rope rotates adjacent pairs; gdsllm's internal convention is HF's (rope over
the two halves of each head, `rotate_half`), so those rows are permuted back here (a row permutation, which moves
whole quant blocks and keeps the bytes exact). Tokenizer and chat template come from `tokenizer.ggml.*`.
"""

from pathlib import Path

import numpy as np
from gguf import GGUFReader

from gdsllm_core.api import (
    GGUF_MAGIC,
    ConversionError,
    ConvertOptions,
    GdsllmError,
    ModelWriter,
    build_tokenizer,
    model_stem,
    read_gguf,
    read_header,
)
from gdsllm_llama.config import GGUF_ARCHITECTURE, LlamaConfig
from gdsllm_llama.layout import LlamaLayout

ROPE_FREQS = "rope_freqs.weight"  # LLaMA 3.1 GGUFs: per-frequency divisors of the rope inverse frequencies


def gguf_architecture(path: Path) -> str | None:
    """`general.architecture` from the header (None if the header cannot be read: convert then says why)."""
    try:
        return read_header(path).architecture
    except (OSError, GdsllmError):
        return None


def unpermute_rows(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's rope permutation of attn_q/attn_k rows (per head: interleaved pairs -> two halves)."""
    half = rows.shape[0] // n_heads // 2
    return rows.reshape(n_heads, half, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def read_metadata(reader: GGUFReader) -> dict:
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


class GgufConverter:
    name = "gguf"

    @staticmethod
    def detect(path: Path) -> bool:
        """A GGUF file whose architecture is llama (or cannot be read early: then convert reports why)."""
        path = Path(path)
        if not path.is_file():
            return False
        with open(path, "rb") as handle:
            if handle.read(4) != GGUF_MAGIC:
                return False
        return gguf_architecture(path) in (GGUF_ARCHITECTURE, None)

    @staticmethod
    def default_name(path: Path) -> str:
        return model_stem(path).lower()

    def convert(self, source: Path, writer: ModelWriter, options: ConvertOptions) -> None:
        if options.quant:
            raise ConversionError(f"re-quantizing a GGUF ({source.name}) to {options.quant} is not supported",
                                  "convert the GGUF as it is, or convert the original safetensors with --quant")
        gguf = read_gguf(source)
        meta, tensors = gguf.metadata, dict(gguf.tensors)
        freq_factors = tensors.pop(ROPE_FREQS, None)
        config = LlamaConfig.from_gguf(
            meta, n_vocab=len(meta.get("tokenizer.ggml.tokens") or []), tied="output.weight" not in tensors,
            rope_freq_factors=None if freq_factors is None else [float(x) for x in freq_factors.data.reshape(-1)])
        groups = LlamaLayout.group(tensors, config.n_layers, config.tied_embeddings)
        tokenizer, files = build_tokenizer(meta)
        total, done = len(tensors), 0
        for extent_name, names in groups.items():
            entries = []
            for name in names:
                tensor = tensors[name]
                data = tensor.data
                qtype = tensor.tensor_type.name
                shape = [int(d) for d in reversed(tensor.shape.tolist())]
                if name.endswith((".attn_q.weight", ".attn_k.weight")):
                    heads = config.n_heads if ".attn_q." in name else config.n_kv_heads
                    data = unpermute_rows(data.reshape(shape[0], -1), heads)
                entries.append((name, qtype, shape, data))
                done += 1
                if options.progress:
                    options.progress(name, done, total)
            writer.add_extent(extent_name, entries, *LlamaLayout.role_of(extent_name))
        writer.finish(architecture=GGUF_ARCHITECTURE, config=config.to_dict(), tokenizer=tokenizer, files=files,
                      quant=gguf.quant,
                      source={"format": "gguf", "file": gguf.path.name, "name": meta.get("general.name", "")})

