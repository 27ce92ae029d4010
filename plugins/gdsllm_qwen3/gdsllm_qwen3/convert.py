"""Qwen2 / Qwen3 / Qwen3-MoE checkpoints -> gdsllm model folder, from a GGUF (as llama.cpp's converter writes it)
or an HF safetensors folder.

Both keep HF's rope layout (llama.cpp runs Qwen with NEOX rope: no row permutation to undo). GGUF tensors are
copied in their block format; a fused expert tensor ([experts, rows, cols]) is cut into one slice per expert, each
a whole number of rows, so the bytes stay exact. HF weights keep their dtype (norms and biases as F32) or are
quantized with `--quant` (embeddings and head at Q8_0, routers kept as they are)."""

from pathlib import Path

from gdsllm_core.convert import ConvertOptions, read_json, write_extents
from gdsllm_core.convert.gguf_file import file_type_name, gguf_architecture, is_gguf, read_gguf
from gdsllm_core.convert.gguf_tokenizer import build_tokenizer
from gdsllm_core.convert.hf_folder import SafetensorsFolder, config_architectures, quant_option, tensor_entry
from gdsllm_core.convert.hf_tokenizer import read_hf_tokenizer, token_ids
from gdsllm_core.errors import ConversionError
from gdsllm_core.layout.qtypes import FLOAT_QTYPES
from gdsllm_core.layout.writer import ModelWriter
from gdsllm_qwen3 import names
from gdsllm_qwen3.config import ARCHITECTURES, HF_ARCHITECTURES, QwenConfig

_HEAD_TENSORS = ("token_embd.weight", "output.weight")


def _layer_of(name: str) -> int:
    return int(name.split(".")[1])


class QwenGgufConverter:
    name = "gguf-qwen3"

    @staticmethod
    def detect(path: Path) -> bool:
        return is_gguf(path) and gguf_architecture(path) in ARCHITECTURES

    @staticmethod
    def default_name(path: Path) -> str:
        return Path(path).stem.lower()

    def convert(self, source: Path, writer: ModelWriter, options: ConvertOptions) -> None:
        if options.quant:
            raise ConversionError(f"re-quantizing a GGUF ({source.name}) to {options.quant} is not supported",
                                  "convert the GGUF as it is, or convert the original safetensors with --quant")
        meta, tensors = read_gguf(source)
        entries: dict[str, tuple] = {}
        for tensor in tensors.values():
            parts = tensor.name.split(".")
            if len(parts) == 4 and parts[0] == "blk" and parts[2] in names.FUSED_EXPERTS:
                for expert in range(tensor.shape[0]):
                    name = f"{names.expert_extent(int(parts[1]), expert)}.{names.FUSED_EXPERTS[parts[2]]}.weight"
                    entries[name] = (name, tensor.qtype, tensor.shape[1:], tensor.data[expert])
            else:
                entries[tensor.name] = (tensor.name, tensor.qtype, tensor.shape, tensor.data)
        sparse = sorted({_layer_of(name) for name in entries if name.endswith(".ffn_gate_inp.weight")})
        config = QwenConfig.from_gguf(meta, n_vocab=len(meta.get("tokenizer.ggml.tokens") or []),
                                      tied="output.weight" not in entries, sparse_layers=sparse)
        groups = names.group(entries, config)
        tokenizer, files = build_tokenizer(meta)
        write_extents(writer, groups, entries.__getitem__, options)
        writer.finish(architecture=config.architecture, config=config.to_dict(), tokenizer=tokenizer, files=files,
                      quant=file_type_name(meta, tensors),
                      source={"format": "gguf", "file": source.name, "name": meta.get("general.name", "")})


class QwenHfConverter:
    name = "hf-qwen3"

    @staticmethod
    def detect(path: Path) -> bool:
        return any(arch in HF_ARCHITECTURES for arch in config_architectures(path))

    @staticmethod
    def default_name(path: Path) -> str:
        return Path(path).resolve().name.lower()

    def convert(self, source: Path, writer: ModelWriter, options: ConvertOptions) -> None:
        raw_config = read_json(source / "config.json")
        config = QwenConfig.from_hf(raw_config)
        quant = quant_option(options.quant)
        tokenizer, files = read_hf_tokenizer(source, token_ids(raw_config.get("eos_token_id")),
                                              raw_config.get("bos_token_id"))
        with SafetensorsFolder(source) as folder:
            loaders = {}  # GGUF-style name -> () -> float tensor
            for hf_name in folder.names():
                target = names.gguf_name(hf_name)
                if target is None:
                    continue
                if target.endswith("_exps.weight"):  # transformers 5's fused experts
                    loaders.update(_split_fused(folder, hf_name, target))
                else:
                    loaders[target] = (lambda n=hf_name: folder.get(n))
            if config.tied_embeddings:
                loaders.pop("output.weight", None)
            groups = names.group(loaders, config)
            seen: set[str] = set()

            def entry_of(name: str) -> tuple:
                tensor = loaders[name]()
                if tensor.dim() > 1:
                    seen.add(FLOAT_QTYPES[tensor.dtype])
                return tensor_entry(name, tensor, quant, head=name in _HEAD_TENSORS,
                                    keep_float=name.endswith(".ffn_gate_inp.weight"))  # routers stay as they are

            write_extents(writer, groups, entry_of, options)
        writer.finish(architecture=config.architecture, config=config.to_dict(), tokenizer=tokenizer, files=files,
                      quant=quant or "/".join(sorted(seen)),
                      source={"format": "hf-safetensors", "folder": source.name,
                              "architectures": raw_config.get("architectures"), "dtypes": sorted(seen)})


def _split_fused(folder: SafetensorsFolder, hf_name: str, target: str) -> dict:
    """Per-expert loaders for a fused expert tensor: gate_up_proj [E, 2F, D] -> ffn_gate, ffn_up [F, D] each;
    down_proj [E, D, F] -> ffn_down."""
    layer = _layer_of(target)
    fused = folder.get(hf_name)
    loaders = {}
    for expert in range(fused.shape[0]):
        prefix = names.expert_extent(layer, expert)
        if target.endswith("ffn_gate_up_exps.weight"):
            gate, up = fused[expert].chunk(2, dim=0)
            loaders[f"{prefix}.ffn_gate.weight"] = (lambda t=gate: t)
            loaders[f"{prefix}.ffn_up.weight"] = (lambda t=up: t)
        else:
            loaders[f"{prefix}.ffn_down.weight"] = (lambda t=fused[expert]: t)
    return loaders
