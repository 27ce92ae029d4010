"""The MoE block of Qwen3.5: a softmax top-k router (renormalised over the k), routed experts through core's
expert residency (`gdsllm_core.runtime.experts`: VRAM and host tiers over storage, one expert = one read), and a
shared expert behind a sigmoid gate."""

from collections.abc import Callable

import torch
import torch.nn.functional as F

from gdsllm_core.api import (
    ExpertResidency,
    ExtentInfo,
    ExtentReader,
    Manifest,
    predicted,
    routed_experts,
    routing_table,
    top_k_routing,
)
from gdsllm_core.api import prediction_scores as scores_of
from gdsllm_qwen_moe.config import QwenMoeConfig
from gdsllm_qwen_moe.weights import Weight, group_weights, linear, swiglu_mlp, swiglu_mlp_grouped

ExpertWeights = dict[str, Weight]  # "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight" of one expert


def expert_extent(layer: int, expert: int) -> str:
    return f"blk.{layer}.expert.{expert}"


def expert_extents(manifest: Manifest, config: QwenMoeConfig) -> dict[tuple[int, int], ExtentInfo]:
    """(layer, expert) -> its extent."""
    return {(layer, expert): manifest.extent(expert_extent(layer, expert))
            for layer in range(config.num_hidden_layers) for expert in range(config.num_experts)}


def expert_weights(extent: ExtentInfo, views: dict[str, torch.Tensor]) -> ExpertWeights:
    """One expert's weights, named without the extent's prefix."""
    return {name.removeprefix(extent.name + "."): weight for name, weight in group_weights(extent, views).items()}


def expert_residency(reader: ExtentReader, manifest: Manifest, budget_bytes: int, device: torch.device | None = None,
                     vram_budget_bytes: int = 0) -> ExpertResidency[ExpertWeights]:
    """Core's expert residency over this model's expert extents."""
    config = QwenMoeConfig.from_dict(manifest.config)
    return ExpertResidency(reader, expert_extents(manifest, config), expert_weights, budget_bytes, device,
                           vram_budget_bytes)


def route(x: torch.Tensor, router: Weight, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts, top-k, renormalised: (weights [N, k] in x's dtype, expert ids [N, k])."""
    return top_k_routing(linear(x, router), top_k)


def route_table(x: torch.Tensor, router: Weight, top_k: int, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`route` as (expert ids [N, k], routing table [N, num_experts] in x's dtype: each expert's weight per row, 0
    where not routed)."""
    weights, ids = route(x, router, top_k)
    return ids, routing_table(weights, ids, num_experts)


def shared_expert(x: torch.Tensor, w: dict[str, Weight], prefix: str) -> torch.Tensor:
    """The shared expert's output for x [N, hidden], scaled by its sigmoid gate."""
    out = linear(F.silu(linear(x, w[prefix + "ffn_gate_shexp.weight"])) * linear(x, w[prefix + "ffn_up_shexp.weight"]),
                 w[prefix + "ffn_down_shexp.weight"])
    return torch.sigmoid(linear(x, w[prefix + "ffn_gate_inp_shexp.weight"])) * out


def prediction_scores(x: torch.Tensor, router: Weight, top_k: int, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shape-static part of `predict_experts` (what a CUDA graph can hold): the `limit` largest sums over the
    rows of x of the routing weight `router` gives each expert (as `route` picks them) and those experts' ids,
    largest first; an expert no row picked scores 0."""
    weights, ids = route(x, router, top_k)
    return scores_of(weights, ids, router.shape[0], limit)


def predict_experts(x: torch.Tensor, router: Weight, top_k: int, limit: int) -> list[int]:
    """The experts `router` picks for the rows of x (the union of their top-k, as `route` picks them), the most
    likely first (the largest sum of routing weights over the rows), at most `limit`."""
    return predicted(*prediction_scores(x, router, top_k, limit))


def moe_block(x: torch.Tensor, w: dict[str, Weight], prefix: str, layer: int, config: QwenMoeConfig,
              residency: ExpertResidency[ExpertWeights], read_ahead: Callable[[], tuple[int, list[int]]] | None = None,
              dense: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x [N, hidden] -> routed experts (weighted) + sigmoid-gated shared expert. `dense`: (expert ids, routing
    table, shared expert output) already computed for x (by a decode graph), else computed here: the routing
    first, the shared expert once the reads are on their way (`routed_experts`)."""
    if dense is None:
        ids, table = route_table(x, w[prefix + "ffn_gate_inp.weight"], config.num_experts_per_tok, config.num_experts)
        shared = None
    else:
        ids, table, shared = dense
    routed, computed = routed_experts(x, ids, table, residency, layer, expert_ffn, expert_ffn_grouped, read_ahead,
                                      (lambda: shared_expert(x, w, prefix)) if shared is None else None)
    return routed + (shared if shared is not None else computed)


def expert_ffn(x: torch.Tensor, ew: ExpertWeights, coefficients: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """One expert's MLP on x [N, hidden], row n scaled by coefficients[n] ([N, 1]) when given, into `out` when given."""
    return swiglu_mlp(x, ew["ffn_gate.weight"], ew["ffn_up.weight"], ew["ffn_down.weight"], coefficients, out)


def expert_ffn_grouped(x: torch.Tensor, experts: list[ExpertWeights], coefficients: list[torch.Tensor],
                       outs: list[torch.Tensor]) -> bool:
    """Several experts' MLPs in grouped launches where the kernels take them (False: nothing computed)."""
    return swiglu_mlp_grouped(x, [(ew["ffn_gate.weight"], ew["ffn_up.weight"], ew["ffn_down.weight"]) for ew in experts],
                              coefficients, outs)
