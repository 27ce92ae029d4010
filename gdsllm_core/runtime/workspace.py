"""What the decoder driver hands a model's GPU math: the workspace (buffers allocated once, sliced per step) and
one extent's weights with the shared GPU building blocks over them (fp32 norms, grouped GEMVs, fused SwiGLU,
dequantize-and-multiply for prefill). Importing this module touches no GPU."""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class Workspace:
    """Decode buffers for up to `batch` sequences, allocated once by the driver (graphs replay over them).

    `h` [batch, dim] fp32 is the residual stream a decode layer updates in place; `logits` [batch, vocab] fp32;
    `tokens` [batch] int64; `slots` [batch, ops.SEQ_SLOT_FIELDS] the device table of sequences (positions,
    lengths and KV addresses) the RoPE and attention kernels read; `scratch` fp16, room for the largest matrix
    dequantized (prefill); `buffers` the model's own, as `DecoderModel.decode_buffers` declared them, each
    [batch, *shape]. A model slices everything to the step's rows: `ws.h[:B]`, `ws.buffers["q"][:B]`."""

    device: torch.device
    batch: int
    h: torch.Tensor
    logits: torch.Tensor
    tokens: torch.Tensor
    slots: torch.Tensor
    scratch: torch.Tensor
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)


class ExtentWeights:
    """The tensors of one extent where the model computes from them (GPU memory, or host memory for the CPU), with
    their current quant types (`repack` may have changed them) and whether they stay put (resident: derived values
    such as fp32 norms are kept between steps)."""

    def __init__(self, views: dict[str, torch.Tensor], qtypes: dict[str, str], resident: bool,
                 norms: dict[str, torch.Tensor], fast_gemv: bool = False):
        self.views = views
        self.qtypes = qtypes  # shared by all extents of the model: name -> type
        self.resident = resident
        self._norms = norms  # shared cache of fp32 norm weights of resident extents
        self.fast_gemv = fast_gemv

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.views[name]

    def __contains__(self, name: str) -> bool:
        return name in self.views

    def buffer_key(self) -> int:
        """Address of the first tensor: which buffer (resident arena or ring slot) the extent sits in now."""
        return next(iter(self.views.values())).data_ptr()

    def norm(self, name: str) -> torch.Tensor:
        """An fp32 norm weight (converted once for resident extents)."""
        found = self._norms.get(name)
        if found is not None:
            return found
        weight = self.views[name]
        if weight.dtype != torch.float32:
            weight = weight.float()
            if self.resident:
                self._norms[name] = weight
        return weight

    def gemv(self, names: list[str], x: torch.Tensor, outs: list[torch.Tensor], accumulate: bool = False,
             fast: bool | None = None) -> None:
        """outs[i] (+)= x @ W_i^T for rows x [B, K] fp16: one launch per run of same-typed matrices (q, k, v share
        one when their types agree) and group of `ops.MAX_BATCH` rows."""
        from gdsllm_kernels import ops

        fast = self.fast_gemv if fast is None else fast
        start = 0
        while start < len(names):
            end = start + 1
            while end < len(names) and self.qtypes[names[end]] == self.qtypes[names[start]]:
                end += 1
            ops.gemv([self.views[n] for n in names[start:end]], self.qtypes[names[start]], x, outs[start:end],
                     accumulate=accumulate, fast=fast)
            start = end

    def gated_ffn(self, gate: str, up: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """out = fp16(silu(gate @ x) * (up @ x)) for rows x [B, dim]: one fused launch when gate and up share a
        type."""
        from gdsllm_kernels import ops

        if self.qtypes[gate] != self.qtypes[up]:
            g32 = torch.empty(x.shape[0], out.shape[-1], dtype=torch.float32, device=x.device)
            u32 = torch.empty_like(g32)
            self.gemv([gate, up], x, [g32, u32])
            out.copy_(F.silu(g32) * u32)
        else:
            ops.gemv_swiglu(self.views[gate], self.views[up], self.qtypes[gate], x, out, fast=self.fast_gemv)

    def dequantize(self, name: str, cols: int, scratch: torch.Tensor) -> torch.Tensor:
        """Matrix `name` [rows, cols] as fp16 in `scratch` (valid until the next call)."""
        from gdsllm_kernels import ops

        rows = self.views[name].shape[0]
        return ops.dequantize(self.views[name], self.qtypes[name], cols, out=scratch[:rows * cols].view(rows, cols))

    def project(self, name: str, x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
        """x [T, K] fp16 @ W^T -> fp16 [T, rows], through the dequant scratch and cuBLAS (prefill)."""
        return torch.matmul(x, self.dequantize(name, x.shape[1], scratch).t())
