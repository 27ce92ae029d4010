"""GGUF -> gdsllm extents, for `general.architecture == "qwen35moe"` (Qwen3.5-MoE as llama.cpp's
convert_hf_to_gguf.py writes it, quantized or not by llama-quantize).

The extents are laid out as for a safetensors checkpoint (`convert.extent_layout`): per layer its dense part, then
one extent per expert (gate, up, down: one read). Quantized tensors are copied in their GGUF block format. Experts
come stacked per projection (`ffn_{gate,up,down}_exps` [experts, rows, cols]), or with gate and up fused
(`ffn_gate_up_exps` [experts, 2 x rows, cols], gate rows first: the converter's `--fuse-gate-up-exps`); each
expert's rows are whole rows of blocks, so slicing them keeps the bytes exact.

What llama.cpp's converter changed, undone or followed here:
- `ssm_a` holds -exp(A_log): stored back as `ssm_a_log` = log(-ssm_a); `ssm_dt.bias` is `ssm_dt_bias`.
- Norms other than the gated one hold 1 + w, which is what gdsllm stores too.
- With fewer key than value heads the value heads are in tiled order (head j served by key head j % key heads)
  in attn_qkv's value rows, attn_gate, ssm_alpha/beta, ssm_a, ssm_dt, conv1d's value channels and ssm_out's
  columns. They stay so (a column permutation of ssm_out would cut K-quant blocks): the config says
  `linear_value_heads_tiled` and the forward pairs the heads that way.
- The layers of the multi-token-prediction head (`nextn_predict_layers`) are left out, as for safetensors."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gdsllm_core.api import (
    GGUF_MAGIC,
    PLAIN_DTYPES,
    ConversionError,
    ConvertOptions,
    GdsllmError,
    ModelWriter,
    build_tokenizer,
    ggml,
    model_stem,
    read_gguf,
    read_header,
)
from gdsllm_qwen_moe.config import GGUF_ARCHITECTURE, QwenMoeConfig
from gdsllm_qwen_moe.convert import ARCHITECTURE, extent_layout, stored_name
from gdsllm_qwen_moe.names import TensorSpec

FLOAT_KINDS = ("norm", "gated_norm", "vector", "conv")  # stored F32 whatever the GGUF holds
RENAMED = {"ssm_a_log": "ssm_a", "ssm_dt_bias": "ssm_dt.bias"}  # gdsllm's name -> llama.cpp's (a layer's tensors)
_STACKED = {"ffn_gate": "ffn_gate_exps", "ffn_up": "ffn_up_exps", "ffn_down": "ffn_down_exps"}


@dataclass
class GgufTensor:
    """One tensor of a GGUF: its GGML type name, its shape in torch order ([rows, cols] or [experts, rows, cols])
    and its raw data (a numpy view into the mapped file; uint8 rows of blocks for quantized types)."""

    name: str
    qtype: str
    shape: list[int]
    data: np.ndarray


def gguf_architecture(path: Path) -> str | None:
    """`general.architecture` from the header (None if the file is not a readable GGUF)."""
    path = Path(path)
    try:
        if not path.is_file():
            return None
        with open(path, "rb") as handle:
            if handle.read(4) != GGUF_MAGIC:
                return None
        return read_header(path).architecture
    except (OSError, GdsllmError):
        return None


class QwenMoeGgufConverter:
    """A `qwen35moe` GGUF file -> gdsllm extents."""

    name = "qwen35moe_gguf"

    @staticmethod
    def detect(path: Path) -> bool:
        return gguf_architecture(path) == GGUF_ARCHITECTURE

    @staticmethod
    def default_name(path: Path) -> str:
        return model_stem(path).lower()

    def convert(self, source: Path, writer: ModelWriter, options: ConvertOptions) -> None:
        if options.quant:
            raise ConversionError(f"re-quantizing a GGUF ({Path(source).name}) to {options.quant} is not supported",
                                  "convert the GGUF as it is, or convert the original safetensors with --quant")
        gguf = read_gguf(source)
        meta = gguf.metadata
        tensors = {name: GgufTensor(name, tensor.tensor_type.name, [int(d) for d in reversed(tensor.shape.tolist())],
                                    tensor.data) for name, tensor in gguf.tensors.items()}
        if meta.get("general.architecture") != GGUF_ARCHITECTURE:
            raise ConversionError(f"{Path(source).name} is a {meta.get('general.architecture')!r} GGUF, not "
                                  f"{GGUF_ARCHITECTURE!r}", "convert it with the plugin of its architecture")
        if "token_embd.weight" not in tensors:
            raise ConversionError(f"{Path(source).name} has no tensor token_embd.weight",
                                  "the file is incomplete: re-download it")
        config = QwenMoeConfig.from_gguf(meta, vocab_size=tensors["token_embd.weight"].shape[0],
                                         tied="output.weight" not in tensors)
        layout = extent_layout(config)
        plans = [(name, role, index, [_plan(tensors, spec, source) for spec in specs])
                 for name, role, index, specs in layout]  # checks all
        total, done = sum(len(p) for *_, p in plans), 0
        for extent_name, role, index, extent_plans in plans:
            writer.add_extent(extent_name, [read() for read in extent_plans], role, index)
            done += len(extent_plans)
            if options.progress:
                options.progress(extent_name, done, total)
        tokenizer, files = build_tokenizer(meta)
        writer.finish(architecture=ARCHITECTURE, config=config.to_dict(), tokenizer=tokenizer, files=files,
                      quant=gguf.quant,
                      source={"format": "gguf", "file": Path(source).name, "name": meta.get("general.name", "")})


def _plan(tensors: dict[str, GgufTensor], spec: TensorSpec, source: Path) -> Callable[[], tuple]:
    """Locate and shape-check the GGUF data of one spec; returns what reads it as a writer entry."""
    parts = spec.name.split(".")
    if len(parts) == 5 and parts[2] == "expert":
        return _expert_plan(tensors, spec, int(parts[1]), int(parts[3]), parts[4], source)
    if len(parts) == 3 and parts[2] in RENAMED:
        key = f"blk.{parts[1]}.{RENAMED[parts[2]]}"
    else:
        key = spec.name + ".weight"
    if key not in tensors:
        raise ConversionError(f"{Path(source).name} has no tensor {key}", "the file is incomplete or not a "
                              "Qwen3.5-MoE GGUF written by llama.cpp: re-download it")
    tensor = tensors[key]
    shape = list(tensor.shape)
    if spec.kind == "router" and len(shape) == 1:  # ffn_gate_inp_shexp may be written as a vector
        shape = [1, shape[0]]
    if shape != list(spec.shape):
        raise ConversionError(f"tensor {key} in {Path(source).name} has shape {list(tensor.shape)}, expected "
                              f"{list(spec.shape)}", "the GGUF's metadata does not match its tensors: re-download it")
    name = stored_name(spec)
    if spec.kind in FLOAT_KINDS:
        def read_float() -> tuple:
            data = _as_float(tensor).reshape(spec.shape)
            if spec.name.endswith("ssm_a_log"):
                data = torch.log(-data)  # llama.cpp stores A = -exp(A_log)
            return name, "F32", list(spec.shape), data
        return read_float
    return lambda: (name, tensor.qtype, list(spec.shape), _raw(tensor, spec.shape))


def _expert_plan(tensors: dict[str, GgufTensor], spec: TensorSpec, layer: int, expert: int, projection: str,
                 source: Path) -> Callable[[], tuple]:
    """One expert's slice of a stacked or fused projection."""
    name, rows = stored_name(spec), spec.shape[0]
    stacked = tensors.get(f"blk.{layer}.{_STACKED[projection]}.weight")
    fused = tensors.get(f"blk.{layer}.ffn_gate_up_exps.weight") if projection != "ffn_down" else None
    if stacked is None and fused is None:
        raise ConversionError(f"{Path(source).name} has no tensor blk.{layer}.{_STACKED[projection]}.weight" +
                              ("" if projection == "ffn_down" else f" nor blk.{layer}.ffn_gate_up_exps.weight"),
                              "the file is incomplete: re-download it")
    tensor, first_row = (stacked, 0) if stacked is not None else (fused, 0 if projection == "ffn_gate" else rows)
    factor = 1 if stacked is not None else 2
    if len(tensor.shape) != 3 or tensor.shape[0] <= expert or list(tensor.shape[1:]) != [rows * factor, spec.shape[1]]:
        raise ConversionError(f"tensor {tensor.name} in {Path(source).name} has shape {list(tensor.shape)}, which "
                              f"holds no {list(spec.shape)} matrix for {spec.name}",
                              "the GGUF's metadata does not match its tensors: re-download it")

    def read() -> tuple:
        data = _raw(tensor, tensor.shape)[expert, first_row:first_row + rows]
        return name, tensor.qtype, list(spec.shape), np.ascontiguousarray(data)
    return read


def _raw(tensor: GgufTensor, shape) -> np.ndarray:
    """The tensor's data shaped [..., rows, cols] (plain types) or [..., rows, row_bytes] (GGML blocks)."""
    data = tensor.data
    if tensor.qtype in PLAIN_DTYPES:
        return data.reshape(list(shape))
    return data.reshape(*shape[:-1], -1)


def _as_float(tensor: GgufTensor) -> torch.Tensor:
    """The tensor's values as float32, dequantized if the GGUF holds them in blocks (gdsllm keeps norms, conv and
    vectors in F32)."""
    data = torch.from_numpy(np.array(_raw(tensor, tensor.shape)))  # a copy: the file is mapped read-only
    if tensor.qtype in PLAIN_DTYPES:
        return data.float()
    return ggml.dequantize(data.reshape(-1, data.shape[-1]), tensor.qtype)
