"""The prefix cache on the LLaMA CPU path: a second chat turn computes only its new tokens, its logits equal a cold
prefill of the whole prompt, and its answer equals an engine's without the cache; the budget bounds what is kept."""

import pytest
import torch
from _cli_models import shared_tiny

from gdsllm_core.engine.engine import Engine
from gdsllm_core.engine.forward import LoadOptions
from gdsllm_core.engine.prefix_cache import PrefixCache, cache_nbytes
from gdsllm_core.layout.store import ModelStore
from gdsllm_core.types import ChatMessage, GenerateRequest, SamplingParams
from gdsllm_llama.forward import LlamaForward

GREEDY = SamplingParams(temperature=0, repeat_penalty=1.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_tiny(tmp_path_factory)


def test_reused_cache_gives_the_logits_of_a_cold_prefill(tiny):
    entry = ModelStore(tiny[1]).get("tiny")
    forward = LlamaForward(entry, LoadOptions())
    generator = torch.Generator().manual_seed(0)
    first = torch.randint(0, forward.vocab_size, (40,), generator=generator)
    second = torch.cat([first[:30], torch.randint(0, forward.vocab_size, (25,), generator=generator)])
    cache = forward.new_cache(64)
    forward.prefill(first, cache)
    reused = forward.reuse_cache(cache, 30, 128)
    assert reused.length == 30
    warm = forward.prefill(second[30:], reused, all_logits=True)
    cold = forward.prefill(second, forward.new_cache(128), all_logits=True)[30:]
    torch.testing.assert_close(warm, cold, atol=1e-4, rtol=1e-4)


def chat(engine: Engine, messages: list[ChatMessage]):
    return engine.submit(GenerateRequest(model="tiny", messages=messages, max_tokens=6, sampling=GREEDY)).collect()


def test_second_turn_computes_only_its_new_tokens(tiny):
    turns = ["my name is ada.", "what is your name?", "hello there"]
    with Engine(ModelStore(tiny[1]), LoadOptions(), keep_alive=None) as warm, \
            Engine(ModelStore(tiny[1]), LoadOptions(), keep_alive=None, prefix_cache_bytes=0) as cold:
        messages_warm, messages_cold = [], []
        previous_prompt = previous_answer = 0  # the previous turn's whole prompt and answer, in tokens
        for index, text in enumerate(turns):
            messages_warm.append(ChatMessage("user", text))
            messages_cold.append(ChatMessage("user", text))
            answer_warm, last_warm = chat(warm, list(messages_warm))
            answer_cold, last_cold = chat(cold, list(messages_cold))
            assert answer_warm == answer_cold
            assert last_cold.cached_tokens == 0
            assert last_warm.prompt_tokens + last_warm.cached_tokens == last_cold.prompt_tokens
            if index:
                previous = len(last_warm.tokens) - last_warm.completion_tokens  # this turn's whole prompt
                # everything the previous turn computed is reused: its prompt and all its answer but the last token
                assert last_warm.cached_tokens == previous_prompt + previous_answer - 1
                assert last_warm.prompt_tokens == previous - last_warm.cached_tokens
            previous_prompt = last_warm.prompt_tokens + last_warm.cached_tokens
            previous_answer = last_warm.completion_tokens
            messages_warm.append(ChatMessage("assistant", answer_warm))
            messages_cold.append(ChatMessage("assistant", answer_cold))
        stats = warm.running()[0].stats["prefix_cache"]
        assert stats["hits"] == 2 and stats["entries"] == 1


def test_budget_bounds_the_pool(tiny):
    entry = ModelStore(tiny[1]).get("tiny")
    forward = LlamaForward(entry, LoadOptions())
    caches = [forward.new_cache(64) for _ in range(3)]
    size = cache_nbytes(caches[0])
    assert size == caches[0].k.numel() * 4 * 2
    pool = PrefixCache(2 * size)
    for index, cache in enumerate(caches):
        pool.put("tiny", [index, 1, 2], cache)
    assert pool.stats()["entries"] == 2 and pool.nbytes == 2 * size
    assert pool.take("tiny", [0, 1, 2]) is None  # the oldest went first
    taken, shared = pool.take("tiny", [2, 1, 5])
    assert taken.cache is caches[2] and shared == 2
    assert pool.take("other", [1, 1, 2]) is None
