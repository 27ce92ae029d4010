"""The engine loop on a tiny real model: a random-weight "bigram + running mean" network, stored in the model store,
registered by a throw-away plugin. Every generation is compared with an independent recomputation over the whole
token sequence (no cache), greedy with argmax, sampled with transformers' warpers and an inverse-CDF draw."""

import asyncio
import threading
import time

import pytest
import torch
from tokenizers import Tokenizer as HfTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from gdsllm_core import hookimpl, plugins
from gdsllm_core.engine.engine import Engine, RunningModel, default_device
from gdsllm_core.engine.forward import LoadOptions
from gdsllm_core.errors import BadRequestError, ContextOverflowError, ModelNotFoundError
from gdsllm_core.layout import ModelStore, ModelWriter, TokenizerInfo
from gdsllm_core.runtime.residency import Placement, TieredResidency
from gdsllm_core.types import ChatMessage, GenerateRequest, SamplingParams

ARCH = "tiny-mean-bigram"
DIM = 16
CONTEXT = 512
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GREEDY = SamplingParams(temperature=0, repeat_penalty=1.0)
EOS_AFTER = 8  # with it, tiny-b answers PROMPTS[2] with 7 tokens then EOS
EOS_IDS = (0, 2)  # <|im_end|> (the manifest's EOS) and <|endoftext|> (an end-of-turn token by name)
PROMPTS = ["the cat sat on the mat", "a dog ran in the park", "birds fly over the sea at dawn", "x y z"]


class TinyForward:
    """hidden_t = emb[token_t] + mean(emb[tokens_0..t]); logits = 4 * out @ hidden. The cache is the running sum."""

    decode_batch_sizes: list[int] = []
    closed: list[str] = []
    fail_next_decode = False

    def __init__(self, entry, options):
        self.name = entry.name
        self.scheduler = TieredResidency(entry, Placement(device="cpu"))
        self.emb = self.scheduler.fetch("token_embd")["token_embd.weight"]
        self.out = self.scheduler.fetch("output")["output.weight"]
        self.vocab_size = self.emb.shape[0]
        self.max_context = min(entry.manifest.config["context_length"], options.max_context or CONTEXT)
        self.device = torch.device("cpu")
        self.step_delay = options.extra.get("step_delay", 0.0)

    def new_cache(self, max_tokens):
        return {"sum": torch.zeros(DIM), "count": 0, "max_tokens": max_tokens}

    def _step(self, token, cache):
        assert cache["count"] < cache["max_tokens"], "the engine overran the cache it asked for"
        cache["sum"] = cache["sum"] + self.emb[token]
        cache["count"] += 1
        return self.emb[token] + cache["sum"] / cache["count"]

    def prefill(self, tokens, cache, all_logits=False):
        hidden = torch.stack([self._step(int(t), cache) for t in tokens])
        logits = 4 * hidden @ self.out.T
        return logits if all_logits else logits[-1]

    def decode(self, tokens, caches):
        TinyForward.decode_batch_sizes.append(len(caches))
        if TinyForward.fail_next_decode:
            TinyForward.fail_next_decode = False
            raise RuntimeError("simulated device failure")
        if self.step_delay:
            time.sleep(self.step_delay)
        hidden = torch.stack([self._step(int(t), c) for t, c in zip(tokens, caches, strict=True)])
        return 4 * hidden @ self.out.T

    def stats(self):
        return {"tiny": True}

    def close(self):
        TinyForward.closed.append(self.name)


class TinyPlugin:
    @hookimpl
    def register_forward_passes(self, register):
        register(ARCH, TinyForward)


def _train_tokenizer() -> HfTokenizer:
    tokenizer = HfTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    words = "the cat sat on mat a dog ran in park birds fly over sea at dawn x y z hello world".split()
    corpus = [" ".join(words[(i * 7 + j) % len(words)] for j in range(9)) for i in range(200)]
    trainer = trainers.BpeTrainer(vocab_size=160, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


def _write_model(root, name, seed, tokenizer_json: bytes, vocab: int, eos_after: int | None = None):
    """Random weights; with `eos_after`, the output row of <|im_end|> (2) makes it the likely next token after
    token `eos_after`, so generations end by EOS."""
    generator = torch.Generator().manual_seed(seed)
    emb = torch.randn(vocab, DIM, generator=generator)
    out = torch.randn(vocab, DIM, generator=generator)
    if eos_after is not None:
        out[2] = 2 * emb[eos_after]
    with ModelWriter(root, name) as writer:
        writer.add_extent("token_embd", [("token_embd.weight", "F32", [vocab, DIM], emb)])
        writer.add_extent("output", [("output.weight", "F32", [vocab, DIM], out)])
        writer.finish(ARCH, {"context_length": CONTEXT},
                      TokenizerInfo(kind="hf", file="tokenizer.json", eos_ids=[2], chat_template=TEMPLATE),
                      files={"tokenizer.json": tokenizer_json})
    return emb, out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    hf = _train_tokenizer()
    vocab = hf.get_vocab_size()
    weights = {name: _write_model(root, name, seed, hf.to_str().encode(), vocab, eos_after)
               for name, seed, eos_after in (("tiny-a", 1, None), ("tiny-b", 2, EOS_AFTER))}
    plugin = TinyPlugin()
    plugins.pm.register(plugin, name="tiny-test-plugin")
    try:
        yield {"store": ModelStore(root), "weights": weights, "hf": hf}
    finally:
        plugins.pm.unregister(plugin)


@pytest.fixture
def engine(tiny):
    engine = Engine(tiny["store"], LoadOptions(device="cpu"), keep_alive=None)
    try:
        yield engine
    finally:
        engine.close()


def reference_logits(weights, ids: list[int]) -> torch.Tensor:
    """Logits after the last of `ids`, recomputed from scratch (cumulative mean over the whole sequence)."""
    emb, out = weights
    rows = emb[torch.tensor(ids)]
    means = rows.cumsum(0) / torch.arange(1, len(ids) + 1)[:, None]
    return 4 * (rows[-1] + means[-1]) @ out.T


def reference_generate(weights, prompt_ids, max_tokens, eos=EOS_IDS, sampling: SamplingParams = GREEDY):
    ids, new = list(prompt_ids), []
    generator = None
    if sampling.temperature > 0:
        generator = torch.Generator().manual_seed(sampling.seed)
        warpers = [TemperatureLogitsWarper(sampling.temperature), TopKLogitsWarper(sampling.top_k),
                   TopPLogitsWarper(sampling.top_p)]
    for _ in range(max_tokens):
        logits = reference_logits(weights, ids)
        if generator is None:
            token = int(logits.argmax())
        else:
            scores = logits[None]
            for warper in warpers:
                scores = warper(None, scores)
            # inverse CDF with one uniform in (0, 1] per token from the sequence's own seeded generator
            cdf = scores[0].softmax(-1).cumsum(-1)
            uniform = 1.0 - float(torch.rand((), generator=generator))
            token = int((cdf >= uniform * cdf[-1]).nonzero()[0])
        new.append(token)
        ids.append(token)
        if token in eos:
            break
    return new


def generated_ids(events) -> list[int]:
    """Every sampled token is the token_id of exactly one event (an end-of-turn token's event has no text)."""
    return [e.token_id for e in events if e.token_id is not None]


def run(engine, request):
    generation = engine.submit(request)
    return generation, list(generation)


def test_greedy_matches_recomputation(engine, tiny):
    request = GenerateRequest(model="tiny-a", prompt=PROMPTS[0], raw=True, max_tokens=40, sampling=GREEDY)
    generation, events = run(engine, request)
    expected = reference_generate(tiny["weights"]["tiny-a"], generation.prompt_ids, 40)
    assert generated_ids(events) == expected
    assert generation.prompt_ids == tiny["hf"].encode(PROMPTS[0]).ids
    text = "".join(e.text for e in events)
    assert text == tiny["hf"].decode([t for t in expected if t not in EOS_IDS])
    last = events[-1]
    assert last.done and all(not e.done for e in events[:-1])
    assert last.done_reason == ("stop" if expected[-1] in EOS_IDS else "length")
    assert last.completion_tokens == len(expected) and last.prompt_tokens == len(generation.prompt_ids)
    assert last.total_ns >= last.prompt_eval_ns + last.eval_ns > 0 and last.load_ns > 0


def test_chat_messages_use_the_template(engine, tiny):
    request = GenerateRequest(model="tiny-a", messages=[ChatMessage("user", "hello world")], system="be brief",
                              max_tokens=3, sampling=GREEDY)
    generation, _ = run(engine, request)
    rendered = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
    assert generation.prompt_ids == tiny["hf"].encode(rendered).ids
    assert generation.prompt_ids[0] == tiny["hf"].token_to_id("<|im_start|>")


def test_concurrent_prompts_are_batched_and_each_matches_alone(engine, tiny):
    TinyForward.decode_batch_sizes.clear()
    requests = [GenerateRequest(model="tiny-a", prompt=p, raw=True, max_tokens=30 + 5 * i, sampling=GREEDY)
                for i, p in enumerate(PROMPTS)]
    generations = [engine.submit(r) for r in requests]
    results = [list(g) for g in generations]
    for generation, events, request in zip(generations, results, requests, strict=True):
        expected = reference_generate(tiny["weights"]["tiny-a"], generation.prompt_ids, request.max_tokens)
        assert generated_ids(events) == expected
    assert max(TinyForward.decode_batch_sizes) > 1


def test_seeded_sampling_matches_reference_alone_and_in_a_batch(engine, tiny):
    sampling = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, repeat_penalty=1.0, seed=42)
    request = GenerateRequest(model="tiny-a", prompt=PROMPTS[1], raw=True, max_tokens=25, sampling=sampling)
    generation, alone = run(engine, request)
    expected = reference_generate(tiny["weights"]["tiny-a"], generation.prompt_ids, 25, sampling=sampling)
    assert generated_ids(alone) == expected
    others = [engine.submit(GenerateRequest(model="tiny-a", prompt=p, raw=True, max_tokens=25,
                                            sampling=SamplingParams(temperature=1.0, seed=i)))
              for i, p in enumerate(PROMPTS)]
    again = engine.submit(request)
    assert generated_ids(list(again)) == expected
    for other in others:
        list(other)
    different = engine.submit(GenerateRequest(model="tiny-a", prompt=PROMPTS[1], raw=True, max_tokens=25,
                                              sampling=SamplingParams(**{**_fields(sampling), "seed": 43})))
    assert generated_ids(list(different)) != expected


def _fields(params):
    return {name: getattr(params, name) for name in params.__struct_fields__}


def test_stop_string_across_tokens(engine, tiny):
    base = GenerateRequest(model="tiny-a", prompt=PROMPTS[2], raw=True, max_tokens=40, sampling=GREEDY)
    generation, events = run(engine, base)
    full = "".join(e.text for e in events)
    pieces = [e.text for e in events if e.text]
    assert len(pieces) >= 4 and len(full) > 8
    boundary = len(pieces[0]) + len(pieces[1])  # a stop string spanning the 2nd and 3rd pieces
    stop = full[boundary - 1:boundary + 2]
    cut = full.find(stop)
    _, stopped = run(engine, GenerateRequest(model="tiny-a", prompt=PROMPTS[2], raw=True, max_tokens=40,
                                             sampling=GREEDY, stop=["never-there", stop]))
    text = "".join(e.text for e in stopped)
    assert text == full[:cut] and stop not in text
    assert stopped[-1].done_reason == "stop"


def test_length_keeps_the_last_token_text(engine, tiny):
    _, events = run(engine, GenerateRequest(model="tiny-a", prompt=PROMPTS[3], raw=True, max_tokens=40,
                                            sampling=GREEDY))
    ids = generated_ids(events)
    n = min(len(ids) - 1, 6)
    _, short = run(engine, GenerateRequest(model="tiny-a", prompt=PROMPTS[3], raw=True, max_tokens=n,
                                           sampling=GREEDY))
    assert short[-1].done_reason == "length" and short[-1].completion_tokens == n
    assert short[-1].token_id == ids[n - 1]
    assert "".join(e.text for e in short) == tiny["hf"].decode(ids[:n])


def test_context_overflow_error_and_truncation(engine, tiny):
    long_prompt = " ".join(PROMPTS * 6)
    n_prompt = len(tiny["hf"].encode(long_prompt).ids)
    with pytest.raises(ContextOverflowError, match=rf"prompt is {n_prompt} tokens.*context window is 20 tokens"):
        engine.submit(GenerateRequest(model="tiny-a", prompt=long_prompt, raw=True, num_ctx=20))
    generation, events = run(engine, GenerateRequest(model="tiny-a", prompt=long_prompt, raw=True, num_ctx=20,
                                                     max_tokens=4, truncate=True, sampling=GREEDY))
    assert events[-1].prompt_truncated and generation.prompt_ids == tiny["hf"].encode(long_prompt).ids[-16:]
    assert generated_ids(events) == reference_generate(tiny["weights"]["tiny-a"], generation.prompt_ids, 4)


def test_generation_stops_at_the_context_end(engine, tiny):
    generation, events = run(engine, GenerateRequest(model="tiny-a", prompt=PROMPTS[0], raw=True, num_ctx=12,
                                                     sampling=SamplingParams(temperature=1.0, seed=5)))
    produced = events[-1].completion_tokens
    assert produced == len(generated_ids(events))
    if events[-1].done_reason == "length":
        assert generation.prompt_tokens + produced == 12
    else:
        assert generation.prompt_tokens + produced <= 12


def test_cancel_stops_at_the_next_token(tiny):
    with Engine(tiny["store"], LoadOptions(device="cpu", extra={"step_delay": 0.01}), keep_alive=None) as engine:
        generation = engine.submit(GenerateRequest(model="tiny-a", prompt=PROMPTS[0], raw=True, max_tokens=400,
                                                   sampling=SamplingParams(temperature=1.0, seed=1)))
        events = []
        for event in generation:
            events.append(event)
            if len(events) == 3:
                generation.cancel()
        assert events[-1].done_reason == "cancelled" and events[-1].completion_tokens <= 5
        # leaving a sync loop early cancels too, and the engine serves the next request at once
        broken = engine.submit(GenerateRequest(model="tiny-a", prompt=PROMPTS[1], raw=True, max_tokens=400,
                                               sampling=SamplingParams(temperature=1.0, seed=2)))
        for _ in broken:
            break
        assert broken.cancelled
        began = time.perf_counter()
        _, quick = run(engine, GenerateRequest(model="tiny-a", prompt=PROMPTS[2], raw=True, max_tokens=2))
        assert quick[-1].done and time.perf_counter() - began < 2.0


def test_async_consumer_going_away_cancels(tiny):
    with Engine(tiny["store"], LoadOptions(device="cpu", extra={"step_delay": 0.01}), keep_alive=None) as engine:
        request = GenerateRequest(model="tiny-a", prompt=PROMPTS[0], raw=True, max_tokens=400,
                                  sampling=SamplingParams(temperature=1.0, seed=3))

        async def consume_some():
            generation = engine.submit(request)
            seen = 0
            async for _ in generation:
                seen += 1
                if seen == 2:
                    break
            return generation

        generation = asyncio.run(consume_some())
        deadline = time.time() + 2
        while engine.running()[0].stats["active_sequences"] and time.time() < deadline:
            time.sleep(0.01)
        assert generation.cancelled and engine.running()[0].stats["active_sequences"] == 0


def test_async_iteration_equals_sync(engine, tiny):
    request = GenerateRequest(model="tiny-a", prompt=PROMPTS[1], raw=True, max_tokens=12, sampling=GREEDY)

    async def consume():
        return [event async for event in engine.submit(request)]

    async_events = asyncio.run(consume())
    _, sync_events = run(engine, request)
    assert [e.text for e in async_events] == [e.text for e in sync_events]


def test_a_short_request_is_not_starved_by_a_long_one(tiny):
    with Engine(tiny["store"], LoadOptions(device="cpu", extra={"step_delay": 0.005}), keep_alive=None) as engine:
        sampling = SamplingParams(temperature=1.0, seed=0, repeat_penalty=1.0)  # this seed runs 300 tokens, no EOS
        long_generation = engine.submit(GenerateRequest(model="tiny-a", prompt=PROMPTS[0], raw=True,
                                                        max_tokens=300, sampling=sampling))
        long_events = iter(long_generation)  # kept: dropping a half-read iterator cancels its generation
        assert not next(long_events).done
        _, short = run(engine, GenerateRequest(model="tiny-a", prompt=PROMPTS[1], raw=True, max_tokens=5,
                                               sampling=sampling))
        assert short[-1].done_reason == "length"
        long_generation.cancel()
        rest = list(long_events)
        assert rest[-1].done_reason == "cancelled" and rest[-1].completion_tokens < 300


def test_many_threads_each_get_their_own_text(engine, tiny):
    prompts = [f"{PROMPTS[i % 4]} {' '.join(['x'] * (i % 5))}" for i in range(12)]
    results: dict[int, list] = {}

    def worker(i):
        generation = engine.submit(GenerateRequest(model="tiny-a", prompt=prompts[i], raw=True, max_tokens=15,
                                                   sampling=GREEDY))
        results[i] = (generation.prompt_ids, list(generation))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == len(prompts)
    for prompt_ids, events in results.values():
        assert generated_ids(events) == reference_generate(tiny["weights"]["tiny-a"], prompt_ids, 15)


def test_model_lifecycle(tiny):
    TinyForward.closed.clear()
    with Engine(tiny["store"], LoadOptions(device="cpu"), keep_alive=0.3) as engine:
        assert engine.running() == []
        with pytest.raises(ModelNotFoundError, match="names no model"):
            engine.submit(GenerateRequest(prompt="hi"))
        with pytest.raises(ModelNotFoundError, match="tiny-zzz.*gdsllm list"):
            engine.submit(GenerateRequest(model="tiny-zzz", prompt="hi"))
        engine.load("tiny-a")
        (running,) = engine.running()
        assert isinstance(running, RunningModel) and running.name == "tiny-a" and running.size_bytes > 0
        assert running.expires_at is not None and running.expires_at > time.time() and running.stats["tiny"]
        # "" means the loaded model; another model's request switches models (the previous is closed)
        generation, events = run(engine, GenerateRequest(prompt=PROMPTS[0], raw=True, max_tokens=5, sampling=GREEDY))
        assert generation.model == "tiny-a"
        generation, events = run(engine, GenerateRequest(model="tiny-b", prompt=PROMPTS[0], raw=True, max_tokens=5,
                                                         sampling=GREEDY))
        assert generated_ids(events) == reference_generate(tiny["weights"]["tiny-b"], generation.prompt_ids, 5)
        assert [m.name for m in engine.running()] == ["tiny-b"] and TinyForward.closed == ["tiny-a"]
        deadline = time.time() + 5
        while engine.running() and time.time() < deadline:
            time.sleep(0.05)
        assert engine.running() == [] and TinyForward.closed == ["tiny-a", "tiny-b"]
        engine.load("tiny-a")
        engine.unload()
        assert engine.running() == []


def test_bad_requests(engine):
    with pytest.raises(BadRequestError, match="exactly one"):
        engine.submit(GenerateRequest(model="tiny-a", prompt="a", messages=[ChatMessage("user", "b")]))
    with pytest.raises(BadRequestError, match="temperature"):
        engine.submit(GenerateRequest(model="tiny-a", prompt="a", sampling=SamplingParams(temperature=-1)))
    with pytest.raises(BadRequestError, match="max_tokens"):
        engine.submit(GenerateRequest(model="tiny-a", prompt="a", max_tokens=-3))
    with pytest.raises(BadRequestError, match="empty"):
        engine.submit(GenerateRequest(model="tiny-a", prompt="", raw=True))


def test_a_forward_error_reaches_the_consumer_and_the_engine_goes_on(engine):
    request = GenerateRequest(model="tiny-a", prompt=PROMPTS[0], raw=True, max_tokens=5, sampling=GREEDY)
    _, before = run(engine, request)
    TinyForward.fail_next_decode = True
    with pytest.raises(RuntimeError, match="simulated device failure"):
        list(engine.submit(request))
    _, after = run(engine, request)
    assert generated_ids(after) == generated_ids(before)


def test_default_device_follows_gdsllm_device(monkeypatch):
    monkeypatch.setenv("GDSLLM_DEVICE", "cpu")
    assert default_device() == "cpu"
    monkeypatch.setenv("GDSLLM_DEVICE", "auto")
    assert default_device() == ("cuda" if torch.cuda.is_available() else "cpu")


def test_eos_ends_the_generation_without_its_text(engine, tiny):
    generation, events = run(engine, GenerateRequest(model="tiny-b", prompt=PROMPTS[2], raw=True, max_tokens=40,
                                                     sampling=GREEDY))
    expected = reference_generate(tiny["weights"]["tiny-b"], generation.prompt_ids, 40)
    assert expected[-1] == 2 and len(expected) < 40  # the reference ends by EOS
    assert generated_ids(events) == expected
    assert events[-1].done_reason == "stop" and events[-1].text == "" and events[-1].completion_tokens == len(expected)
    assert "".join(e.text for e in events) == tiny["hf"].decode(expected[:-1])


def test_unload_waits_for_running_generations_of_that_model_only(tiny):
    with Engine(tiny["store"], LoadOptions(device="cpu", extra={"step_delay": 0.005}), keep_alive=None) as engine:
        sampling = SamplingParams(temperature=1.0, seed=0, repeat_penalty=1.0)
        generation = engine.submit(GenerateRequest(model="tiny-a", prompt=PROMPTS[0], raw=True, max_tokens=60,
                                                   sampling=sampling))
        events = iter(generation)
        next(events)
        engine.unload("tiny-b")  # not loaded: returns at once
        assert not generation._finished
        engine.unload("tiny-a")  # waits for the generation to end, then unloads
        rest = list(events)
        assert rest[-1].done_reason == "length" and rest[-1].completion_tokens == 60
        assert engine.running() == []


def test_keep_alive_zero_unloads_after_each_request_and_reloads(tiny):
    TinyForward.closed.clear()
    with Engine(tiny["store"], LoadOptions(device="cpu"), keep_alive=0) as engine:
        request = GenerateRequest(model="tiny-a", prompt=PROMPTS[0], raw=True, max_tokens=3, sampling=GREEDY)
        first = engine.submit(request).collect()
        deadline = time.time() + 5
        while engine.running() and time.time() < deadline:
            time.sleep(0.01)
        assert engine.running() == [] and TinyForward.closed == ["tiny-a"]
        second = engine.submit(request).collect()
        assert second[0] == first[0] and second[1].load_ns > 0
