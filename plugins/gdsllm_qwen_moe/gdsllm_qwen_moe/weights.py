"""Stored tensors as the CPU forward pass uses them: plain tensors, or `AffineWeight` (packed words + scales +
biases, dequantized when used)."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gdsllm_core.layout.manifest import ExtentInfo
from gdsllm_qwen_moe import affine


@dataclass
class AffineWeight:
    """An MLX-affine matrix [rows, cols]: `packed` words [rows, cols*bits/32] (uint32 bits held as int32),
    scales/biases [rows, groups]."""

    packed: torch.Tensor
    scales: torch.Tensor
    biases: torch.Tensor
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 32 // self.bits

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return affine.dequantize(self.packed, self.scales, self.biases, self.bits, self.group_size, dtype)

    def rows(self, index: torch.Tensor | slice, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Only the rows `index` (an embedding lookup, a block of rows), dequantized."""
        return affine.dequantize(self.packed[index], self.scales[index], self.biases[index], self.bits,
                                 self.group_size, dtype)


Weight = torch.Tensor | AffineWeight
DEQUANT_BLOCK_VALUES = 1 << 24  # values dequantized at once by `linear` (int64 codes: 128 MiB)


def to_device(weights: dict[str, Weight], device: torch.device) -> dict[str, Weight]:
    """The same weights on `device` (no copy when already there)."""
    moved: dict[str, Weight] = {}
    for name, weight in weights.items():
        if isinstance(weight, AffineWeight):
            moved[name] = AffineWeight(*(t.to(device, non_blocking=True) for t in
                                         (weight.packed, weight.scales, weight.biases)), weight.bits, weight.group_size)
        else:
            moved[name] = weight.to(device, non_blocking=True)
    return moved


def group_weights(extent: ExtentInfo, views: dict[str, torch.Tensor]) -> dict[str, Weight]:
    """name -> tensor or AffineWeight for one extent's views (`.scales`/`.biases` folded into their matrix)."""
    grouped: dict[str, Weight] = {}
    for info in extent.tensors:
        spec = info.extra.get("affine") if info.extra else None
        if spec:
            stem = info.name.removesuffix(".weight")
            grouped[info.name] = AffineWeight(views[info.name].view(torch.int32), views[stem + ".scales"], views[stem + ".biases"],
                                              spec["bits"], spec["group_size"])
        elif not info.name.endswith((".scales", ".biases")):
            grouped[info.name] = views[info.name]
    return grouped


def dense(weight: Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return weight.dense(dtype) if isinstance(weight, AffineWeight) else weight.to(dtype)


def linear(x: torch.Tensor, weight: Weight) -> torch.Tensor:
    """x @ weight.T in x's dtype; an affine matrix is dequantized a block of rows at a time (bounded memory)."""
    if not isinstance(weight, AffineWeight):
        return F.linear(x, weight.to(x.dtype))
    rows, cols = weight.shape
    step = max(1, DEQUANT_BLOCK_VALUES // cols)
    if step >= rows:
        return F.linear(x, weight.dense(x.dtype))
    return torch.cat([F.linear(x, weight.rows(slice(start, start + step), x.dtype)) for start in range(0, rows, step)],
                     dim=-1)


def embedding_rows(weight: Weight, tokens: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if isinstance(weight, AffineWeight):
        return weight.rows(tokens, dtype)
    return weight[tokens].to(dtype)
