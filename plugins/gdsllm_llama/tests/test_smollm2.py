"""The real model: SmolLM2-135M-Instruct Q4_1 (the bundled default) through our converter and CPU forward pass,
against transformers loading the same GGUF."""

import jinja2
import pytest
import torch
from llama_testing import hf_logits_with_cache, relative_error
from tokenizers import Tokenizer

from gdsllm_core.engine.forward import LoadOptions
from gdsllm_llama.forward import LlamaForward


def chat_ids(entry, question: str) -> list[int]:
    info = entry.manifest.tokenizer
    prompt = jinja2.Template(info.chat_template).render(messages=[{"role": "user", "content": question}],
                                                         add_generation_prompt=True)
    return Tokenizer.from_file(str(entry.path / info.file)).encode(prompt, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def smollm2_forward(smollm2):
    forward = LlamaForward(smollm2, LoadOptions())
    yield forward
    forward.close()


def greedy(forward, prompt: list[int], max_tokens: int, eos_ids: list[int]) -> list[int]:
    cache = forward.new_cache(len(prompt) + max_tokens)
    logits = forward.prefill(torch.tensor(prompt), cache)
    out = []
    while len(out) < max_tokens:
        out.append(int(logits.argmax()))
        if out[-1] in eos_ids:
            break
        logits = forward.decode(torch.tensor([out[-1]]), [cache])[0]
    return out


def test_smollm2_answers_paris(smollm2, smollm2_forward):
    info = smollm2.manifest.tokenizer
    assert smollm2.manifest.config["tied_embeddings"] and smollm2.manifest.quant == "Q4_1"
    answer = greedy(smollm2_forward, chat_ids(smollm2, "What is the capital of France?"), 24, info.eos_ids)
    text = Tokenizer.from_file(str(smollm2.path / info.file)).decode(answer)
    assert "Paris" in text


@pytest.mark.slow
@pytest.mark.reference
def test_smollm2_greedy_tokens_match_transformers_gguf(smollm2, smollm2_forward, smollm2_hf_model):
    prompt = chat_ids(smollm2, "Write two sentences about the sea.")
    reference, fed = hf_logits_with_cache(smollm2_hf_model, prompt, 31)
    reference_tokens = fed + [int(reference[-1].argmax())]
    assert len(reference_tokens) == 32
    cache = smollm2_forward.new_cache(len(prompt) + 32)
    ours = [smollm2_forward.prefill(torch.tensor(prompt), cache)]
    for token in fed:  # fed = the reference's greedy tokens: equal argmax at every step = equal greedy text
        ours.append(smollm2_forward.decode(torch.tensor([token]), [cache])[0])
    assert [int(logits.argmax()) for logits in ours] == reference_tokens
    for step, (actual, expected) in enumerate(zip(ours, reference, strict=True)):
        assert relative_error(actual, expected) < 1e-4, f"step {step}"
    assert greedy(smollm2_forward, prompt, 32, []) == reference_tokens
