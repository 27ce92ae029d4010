"""HF safetensors folder (config.json + *.safetensors, sharded or not, + tokenizer files) -> gdsllm model folder.

Weights keep their dtype (F32/F16/BF16; norms are stored as F32) or are quantized with `--quant q8_0|q4_0|q4_k|...`
(see `quant_type_for`: the embeddings and output head stay at Q8_0, as llama.cpp keeps them at higher precision).
HF's rope layout is gdsllm's convention: no permutation.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from gdsllm_core.api import (
    FLOAT_QTYPES,
    QUANTIZABLE,
    ConversionError,
    ConvertOptions,
    ModelWriter,
    block_values,
    quantize,
    read_hf_tokenizer,
    read_json,
    token_ids,
)
from gdsllm_llama.config import GGUF_ARCHITECTURE, HF_ARCHITECTURES, LlamaConfig
from gdsllm_llama.layout import LlamaLayout
from gdsllm_llama.names import gguf_name

INDEX_FILE = "model.safetensors.index.json"
_HEAD_TENSORS = ("token_embd.weight", "output.weight")


def shard_files(folder: Path) -> dict[str, Path]:
    """HF tensor name -> the shard holding it; a missing shard is an error naming it."""
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        weight_map = read_json(index_path).get("weight_map") or {}
        missing = sorted({file for file in weight_map.values() if not (folder / file).is_file()})
        if missing:
            raise ConversionError(f"{folder} lacks the shard(s) {', '.join(missing)} listed in {INDEX_FILE}",
                                  "download the missing files (or the whole checkpoint) again")
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{folder} has no *.safetensors files", "download the model's weights")
    located = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            located.update({name: file for name in handle.keys()})
    return located


class HfSafetensorsConverter:
    name = "hf-safetensors"

    @staticmethod
    def detect(path: Path) -> bool:
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            return False
        try:
            archs = json.loads(config_path.read_text()).get("architectures") or []
        except ValueError:
            return False
        return any(arch in HF_ARCHITECTURES for arch in archs)

    @staticmethod
    def default_name(path: Path) -> str:
        return Path(path).resolve().name.lower()

    def convert(self, source: Path, writer: ModelWriter, options: ConvertOptions) -> None:
        raw_config = read_json(source / "config.json")
        config = LlamaConfig.from_hf(raw_config)
        quant = options.quant.upper() if options.quant else None
        if quant is not None and quant not in QUANTIZABLE:
            raise ConversionError(f"--quant {options.quant} is not supported for safetensors input",
                                  f"use one of {', '.join(q.lower() for q in QUANTIZABLE)}, or none to keep the dtype")
        located = shard_files(source)
        names = {}
        for hf_name in located:
            target = gguf_name(hf_name)
            if target is not None:
                names[target] = hf_name
        if config.tied_embeddings:
            names.pop("output.weight", None)
        groups = LlamaLayout.group(names, config.n_layers, config.tied_embeddings)
        tokenizer, files = read_hf_tokenizer(source, token_ids(raw_config.get("eos_token_id")),
                                              raw_config.get("bos_token_id"))
        handles = {}
        seen_dtypes: set[str] = set()
        total, done = len(names), 0
        try:
            for extent_name, members in groups.items():
                entries = []
                for name in members:
                    file = located[names[name]]
                    handle = handles.get(file) or handles.setdefault(file, safe_open(file, framework="pt"))
                    tensor = handle.get_tensor(names[name])
                    if tensor.dim() > 1:
                        seen_dtypes.add(FLOAT_QTYPES.get(tensor.dtype, str(tensor.dtype)))
                    entries.append(self._tensor_entry(name, tensor, quant))
                    done += 1
                    if options.progress:
                        options.progress(name, done, total)
                writer.add_extent(extent_name, entries, *LlamaLayout.role_of(extent_name))
        finally:
            handles.clear()
        writer.finish(architecture=GGUF_ARCHITECTURE, config=config.to_dict(), tokenizer=tokenizer, files=files,
                      quant=quant or "/".join(sorted(seen_dtypes)),
                      source={"format": "hf-safetensors", "folder": source.name,
                              "architectures": raw_config.get("architectures"), "dtypes": sorted(seen_dtypes)})

    @staticmethod
    def _tensor_entry(name: str, tensor: torch.Tensor, quant: str | None) -> tuple:
        if tensor.dtype not in FLOAT_QTYPES:
            raise ConversionError(f"tensor {name} has dtype {tensor.dtype}", "expected float32, float16 or bfloat16")
        shape = list(tensor.shape)
        if tensor.dim() == 1:
            return name, "F32", shape, tensor.float()
        if quant is None:
            return name, FLOAT_QTYPES[tensor.dtype], shape, tensor
        qtype = quant_type_for(name, shape, quant)
        return name, qtype, shape, quantize(tensor, qtype)


def quant_type_for(name: str, shape: list[int], quant: str) -> str:
    """The type a matrix gets under `--quant quant`: Q8_0 for the embeddings and output head when a smaller type
    is asked for; Q5_0 for Q4_K rows that are not a multiple of 256 values (as llama-quantize falls back)."""
    if name in _HEAD_TENSORS and quant != "Q8_0":
        return "Q8_0"
    if shape[-1] % block_values(quant):
        return "Q5_0"
    return quant

