"""Gemma 3 (text) checkpoints -> gdsllm model folder, from a GGUF (as llama.cpp's converter writes it) or an HF
safetensors folder (Gemma3ForCausalLM).

gdsllm stores each norm's multiplier 1 + w, as llama.cpp's GGUF does (HF stores w: 1 is added here, in fp32).
Both keep HF's rope layout (llama.cpp runs Gemma with NEOX rope). GGUF tensors are copied in their block format;
HF weights keep their dtype (norms as F32) or are quantized with `--quant` (embeddings at Q8_0)."""

from pathlib import Path

from gdsllm_core.convert import ConvertOptions, read_json, write_extents
from gdsllm_core.convert.gguf_file import file_type_name, gguf_architecture, is_gguf, read_gguf
from gdsllm_core.convert.gguf_tokenizer import build_tokenizer
from gdsllm_core.convert.hf_folder import SafetensorsFolder, config_architectures, quant_option, tensor_entry
from gdsllm_core.convert.hf_tokenizer import read_hf_tokenizer, token_ids
from gdsllm_core.errors import ConversionError
from gdsllm_core.layout.qtypes import FLOAT_QTYPES
from gdsllm_core.layout.writer import ModelWriter
from gdsllm_gemma import names
from gdsllm_gemma.config import ARCHITECTURE, HF_ARCHITECTURES, HF_MULTIMODAL, GemmaConfig

_HEAD_TENSORS = ("token_embd.weight", "output.weight")


class GemmaGgufConverter:
    name = "gguf-gemma3"

    @staticmethod
    def detect(path: Path) -> bool:
        return is_gguf(path) and gguf_architecture(path) == ARCHITECTURE

    @staticmethod
    def default_name(path: Path) -> str:
        return Path(path).stem.lower()

    def convert(self, source: Path, writer: ModelWriter, options: ConvertOptions) -> None:
        if options.quant:
            raise ConversionError(f"re-quantizing a GGUF ({source.name}) to {options.quant} is not supported",
                                  "convert the GGUF as it is, or convert the original safetensors with --quant")
        meta, tensors = read_gguf(source)
        embeddings = tensors.get("token_embd.weight")
        n_vocab = embeddings.shape[0] if embeddings is not None else len(meta.get("tokenizer.ggml.tokens") or [])
        config = GemmaConfig.from_gguf(meta, n_vocab=n_vocab, tied="output.weight" not in tensors)
        groups = names.group(tensors, config.n_layers, config.tied_embeddings)
        tokenizer, files = build_tokenizer(meta)

        def entry_of(name: str) -> tuple:
            tensor = tensors[name]
            return name, tensor.qtype, tensor.shape, tensor.data

        write_extents(writer, groups, entry_of, options)
        writer.finish(architecture=ARCHITECTURE, config=config.to_dict(), tokenizer=tokenizer, files=files,
                      quant=file_type_name(meta, tensors),
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

            write_extents(writer, groups, entry_of, options)
        writer.finish(architecture=ARCHITECTURE, config=config.to_dict(), tokenizer=tokenizer, files=files,
                      quant=quant or "/".join(sorted(seen)),
                      source={"format": "hf-safetensors", "folder": source.name,
                              "architectures": raw_config.get("architectures"), "dtypes": sorted(seen)})
