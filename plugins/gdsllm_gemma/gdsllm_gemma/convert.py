"""Gemma 3 (text) checkpoints -> gdsllm model folder, from a GGUF (as llama.cpp's converter writes it) or an HF
safetensors folder (Gemma3ForCausalLM).

gdsllm stores each norm's multiplier 1 + w, as llama.cpp's GGUF does (HF stores w: 1 is added here, in fp32).
Both keep HF's rope layout (llama.cpp runs Gemma with NEOX rope). GGUF tensors are copied in their block format;
HF weights keep their dtype (norms as F32) or are quantized with `--quant` (embeddings at Q8_0)."""

from pathlib import Path

from gdsllm_core.api import (
    FLOAT_QTYPES,
    ConversionError,
    ConvertOptions,
    ModelWriter,
    SafetensorsFolder,
    build_tokenizer,
    config_architectures,
    gguf_architecture,
    model_stem,
    quant_option,
    read_gguf,
    read_hf_tokenizer,
    read_json,
    tensor_entry,
    token_ids,
    write_extents,
)
from gdsllm_gemma import names
from gdsllm_gemma.config import ARCHITECTURE, HF_ARCHITECTURES, HF_MULTIMODAL, GemmaConfig

_HEAD_TENSORS = ("token_embd.weight", "output.weight")


def _gguf_entry(name: str, tensor) -> tuple:
    """The writer's (name, qtype, shape in torch order, raw blocks) of a gguf-py tensor."""
    return name, tensor.tensor_type.name, [int(d) for d in reversed(tensor.shape.tolist())], tensor.data


class GemmaGgufConverter:
    name = "gguf-gemma3"

    @staticmethod
    def detect(path: Path) -> bool:
        return gguf_architecture(path) == ARCHITECTURE

    @staticmethod
    def default_name(path: Path) -> str:
        return model_stem(path).lower()

    def convert(self, source: Path, writer: ModelWriter, options: ConvertOptions) -> None:
        if options.quant:
            raise ConversionError(f"re-quantizing a GGUF ({source.name}) to {options.quant} is not supported",
                                  "convert the GGUF as it is, or convert the original safetensors with --quant")
        gguf = read_gguf(source)
        meta, entries = gguf.metadata, {name: _gguf_entry(name, t) for name, t in gguf.tensors.items()}
        embeddings = entries.get("token_embd.weight")
        n_vocab = embeddings[2][0] if embeddings is not None else len(meta.get("tokenizer.ggml.tokens") or [])
        config = GemmaConfig.from_gguf(meta, n_vocab=n_vocab, tied="output.weight" not in entries)
        groups = names.group(entries, config.n_layers, config.tied_embeddings)
        tokenizer, files = build_tokenizer(meta)
        write_extents(writer, groups, entries.__getitem__, names.extent_role, options)
        writer.finish(architecture=ARCHITECTURE, config=config.to_dict(), tokenizer=tokenizer, files=files,
                      quant=gguf.quant,
                      source={"format": "gguf", "file": source.name, "name": meta.get("general.name", "")})


class GemmaHfConverter:
    name = "hf-gemma3"

    @staticmethod
    def detect(path: Path) -> bool:
        """Gemma3ForCausalLM folders, and the multimodal ones (so that their conversion says why it refuses)."""
        return any(arch in HF_ARCHITECTURES + HF_MULTIMODAL for arch in config_architectures(path))

    @staticmethod
    def default_name(path: Path) -> str:
        return Path(path).resolve().name.lower()

    def convert(self, source: Path, writer: ModelWriter, options: ConvertOptions) -> None:
        raw_config = read_json(source / "config.json")
        config = GemmaConfig.from_hf(raw_config)
        quant = quant_option(options.quant)
        tokenizer, files = read_hf_tokenizer(source, token_ids(raw_config.get("eos_token_id")),
                                              raw_config.get("bos_token_id"))
        with SafetensorsFolder(source) as folder:
            located = {}
            for hf_name in folder.names():
                target = names.gguf_name(hf_name)
                if target is not None:
                    located[target] = hf_name
            if config.tied_embeddings:
                located.pop("output.weight", None)
            groups = names.group(located, config.n_layers, config.tied_embeddings)
            seen: set[str] = set()

            def entry_of(name: str) -> tuple:
                tensor = folder.get(located[name])
                if names.is_norm(name):
                    tensor = tensor.float() + 1.0
                if tensor.dim() > 1:
                    seen.add(FLOAT_QTYPES[tensor.dtype])
                return tensor_entry(name, tensor, quant, head=name in _HEAD_TENSORS)

            write_extents(writer, groups, entry_of, names.extent_role, options)
        writer.finish(architecture=ARCHITECTURE, config=config.to_dict(), tokenizer=tokenizer, files=files,
                      quant=quant or "/".join(sorted(seen)),
                      source={"format": "hf-safetensors", "folder": source.name,
                              "architectures": raw_config.get("architectures"), "dtypes": sorted(seen)})
