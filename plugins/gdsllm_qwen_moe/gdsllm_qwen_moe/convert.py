"""Converters: HF safetensors (bf16/fp32, per-expert or fused experts) and mlx_lm affine checkpoints -> extents.

Layout: `token_embd`; per layer `blk.{i}` (attention, router, shared expert, norms) then `blk.{i}.expert.{e}` for
each expert (gate, up, down with their scales and biases: one contiguous read); `output_norm`; `output` (absent when
tied). Stored tensors: matrices keep their source dtype, or are affine-quantized (`U32` packed words +
`.scales` + `.biases`, `extra["affine"] = {bits, group_size, cols}`), exactly as MLX packs them. Norms, conv1d,
A_log and dt_bias are stored F32; zero-centred HF norms are stored as their effective multiplier 1 + w.
The multi-token-prediction head (`mtp.*`) and vision tower are skipped; their counts go to `source.skipped`."""

import re
from pathlib import Path

import torch

from gdsllm_core.api import (
    FLOAT_QTYPES,
    ConversionError,
    ConvertOptions,
    ExtentRole,
    ModelWriter,
    UnsupportedQuantError,
    read_hf_tokenizer,
)
from gdsllm_qwen_moe import affine
from gdsllm_qwen_moe.names import TensorSpec, dense_specs, expert_specs, global_specs
from gdsllm_qwen_moe.source import CheckpointSource, Plan, is_checkpoint

ARCHITECTURE = "qwen3_5_moe"
DEFAULT_GROUP_SIZE = 64
ROUTER_BITS = 8  # like mlx_lm's predicate: the router and shared-expert gate stay at 8 bits
_FLOAT_TARGETS = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


def stored_name(spec: TensorSpec) -> str:
    """Name of the main stored tensor of a spec: vectors keep their bare name, the rest get `.weight`."""
    return spec.name if spec.kind == "vector" else spec.name + ".weight"


def extent_layout(config) -> list[tuple[str, ExtentRole, int, list[TensorSpec]]]:
    """Every extent in file order: (name, role, layer index or -1, the specs it holds)."""
    extents = global_specs(config)
    layout = [("token_embd", ExtentRole.EMBEDDINGS, -1, extents["token_embd"])]
    for layer in range(config.num_hidden_layers):
        layout.append((f"blk.{layer}", ExtentRole.LAYER, layer, dense_specs(config, layer)))
        layout += [(f"blk.{layer}.expert.{e}", ExtentRole.EXPERT, layer, expert_specs(config, layer, e))
                   for e in range(config.num_experts)]
    layout.append(("output_norm", ExtentRole.HEAD, -1, extents["output_norm"]))
    if "output" in extents:
        layout.append(("output", ExtentRole.HEAD, -1, extents["output"]))
    return layout


def parse_quant(options: ConvertOptions) -> tuple[int | None, torch.dtype | None, int]:
    """(affine bits or None, float dtype to cast to or None, group size) from `--quant`."""
    quant = (options.quant or "").lower()
    group_size = options.group_size or DEFAULT_GROUP_SIZE
    if quant in ("", "none", "keep"):
        return None, None, group_size
    if quant in _FLOAT_TARGETS:
        return None, _FLOAT_TARGETS[quant], group_size
    match = re.fullmatch(r"affine(\d+)", quant)
    if not match:
        raise UnsupportedQuantError(f"quantization {options.quant!r} is not supported for Qwen3.5-MoE",
                                    "use affine2/3/4/5/6/8 (with --group-size 32/64/128), bf16, f16 or f32")
    bits = int(match.group(1))
    affine.check_format(bits, group_size, "(all matrices)")
    return bits, None, group_size


class QwenMoeConverter:
    """HF safetensors or mlx_lm folder of a Qwen3.5-MoE model -> gdsllm extents."""

    name = "qwen3_5_moe"

    @staticmethod
    def detect(path: Path) -> bool:
        return is_checkpoint(path)

    @staticmethod
    def default_name(path: Path) -> str:
        return Path(path).resolve().name

    def convert(self, source: Path, writer: ModelWriter, options: ConvertOptions) -> None:
        bits, cast, group_size = parse_quant(options)
        with CheckpointSource(source) as checkpoint:
            config = checkpoint.config
            layout = extent_layout(config)
            plans = [(name, role, index, [checkpoint.plan(spec) for spec in specs])
                     for name, role, index, specs in layout]  # checks everything
            total = sum(len(p) for *_, p in plans)
            done = 0
            for extent_name, role, index, extent_plans in plans:
                tensors = []
                for plan in extent_plans:
                    tensors += self._stored(checkpoint, plan, bits, cast, group_size)
                    done += 1
                writer.add_extent(extent_name, tensors, role, index)
                if options.progress:
                    options.progress(extent_name, done, total)
            tokenizer, files = read_hf_tokenizer(Path(source), config.eos_token_ids, bos_id=None)
            quant = (f"affine{bits}-g{group_size}" if bits else "mlx-affine" if checkpoint.quantization
                     else options.quant.lower() if cast else checkpoint.dtype(plans[0][3][0].weight.key).lower())
            writer.finish(architecture=ARCHITECTURE, config=config.to_dict(), tokenizer=tokenizer, files=files,
                          quant=quant, source={"path": str(Path(source).resolve()), "skipped": checkpoint.skipped,
                                               "skipped_note": "mtp.* (multi-token prediction) and vision tensors "
                                                               "are not used by the text forward pass"})

    def _stored(self, checkpoint: CheckpointSource, plan: Plan, bits: int | None, cast: torch.dtype | None,
                group_size: int) -> list[tuple]:
        """The (name, qtype, shape, data[, extra]) entries one logical tensor becomes."""
        spec, name = plan.spec, stored_name(plan.spec)
        if plan.scales is not None:  # already affine: stored exactly as MLX wrote it
            if spec.kind not in ("linear", "router", "embedding"):
                raise ConversionError(f"tensor {plan.weight.key} ({spec.kind}) is quantized; only matrices may be",
                                      "quantize the checkpoint with mlx_lm.convert, which keeps norms and vectors "
                                      "in float")
            return affine_entries(name, checkpoint.read(plan.weight), checkpoint.read(plan.scales),
                                  checkpoint.read(plan.biases), plan.bits, plan.group_size, spec.shape[-1])
        data = checkpoint.read(plan.weight)
        if spec.kind in ("norm", "gated_norm", "vector", "conv"):
            data = data.to(torch.float32).reshape(spec.shape)
            if spec.kind == "norm" and not checkpoint.norms_hold_one_plus_w:
                data = data + 1.0
            return [(name, "F32", list(spec.shape), data)]
        if bits:
            width = ROUTER_BITS if spec.kind == "router" else bits
            if spec.shape[-1] % group_size:
                raise ConversionError(f"tensor {plan.weight.key} has {spec.shape[-1]} columns, not a multiple of the "
                                      f"group size {group_size}", "choose --group-size 32, 64 or 128 dividing it")
            packed, scales, biases = affine.quantize(data, width, group_size)
            return affine_entries(name, packed, scales, biases, width, group_size, spec.shape[-1])
        if cast is not None:
            data = data.to(cast)
        if data.dtype not in FLOAT_QTYPES:
            raise UnsupportedQuantError(f"tensor {plan.weight.key} has dtype {data.dtype}",
                                        "gdsllm reads float32, bfloat16 and float16 matrices")
        return [(name, FLOAT_QTYPES[data.dtype], list(spec.shape), data.reshape(spec.shape))]


def affine_entries(name: str, packed: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int,
                   group_size: int, cols: int) -> list[tuple]:
    """An affine matrix as three stored tensors; `extra["affine"]` on the packed one says how to read it."""
    stem = name.removesuffix(".weight")
    if packed.dtype == torch.int32:
        packed = packed.view(torch.uint32)
    extra = {"affine": {"bits": bits, "group_size": group_size, "cols": cols}}
    scale_type = FLOAT_QTYPES.get(scales.dtype)
    if scale_type is None:
        raise UnsupportedQuantError(f"tensor {stem}.scales has dtype {scales.dtype}", "expected float32/16 or bf16")
    return [(name, "U32", list(packed.shape), packed.contiguous(), extra),
            (stem + ".scales", scale_type, list(scales.shape), scales.contiguous()),
            (stem + ".biases", scale_type, list(biases.shape), biases.to(scales.dtype).contiguous())]

