"""The core's engine generating with the converted model: greedy tokens equal transformers' `generate`."""

import json
import shutil

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gdsllm_core.convert import convert
from gdsllm_core.engine.engine import Engine
from gdsllm_core.engine.forward import LoadOptions
from gdsllm_core.layout.store import ModelStore
from gdsllm_core.types import GenerateRequest, SamplingParams

pytestmark = pytest.mark.reference


def train_tokenizer(vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    words = "the cat sat on a mat while birds fly over the sea at dawn and a dog runs in the park".split()
    corpus = [" ".join(words[(i * 5 + j) % len(words)] for j in range(11)) for i in range(300)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                         "<|im_end|>"], show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


def test_engine_greedy_generation_equals_transformers(hf_model, hf_checkpoints, tmp_path, registered_plugin):
    folder = tmp_path / "with-tokenizer"
    shutil.copytree(hf_checkpoints["per_expert"], folder)
    tokenizer = train_tokenizer(300)
    (folder / "tokenizer.json").write_text(tokenizer.to_str())
    store = ModelStore(tmp_path / "store")
    entry = convert(folder, store, name="tiny-qwen")
    assert entry.manifest.tokenizer.kind == "hf"

    prompt = "the cat sat on a mat"
    ids = tokenizer.encode(prompt).ids
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(ids):].tolist()
    engine = Engine(store, LoadOptions(device="cpu"), keep_alive=None)
    try:
        request = GenerateRequest(model="tiny-qwen", prompt=prompt, raw=True, max_tokens=10,
                                  sampling=SamplingParams(temperature=0, repeat_penalty=1.0))
        events = list(engine.submit(request))
        stats = json.loads(json.dumps(engine.running()[0].stats))
    finally:
        engine.close()
    assert [e.token_id for e in events if e.token_id is not None] == ref
    assert events[-1].done_reason == "length" and events[-1].prompt_tokens == len(ids)
    assert stats["expert_cache"]["storage"]["bytes_read"] > 0
