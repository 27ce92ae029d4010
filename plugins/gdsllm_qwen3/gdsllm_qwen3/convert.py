"""Qwen2 / Qwen3 / Qwen3-MoE checkpoints -> gdsllm model folder, from a GGUF (as llama.cpp's converter writes it)
or an HF safetensors folder.

Both keep HF's rope layout (llama.cpp runs Qwen with NEOX rope: no row permutation to undo). GGUF tensors are
copied in their block format; a fused expert tensor ([experts, rows, cols]) is cut into one slice per expert, each
a whole number of rows, so the bytes stay exact. HF weights keep their dtype (norms and biases as F32) or are
quantized with `--quant` (embeddings and head at Q8_0, routers kept as they are)."""

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
from gdsllm_qwen3 import names
from gdsllm_qwen3.config import ARCHITECTURES, HF_ARCHITECTURES, QwenConfig

_HEAD_TENSORS = ("token_embd.weight", "output.weight")


def _gguf_entry(name: str, tensor) -> tuple:
    """The writer's (name, qtype, shape in torch order, raw blocks) of a gguf-py tensor."""
    return name, tensor.tensor_type.name, [int(d) for d in reversed(tensor.shape.tolist())], tensor.data


def _layer_of(name: str) -> int:
    return int(name.split(".")[1])


class QwenGgufConverter:
    name = "gguf-qwen3"

    @staticmethod
    def detect(path: Path) -> bool:
        return gguf_architecture(path) in ARCHITECTURES

    @staticmethod
    def default_name(path: Path) -> str:
        return model_stem(path).lower()

    def convert(self, source: Path, writer: ModelWriter, options: ConvertOptions) -> None:
        if options.quant:
            raise ConversionError(f"re-quantizing a GGUF ({source.name}) to {options.quant} is not supported",
                                  "convert the GGUF as it is, or convert the original safetensors with --quant")
        gguf = read_gguf(source)
        meta, entries = gguf.metadata, {}
        for tensor_name, tensor in gguf.tensors.items():
            _, qtype, shape, data = _gguf_entry(tensor_name, tensor)
            parts = tensor_name.split(".")
            if len(parts) == 4 and parts[0] == "blk" and parts[2] in names.FUSED_EXPERTS:
                for expert in range(shape[0]):
                    name = f"{names.expert_extent(int(parts[1]), expert)}.{names.FUSED_EXPERTS[parts[2]]}.weight"
                    entries[name] = (name, qtype, shape[1:], data[expert])
            else:
                entries[tensor_name] = (tensor_name, qtype, shape, data)
        sparse = sorted({_layer_of(name) for name in entries if name.endswith(".ffn_gate_inp.weight")})
        config = QwenConfig.from_gguf(meta, n_vocab=len(meta.get("tokenizer.ggml.tokens") or []),
                                      tied="output.weight" not in entries, sparse_layers=sparse)
        groups = names.group(entries, config)
        tokenizer, files = build_tokenizer(meta)
        write_extents(writer, groups, entries.__getitem__, names.extent_role, options)
        writer.finish(architecture=config.architecture, config=config.to_dict(), tokenizer=tokenizer, files=files,
                      quant=gguf.quant,
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

            write_extents(writer, groups, entry_of, names.extent_role, options)
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
