"""The engine on the real bundled model (SmolLM2-135M-Instruct Q4_1, LLaMA plugin), on the CPU forward pass and,
where there is a GPU, on the CUDA one; converted once per session by the root conftest's `smollm2_store`.

The CPU half takes about 20 s on 2 idle cores (several minutes when the cores are shared), so answers are
kept to 8 tokens."""

import threading

import pytest

from gdsllm_core.bundled import DEFAULT_MODEL
from gdsllm_core.engine.engine import Engine
from gdsllm_core.engine.forward import LoadOptions
from gdsllm_core.errors import ContextOverflowError
from gdsllm_core.types import ChatMessage, GenerateRequest, SamplingParams

GREEDY = SamplingParams(temperature=0, repeat_penalty=1.0)
QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?", "Say hello in Spanish."]


def chat(question: str, **fields) -> GenerateRequest:
    fields.setdefault("sampling", GREEDY)
    fields.setdefault("max_tokens", 8)
    return GenerateRequest(model=DEFAULT_MODEL, messages=[ChatMessage("user", question)], **fields)


def token_ids(events) -> list[int]:
    return [e.token_id for e in events if e.token_id is not None]


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def engine(smollm2_store, request):
    engine = Engine(smollm2_store, LoadOptions(device=request.param), keep_alive=None)
    engine.load(DEFAULT_MODEL)
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture(scope="module")
def alone(engine):
    """Each question's greedy answer, one request at a time."""
    return {question: list(engine.submit(chat(question))) for question in QUESTIONS}


def test_greedy_chat_answer_mentions_paris(alone):
    events = alone[QUESTIONS[0]]
    text = "".join(e.text for e in events)
    assert "Paris" in text, text
    assert events[-1].done_reason in ("stop", "length") and events[-1].prompt_tokens > 10


def test_batched_decode_equals_each_prompt_alone(engine, alone):
    generations = [engine.submit(chat(question)) for question in QUESTIONS]
    batched = [list(generation) for generation in generations]
    for question, events in zip(QUESTIONS, batched, strict=True):
        assert token_ids(events) == token_ids(alone[question])
        assert "".join(e.text for e in events) == "".join(e.text for e in alone[question])


def test_same_seed_same_text_alone_and_in_a_batch(engine):
    request = chat(QUESTIONS[1], sampling=SamplingParams(temperature=0.8, seed=1234), max_tokens=6)
    first = "".join(e.text for e in engine.submit(request))
    together = [engine.submit(chat(QUESTIONS[2], sampling=SamplingParams(temperature=0.8), max_tokens=6)),
                engine.submit(request)]
    second = "".join(e.text for e in together[1])
    list(together[0])
    assert first == second and first


def test_cancel(engine):
    generation = engine.submit(chat(QUESTIONS[3], max_tokens=40))
    events = []
    for event in generation:
        events.append(event)
        if len(events) == 2:
            generation.cancel()
    assert events[-1].done_reason == "cancelled" and events[-1].completion_tokens <= 4


def test_stop_string(engine, alone):
    full = "".join(e.text for e in alone[QUESTIONS[0]])
    assert "Paris" in full
    events = list(engine.submit(chat(QUESTIONS[0], stop=["Paris"])))
    text = "".join(e.text for e in events)
    assert text == full[:full.index("Paris")] and events[-1].done_reason == "stop"


def test_context_overflow(engine):
    with pytest.raises(ContextOverflowError, match=r"context window is 32 tokens"):
        engine.submit(chat("Tell me everything. " * 20, num_ctx=32))


def test_threads_each_get_their_own_text(engine, alone):
    questions = QUESTIONS + QUESTIONS[:2]
    results: dict[int, str] = {}

    def worker(index: int) -> None:
        results[index] = engine.submit(chat(questions[index])).collect()[0]

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(len(questions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [results.get(i) for i in range(len(questions))] == ["".join(e.text for e in alone[q]) for q in questions]
