"""Qwen3-MoE experts come from storage one read per expert: the bytes a step reads are the experts the router
picked (transformers' own router logits say which) times an expert's bytes, less the cache's hits."""

import pytest
import torch

from gdsllm_core.convert import convert
from gdsllm_core.engine.forward import LoadOptions
from gdsllm_core.layout.store import ModelStore
from gdsllm_qwen3.forward import QwenForward

PROMPT = [3, 17, 99, 254, 42, 7, 128, 5, 64, 300, 511]
STEPS = 8


@torch.no_grad()
def hf_routes(model, prompt: list[int], steps: int) -> tuple[list[list[set[int]]], list[int]]:
    """Per pass (the prompt, then each greedy decode step) and per layer: the set of experts transformers' router
    picks for the pass's tokens; and the tokens fed."""
    top_k = model.config.num_experts_per_tok
    ids, routes, fed = list(prompt), [], []
    tokens = prompt
    for step in range(steps + 1):
        out = model(torch.tensor([ids]), output_router_logits=True)
        new = len(tokens)
        routes.append([set(torch.topk(logits[-new:], top_k, dim=-1).indices.reshape(-1).tolist())
                       for logits in out.router_logits])
        if step < steps:
            token = int(out.logits[0, -1].argmax())
            fed.append(token)
            ids.append(token)
            tokens = [token]
    return routes, fed


@pytest.mark.parametrize("host_cache", [0, 1 << 30])
def test_bytes_read_are_routed_experts_less_cache_hits(host_cache, hf_models, tmp_path):
    model, folder = hf_models["qwen3moe"]
    routes, fed = hf_routes(model, PROMPT, STEPS)
    entry = convert(folder, ModelStore(tmp_path), "moe")
    expert_bytes = {e.nbytes for e in entry.manifest.extents if ".expert." in e.name}
    assert len(expert_bytes) == 1  # every expert extent alike: gate, up, down
    (expert_nbytes,) = expert_bytes
    forward = QwenForward(entry, LoadOptions(host_cache=host_cache))
    try:
        cache = forward.new_cache(64)
        seen = [set() for _ in routes[0]]
        for step, layer_routes in enumerate(routes):
            before = forward.stats()["expert_cache"]
            if step == 0:
                forward.prefill(torch.tensor(PROMPT), cache)
            else:
                forward.decode(torch.tensor([fed[step - 1]]), [cache])
            after = forward.stats()["expert_cache"]
            picked = sum(len(experts) for experts in layer_routes)
            hits = sum(len(experts & cached) for experts, cached in zip(layer_routes, seen, strict=True)) \
                if host_cache else 0
            assert after["requests"] - before["requests"] == picked, f"step {step}"
            assert after["hits"] - before["hits"] == hits, f"step {step}"
            assert after["bytes_read"] - before["bytes_read"] == (picked - hits) * expert_nbytes, f"step {step}"
            for experts, cached in zip(layer_routes, seen, strict=True):
                cached |= experts
    finally:
        forward.close()
