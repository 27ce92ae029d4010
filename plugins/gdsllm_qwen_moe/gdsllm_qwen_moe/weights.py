"""Stored tensors as the forward pass uses them: plain tensors, `AffineWeight` (packed words + scales + biases) or
`GgmlWeight` (GGML blocks from a GGUF), the last two dequantized when used. On a CUDA device affine matrices go
through the kernels of `gdsllm_kernels.affine_ops` (the fused dequantize + GEMV for up to 8 rows of activations,
else dequantize-to-float then torch's matmul); GGML experts computed in half precision through the GEMV kernels of
`gdsllm_kernels.ops`, other GGML matrices dequantized by its kernel."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gdsllm_core.api import PLAIN_DTYPES, ExtentInfo, ggml
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
        if self.packed.is_cuda:
            from gdsllm_kernels import affine_ops

            return affine_ops.dequantize(self.packed, self.scales, self.biases, self.bits, self.group_size, dtype)
        return affine.dequantize(self.packed, self.scales, self.biases, self.bits, self.group_size, dtype)

    def rows(self, index: torch.Tensor | slice, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Only the rows `index` (an embedding lookup, a block of rows), dequantized."""
        if self.packed.is_cuda:
            return AffineWeight(*(t[index].contiguous() for t in (self.packed, self.scales, self.biases)), self.bits,
                                self.group_size).dense(dtype)
        return affine.dequantize(self.packed[index], self.scales[index], self.biases[index], self.bits,
                                 self.group_size, dtype)


@dataclass
class GgmlWeight:
    """A matrix [rows, cols] in GGML blocks as a GGUF stores it (K-quants, Q8_0, ...): `raw` uint8 [rows,
    row_bytes], dequantized when used (bit-exact with gguf-py on the CPU: `gdsllm_core.quant.ggml`)."""

    raw: torch.Tensor
    qtype: str
    cols: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.raw.shape[0], self.cols

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.rows(slice(None), dtype)

    def rows(self, index: torch.Tensor | slice, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Only the rows `index` (an embedding lookup, a block of rows), dequantized."""
        raw = self.raw[index]
        if raw.is_cuda:
            from gdsllm_kernels import ops

            return ops.dequantize(raw.contiguous(), self.qtype, self.cols, dtype=torch.float32).to(dtype)
        return ggml.dequantize(raw, self.qtype).to(dtype)


Weight = torch.Tensor | AffineWeight | GgmlWeight
QuantizedWeight = (AffineWeight, GgmlWeight)  # the kinds dequantized when used
DEQUANT_BLOCK_VALUES = 1 << 24  # values dequantized at once by `linear` (int64 codes: 128 MiB)
CUDA_DEQUANT_BLOCK_VALUES = 1 << 26  # the same on a GPU (the kernel writes floats alone: 128 MiB of bf16)


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
        elif info.qtype not in PLAIN_DTYPES:
            grouped[info.name] = GgmlWeight(views[info.name], info.qtype, info.shape[-1])
        elif not info.name.endswith((".scales", ".biases")):
            grouped[info.name] = views[info.name]
    return grouped


def dense(weight: Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return weight.dense(dtype) if isinstance(weight, QuantizedWeight) else weight.to(dtype)


def linear(x: torch.Tensor, weight: Weight) -> torch.Tensor:
    """x @ weight.T in x's dtype; an affine matrix goes through the fused GEMV on a GPU where it applies, else is
    dequantized a block of rows at a time (bounded memory)."""
    if not isinstance(weight, QuantizedWeight):
        return F.linear(x, weight.to(x.dtype))
    if x.is_cuda and isinstance(weight, AffineWeight):
        out = _cuda_gemv(x, weight)
        if out is not None:
            return out
    rows, cols = weight.shape
    step = max(1, (CUDA_DEQUANT_BLOCK_VALUES if x.is_cuda else DEQUANT_BLOCK_VALUES) // cols)
    if step >= rows:
        return F.linear(x, weight.dense(x.dtype))
    return torch.cat([F.linear(x, weight.rows(slice(start, start + step), x.dtype)) for start in range(0, rows, step)],
                     dim=-1)


def embedding_rows(weight: Weight, tokens: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if isinstance(weight, QuantizedWeight):
        return weight.rows(tokens, dtype)
    return weight[tokens].to(dtype)


def swiglu_mlp(x: torch.Tensor, gate: Weight, up: Weight, down: Weight, coefficients: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T) @ down.T for x [N, cols], row n scaled by coefficients[n] ([N, 1] in x's dtype)
    when given, written into `out` when given. On a GPU, affine matrices the GEMV takes go through two launches
    (`affine_ops.swiglu_gemv`, then the GEMV scaling as it writes) where the plain ops take six."""
    if x.is_cuda and _ggml_fusable(x, gate, up, down):
        return _ggml_swiglu(x, gate, up, down, coefficients, out)
    if x.is_cuda and _fusable(x, gate, up, down):
        from gdsllm_kernels import affine_ops

        act = affine_ops.swiglu_gemv(_kernel_rows(x), (gate.packed, gate.scales, gate.biases), (up.packed, up.scales, up.biases),
                                     gate.bits, gate.group_size)
        return affine_ops.gemv(act, down.packed, down.scales, down.biases, down.bits, down.group_size,
                               None if coefficients is None else coefficients[:, 0], out)
    y = linear(F.silu(linear(x, gate)) * linear(x, up), down)
    if coefficients is not None:
        y = y * coefficients
    return y if out is None else out.copy_(y)


def swiglu_mlp_grouped(x: torch.Tensor, mlps: list[tuple[Weight, Weight, Weight]], coefficients: list[torch.Tensor],
                       outs: list[torch.Tensor]) -> bool:
    """`swiglu_mlp(x, *mlps[e], coefficients[e], outs[e])` for every e in two launches on a GPU, where every matrix
    is affine in one format the GEMV takes; False (nothing computed) otherwise: the caller runs them one by one."""
    if not (x.is_cuda and all(_fusable(x, *mlp) for mlp in mlps)):
        return False
    formats = {(gate.bits, gate.group_size, gate.scales.dtype, gate.shape, down.bits, down.group_size, down.scales.dtype,
                down.shape) for gate, _, down in mlps}
    if len(formats) != 1:
        return False
    gate0, _, down0 = mlps[0]
    from gdsllm_kernels import affine_ops

    acts = affine_ops.swiglu_gemv_grouped(_kernel_rows(x), [(g.packed, g.scales, g.biases) for g, _, _ in mlps],
                                          [(u.packed, u.scales, u.biases) for _, u, _ in mlps], gate0.bits,
                                          gate0.group_size)
    affine_ops.gemv_grouped(acts, [(d.packed, d.scales, d.biases) for _, _, d in mlps], down0.bits, down0.group_size,
                            [c[:, 0] for c in coefficients], outs)
    return True


def _fusable(x: torch.Tensor, gate: Weight, up: Weight, down: Weight) -> bool:
    from gdsllm_kernels import affine_ops

    if x.dim() != 2 or x.shape[0] > affine_ops.MAX_BATCH:
        return False
    if not all(isinstance(w, AffineWeight) and w.bits in affine_ops.GEMV_BITS for w in (gate, up, down)):
        return False
    return (gate.bits, gate.group_size, gate.scales.dtype, gate.shape) == (up.bits, up.group_size, up.scales.dtype,
                                                                           up.shape)


def _ggml_fusable(x: torch.Tensor, gate: Weight, up: Weight, down: Weight) -> bool:
    """Whether the GGML GEMV kernels take this expert: matrices of one GGML type they read, half-precision
    activations (they multiply fp16 activations; fp32 compute dequantizes instead, exactly), few enough rows."""
    from gdsllm_kernels import ops

    if x.dtype not in (torch.float16, torch.bfloat16) or x.dim() != 2 or x.shape[0] > ops.MAX_BATCH:
        return False
    if not all(isinstance(w, GgmlWeight) and w.qtype == gate.qtype for w in (gate, up, down)):
        return False
    values = max(ops.BLOCKS.get(gate.qtype, (0, 0))[0], 32)
    return gate.qtype in ops.QTYPE_CODES and gate.cols % values == 0 and down.cols % values == 0


def _ggml_swiglu(x: torch.Tensor, gate: "GgmlWeight", up: "GgmlWeight", down: "GgmlWeight",
                 coefficients: torch.Tensor | None, out: torch.Tensor | None) -> torch.Tensor:
    """`swiglu_mlp` by the GGML kernels: silu(gate) * up in one launch (fp16 out), down in a second (fp32 sums)."""
    from gdsllm_kernels import ops

    rows = x.shape[0]
    act = torch.empty(rows, gate.shape[0], dtype=torch.float16, device=x.device)
    ops.gemv_swiglu(gate.raw, up.raw, gate.qtype, x.to(torch.float16).contiguous(), act)
    y = torch.empty(rows, down.shape[0], dtype=torch.float32, device=x.device)
    ops.gemv([down.raw], down.qtype, act, [y])
    if coefficients is not None:
        y = y * coefficients.float()
    return y.to(x.dtype) if out is None else out.copy_(y)


def _kernel_rows(x: torch.Tensor) -> torch.Tensor:
    """x as the affine kernels read it: [rows, cols], contiguous, starting on a 16-byte boundary (they load 16-byte
    vectors; a view into the middle of a row is copied)."""
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    return flat if flat.data_ptr() % 16 == 0 else flat.clone()


def _cuda_gemv(x: torch.Tensor, weight: AffineWeight) -> torch.Tensor | None:
    """x @ weight.T by the fused dequantize + GEMV kernel, or None where it does not apply (more rows of x than it
    takes, a width it has no instance for)."""
    from gdsllm_kernels import affine_ops

    if x.numel() // x.shape[-1] > affine_ops.MAX_BATCH or weight.bits not in affine_ops.GEMV_BITS:
        return None
    out = affine_ops.gemv(_kernel_rows(x), weight.packed, weight.scales, weight.biases, weight.bits, weight.group_size)
    return out.reshape(*x.shape[:-1], out.shape[-1])
