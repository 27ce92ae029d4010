"""CUDA graphs for the attention half of Qwen3.5's linear-attention layers in decode: input norm, Gated DeltaNet
(recurrent form), residual and post-attention norm, ~50 launches replayed as one. With cold experts that half sits
between one layer's last expert read and the next layer's reads (nothing overlaps it), and eagerly it is
launch bound: ~2 ms a layer on the H100 against ~0.2 ms of GPU work.

A graph per (layer, batch size) reads and writes static buffers: the step's hidden states and the sequences'
conv / recurrent states are copied in before a replay and the new states copied back into each cache after it.
Graphs of one batch size share a memory pool; they are captured on the first step of that size, in layer order,
and replayed in that order. Full-attention layers (their cache length changes the shapes) and prefill stay
eager."""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gdsllm_qwen_moe.attention import rms_norm
from gdsllm_qwen_moe.config import QwenMoeConfig
from gdsllm_qwen_moe.linear_attn import gated_deltanet
from gdsllm_qwen_moe.weights import Weight


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor  # [B, 1, hidden] in: the residual stream entering the layer
    conv: torch.Tensor  # [B, conv_dim, kernel-1] in and out
    state: torch.Tensor  # [B, Hv, Dk, Dv] fp32 in and out
    residual: torch.Tensor  # [B, 1, hidden] out: x + attention
    normed: torch.Tensor  # [B, 1, hidden] out: the post-attention norm of it (the MoE block's input)


class LinearAttentionGraphs:
    """Replays the attention half of linear-attention layers for one-token decode steps (`run`); the first
    failure to capture turns graphs off for the forward pass (`enabled`), which then runs eagerly."""

    def __init__(self, config: QwenMoeConfig, weights: dict[str, Weight]):
        self.config = config
        self.weights = weights
        self.enabled = True
        self._captured: dict[tuple[int, int], _Captured] = {}
        self._pools: dict[int, tuple] = {}  # batch size -> graph memory pool

    def run(self, layer: int, x: torch.Tensor, conv: list[torch.Tensor],
            state: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(x + attention, its post-attention norm) for x [B, 1, hidden], updating each sequence's `conv[b]` and
        `state[b]` in place; None when graphs are off (the caller runs the layer eagerly)."""
        if not self.enabled:
            return None
        batch = x.shape[0]
        captured = self._captured.get((layer, batch))
        if captured is None:
            captured = self._capture(layer, x, conv, state)
            if captured is None:
                return None
        captured.x.copy_(x)
        for b in range(batch):
            captured.conv[b].copy_(conv[b])
            captured.state[b].copy_(state[b])
        captured.graph.replay()
        for b in range(batch):
            conv[b].copy_(captured.conv[b])
            state[b].copy_(captured.state[b])
        return captured.residual.clone(), captured.normed.clone()

    def _body(self, layer: int, buffers: _Captured) -> Callable[[], None]:
        c, w, p = self.config, self.weights, f"blk.{layer}."

        def body() -> None:
            h = rms_norm(buffers.x, w[p + "attn_norm.weight"], c.rms_norm_eps)
            h, conv, state = gated_deltanet(h, w, p, c, buffers.conv, buffers.state)
            buffers.conv.copy_(conv)
            buffers.state.copy_(state)
            torch.add(buffers.x, h, out=buffers.residual)
            buffers.normed.copy_(rms_norm(buffers.residual, w[p + "post_attention_norm.weight"], c.rms_norm_eps))
        return body

    def _capture(self, layer: int, x: torch.Tensor, conv: list[torch.Tensor],
                 state: list[torch.Tensor]) -> _Captured | None:
        buffers = _Captured(torch.cuda.CUDAGraph(), x.clone(), torch.stack(conv), torch.stack(state).float(),
                            torch.empty_like(x), torch.empty_like(x))
        body = self._body(layer, buffers)
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        try:
            with torch.cuda.stream(side):
                body()  # warm-up outside the capture: cuBLAS / cuDNN set themselves up (its results are discarded)
            torch.cuda.current_stream(x.device).wait_stream(side)
            pool = self._pools.setdefault(x.shape[0], torch.cuda.graph_pool_handle())
            with torch.cuda.graph(buffers.graph, pool=pool):
                body()
        except RuntimeError:  # an op this machine cannot capture: eager from now on
            self.enabled = False
            self._captured.clear()
            return None
        self._captured[(layer, x.shape[0])] = buffers
        return buffers
