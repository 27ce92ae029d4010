"""CUDA graphs for the dense part of a Qwen3.5 layer in decode: input norm, attention (Gated DeltaNet's recurrent
form, or gated full attention), residual, post-attention norm, router (softmax, top-k, the routing table), the
gated shared expert and, with read-ahead on, the next layer's router on this residual: ~80 launches replayed as
one. With cold experts this part sits between one layer's last expert read and the next layer's reads (nothing
overlaps it), and eagerly it is launch bound: ~0.5 ms of host time per linear-attention layer and ~3 ms per
full-attention one on the H100 against well under 0.1 ms of GPU work.

Linear-attention layers: a graph per (layer, batch size), captured on the first step of that size. The sequences'
conv / recurrent states are copied into static buffers before a replay and back into each cache after it.

Full-attention layers: a graph per (layer, batch size, attended span, the sequences' KV buffers), captured the
second time that key comes up (a key seen once, such as a throw-away cache's, costs no capture). The KV buffers are
written in place at positions held in a device tensor, and each sequence attends to the first `span` slots of its
cache (a power of two past its length, the rest masked: `gated_attention_step`), so one graph serves every length
up to the span (or to its capacity, if smaller). At most MAX_ATTENTION_GRAPHS are kept, the least recently
replayed dropped first.

The step's hidden states come in through a static buffer; the outputs (`DenseStep`) are static buffers too, valid
until the same graph is replayed again (the next step: the caller uses them within the layer). Graphs of one batch
size share a memory pool. Prefill stays eager."""

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gdsllm_qwen_moe.attention import KVCache, gated_attention_step, rms_norm
from gdsllm_qwen_moe.config import QwenMoeConfig
from gdsllm_qwen_moe.experts import prediction_scores, route_table, shared_expert
from gdsllm_qwen_moe.linear_attn import gated_deltanet
from gdsllm_qwen_moe.weights import Weight

MAX_ATTENTION_GRAPHS = 256
MIN_SPAN = 256  # the shortest span a full-attention graph attends to


@dataclass
class DenseStep:
    """A layer's dense part for x [B, 1, hidden]: what the MoE block needs besides its routed experts."""

    residual: torch.Tensor  # [B, 1, hidden] x + attention
    normed: torch.Tensor  # [B, 1, hidden] its post-attention norm (the MoE block's input)
    ids: torch.Tensor  # [B, top_k] the experts routed to, per token
    table: torch.Tensor  # [B, num_experts] each expert's routing weight per token (0 where not routed)
    shared: torch.Tensor  # [B, hidden] the gated shared expert's output
    ahead: tuple[torch.Tensor, torch.Tensor] | None  # the next layer's `prediction_scores` (read-ahead), if any


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor  # [B, 1, hidden] in: the residual stream entering the layer
    out: DenseStep
    conv: torch.Tensor | None = None  # linear attention: [B, conv_dim, kernel-1] in and out
    state: torch.Tensor | None = None  # linear attention: [B, Hv, Dk, Dv] fp32 in and out
    positions: torch.Tensor | None = None  # full attention: [B] int64 in, where each token goes


class DecodeGraphs:
    """Replays the dense part of each layer for one-token decode steps (`linear`, `full`); the first failure to
    capture turns graphs off for the forward pass (`enabled`), which then runs eagerly."""

    def __init__(self, config: QwenMoeConfig, weights: dict[str, Weight], prefetch_limit: int = 0):
        self.config = config
        self.weights = weights
        self.prefetch_limit = prefetch_limit  # > 0: each graph also predicts the next layer's experts
        self.enabled = True
        self._linear: dict[tuple[int, int], _Captured] = {}
        self._attention: OrderedDict[tuple, _Captured] = OrderedDict()
        self._seen: set[tuple] = set()  # full-attention keys met once, not captured yet
        self._pools: dict[int, tuple] = {}  # batch size -> graph memory pool
        self.captures = 0

    def linear(self, layer: int, x: torch.Tensor, conv: list[torch.Tensor],
               state: list[torch.Tensor]) -> DenseStep | None:
        """A linear-attention layer's dense part, updating each sequence's `conv[b]` and `state[b]` in place; None
        when graphs are off (the caller runs the layer eagerly)."""
        if not self.enabled:
            return None
        captured = self._linear.get((layer, x.shape[0]))
        if captured is None:
            captured = self._new(layer, x, conv=torch.stack(conv), state=torch.stack(state).float())
            if not self._capture(captured, self._linear_body(layer, captured)):
                return None
            self._linear[(layer, x.shape[0])] = captured
        captured.x.copy_(x)
        for b in range(x.shape[0]):
            captured.conv[b].copy_(conv[b])
            captured.state[b].copy_(state[b])
        captured.graph.replay()
        for b in range(x.shape[0]):
            conv[b].copy_(captured.conv[b])
            state[b].copy_(captured.state[b])
        return captured.out

    def full(self, layer: int, x: torch.Tensor, kv: list[KVCache], starts: list[int]) -> DenseStep | None:
        """A full-attention layer's dense part, each token written into its sequence's `kv[b]` at `starts[b]`;
        None where this step runs eagerly (graphs off, a key met for the first time)."""
        if not self.enabled:
            return None
        span = max(MIN_SPAN, 1 << max(starts).bit_length())  # a power of two past every position
        key = (layer, span, tuple((cache.keys.data_ptr(), cache.values.data_ptr(), cache.keys.shape[1])
                                  for cache in kv))
        captured = self._attention.get(key)
        if captured is None:
            if key not in self._seen:
                if len(self._seen) >= MAX_ATTENTION_GRAPHS:
                    self._seen.clear()
                self._seen.add(key)
                return None
            self._seen.discard(key)
            captured = self._new(layer, x, positions=torch.tensor(starts, device=x.device))
            if not self._capture(captured, self._full_body(layer, captured, kv, span)):
                return None
            self._attention[key] = captured
            while len(self._attention) > MAX_ATTENTION_GRAPHS:
                self._attention.popitem(last=False)
        self._attention.move_to_end(key)
        captured.x.copy_(x)
        captured.positions.copy_(torch.tensor(starts))
        captured.graph.replay()
        return captured.out

    @property
    def attention_graphs(self) -> int:
        return len(self._attention)

    # capture ------------------------------------------------------------------------------------------------
    def _new(self, layer: int, x: torch.Tensor, **inputs) -> _Captured:
        batch, c = x.shape[0], self.config
        predicts = self.prefetch_limit > 0 and layer + 1 < c.num_hidden_layers
        count = min(self.prefetch_limit, c.num_experts)
        out = DenseStep(torch.empty_like(x), torch.empty_like(x),
                        torch.empty(batch, c.num_experts_per_tok, dtype=torch.int64, device=x.device),
                        torch.empty(batch, c.num_experts, dtype=x.dtype, device=x.device),
                        torch.empty(batch, x.shape[-1], dtype=x.dtype, device=x.device),
                        (torch.empty(count, dtype=torch.float32, device=x.device),
                         torch.empty(count, dtype=torch.int64, device=x.device)) if predicts else None)
        return _Captured(torch.cuda.CUDAGraph(), x.clone(), out, **inputs)

    def _linear_body(self, layer: int, buffers: _Captured) -> Callable[[], None]:
        c, w, p = self.config, self.weights, f"blk.{layer}."

        def body() -> None:
            h = rms_norm(buffers.x, w[p + "attn_norm.weight"], c.rms_norm_eps)
            h, conv, state = gated_deltanet(h, w, p, c, buffers.conv, buffers.state)
            buffers.conv.copy_(conv)
            buffers.state.copy_(state)
            self._moe_inputs(layer, buffers, h)
        return body

    def _full_body(self, layer: int, buffers: _Captured, kv: list[KVCache], span: int) -> Callable[[], None]:
        c, w, p = self.config, self.weights, f"blk.{layer}."

        def body() -> None:
            h = rms_norm(buffers.x, w[p + "attn_norm.weight"], c.rms_norm_eps)
            self._moe_inputs(layer, buffers, gated_attention_step(h, w, p, c, kv, buffers.positions, span))
        return body

    def _moe_inputs(self, layer: int, buffers: _Captured, attention: torch.Tensor) -> None:
        """The layer's common tail: residual, post-attention norm, routing, the shared expert and (with read-ahead)
        the next layer's likely experts, into `out`."""
        c, w, p, out = self.config, self.weights, f"blk.{layer}.", buffers.out
        torch.add(buffers.x, attention, out=out.residual)
        out.normed.copy_(rms_norm(out.residual, w[p + "post_attention_norm.weight"], c.rms_norm_eps))
        flat = out.normed.reshape(out.normed.shape[0], -1)
        ids, table = route_table(flat, w[p + "ffn_gate_inp.weight"], c.num_experts_per_tok, c.num_experts)
        out.ids.copy_(ids)
        out.table.copy_(table)
        out.shared.copy_(shared_expert(flat, w, p))
        if out.ahead is not None:  # the next layer's router on this residual under the next layer's norm
            following = f"blk.{layer + 1}."
            h = rms_norm(out.residual, w[following + "post_attention_norm.weight"], c.rms_norm_eps)
            scores, ids = prediction_scores(h.reshape(h.shape[0], -1), w[following + "ffn_gate_inp.weight"],
                                            c.num_experts_per_tok, self.prefetch_limit)
            out.ahead[0].copy_(scores)
            out.ahead[1].copy_(ids)

    def _capture(self, buffers: _Captured, body: Callable[[], None]) -> bool:
        """Capture `body` into `buffers.graph` (after one warm-up run on a side stream, whose effects the replays
        redo: its inputs are copied in again before each). False (and graphs off from now on) where this machine
        cannot capture it."""
        device = buffers.x.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        try:
            with torch.cuda.stream(side):
                body()  # warm-up outside the capture: cuBLAS / cuDNN set themselves up
            torch.cuda.current_stream(device).wait_stream(side)
            pool = self._pools.setdefault(buffers.x.shape[0], torch.cuda.graph_pool_handle())
            with torch.cuda.graph(buffers.graph, pool=pool):
                body()
        except RuntimeError:  # an op this machine cannot capture: eager from now on
            self.enabled = False
            self._linear.clear()
            self._attention.clear()
            return False
        self.captures += 1
        return True
