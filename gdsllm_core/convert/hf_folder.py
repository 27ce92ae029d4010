"""Reading an HF safetensors folder for a converter: which shard holds each tensor, the tensors themselves, and
each tensor as the writer takes it (kept in its float dtype or quantized with `--quant`)."""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from gdsllm_core.convert import read_json
from gdsllm_core.errors import ConversionError
from gdsllm_core.layout.qtypes import FLOAT_QTYPES
from gdsllm_core.quant.quantize import QUANTIZABLE, block_values, quantize

INDEX_FILE = "model.safetensors.index.json"


def config_architectures(folder: Path) -> list[str]:
    """config.json's `architectures` ([] when there is no readable config.json): what converters detect on."""
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        return []
    try:
        return list(json.loads(config_path.read_text()).get("architectures") or [])
    except ValueError:
        return []


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


class SafetensorsFolder:
    """The tensors of a checkpoint folder by HF name, each shard opened once (a context manager)."""

    def __init__(self, folder: Path):
        self.located = shard_files(Path(folder))
        self._handles: dict[Path, object] = {}

    def __enter__(self) -> "SafetensorsFolder":
        return self

    def __exit__(self, *exc) -> None:
        self._handles.clear()

    def names(self) -> list[str]:
        return list(self.located)

    def get(self, hf_name: str) -> torch.Tensor:
        """The tensor, which must be float32, float16 or bfloat16 (anything else is an error naming it)."""
        file = self.located[hf_name]
        handle = self._handles.get(file) or self._handles.setdefault(file, safe_open(file, framework="pt"))
        tensor = handle.get_tensor(hf_name)
        if tensor.dtype not in FLOAT_QTYPES:
            raise ConversionError(f"tensor {hf_name} in {file.name} has dtype {tensor.dtype}",
                                  "expected float32, float16 or bfloat16")
        return tensor


def quant_option(quant: str | None) -> str | None:
    """`--quant` as a GGML type name (None: keep the dtype); an unsupported one is an error naming it."""
    if quant is None:
        return None
    if quant.upper() not in QUANTIZABLE:
        raise ConversionError(f"--quant {quant} is not supported for safetensors input",
                              f"use one of {', '.join(q.lower() for q in QUANTIZABLE)}, or none to keep the dtype")
    return quant.upper()


def tensor_entry(name: str, tensor: torch.Tensor, quant: str | None, head: bool = False,
                 keep_float: bool = False) -> tuple:
    """(name, qtype, shape, data) for the writer: vectors as F32; matrices in their dtype, or quantized to `quant`
    (Q8_0 for the embeddings and head, `head`, as llama.cpp keeps them; Q5_0, then the float dtype, for rows that
    are not a whole number of blocks); `keep_float` keeps a matrix as it is (e.g. a MoE router)."""
    shape = list(tensor.shape)
    if tensor.dim() == 1:
        return name, "F32", shape, tensor.float()
    if quant is None or keep_float:
        return name, FLOAT_QTYPES[tensor.dtype], shape, tensor.contiguous()
    qtype = "Q8_0" if head and quant != "Q8_0" else quant
    for candidate in (qtype, "Q5_0"):
        if shape[-1] % block_values(candidate) == 0:
            return name, candidate, shape, quantize(tensor, candidate)
    return name, FLOAT_QTYPES[tensor.dtype], shape, tensor.contiguous()
