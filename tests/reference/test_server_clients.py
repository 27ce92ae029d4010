"""The real server (uvicorn on a free loopback port, the real engine, the bundled SmolLM2-135M converted into a
store) driven by the real `openai` and `ollama` clients. Greedy texts must equal what the engine generates for the
same request in-process, alone (the reference: an independent Engine on the same store)."""

import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import msgspec
import ollama
import openai
import pytest
import uvicorn

from gdsllm_core.engine.engine import Engine
from gdsllm_core.layout import ModelStore
from gdsllm_core.server import create_app, urls
from gdsllm_core.types import ChatMessage, GenerateRequest, SamplingParams, TokenEvent

pytestmark = pytest.mark.reference

TOKEN = "reference-token"
MAX_TOKENS = 6
OPENAI_GREEDY = SamplingParams(temperature=0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0)  # OpenAI: no penalty
OLLAMA_GREEDY = SamplingParams(temperature=0)  # ollama's defaults otherwise (repeat_penalty 1.1 over 64 tokens)
SYSTEM = "Answer briefly."


@pytest.fixture(scope="module")
def model(smollm2_store, smollm2):
    """(store, model name) of the bundled SmolLM2, converted once per session (conftest.py)."""
    return smollm2_store, smollm2.name


class Reference:
    """The engine's own greedy output for a request, computed in-process, one request at a time (cached)."""

    def __init__(self, store: ModelStore):
        self.engine = Engine(store=store)
        self.cache: dict[bytes, tuple[str, TokenEvent]] = {}

    def __call__(self, request: GenerateRequest) -> tuple[str, TokenEvent]:
        key = msgspec.json.encode(request)
        if key not in self.cache:
            self.cache[key] = self.engine.submit(request).collect()
        return self.cache[key]


@pytest.fixture(scope="module")
def reference(model):
    ref = Reference(model[0])
    yield ref
    ref.engine.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(app) -> tuple[str, uvicorn.Server, threading.Thread]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, thread


@pytest.fixture(scope="module")
def server(model):
    """(base url, app) of the real server, auth off."""
    app = create_app(store=model[0], read_token_from_env=False)
    base, uv, thread = serve(app)
    yield base, app
    uv.should_exit = True
    thread.join(timeout=60)


@pytest.fixture
def oai(server):
    return openai.OpenAI(base_url=server[0] + urls.OPENAI_PREFIX, api_key="unused", max_retries=0, timeout=300)


@pytest.fixture
def oll(server):
    return ollama.Client(host=server[0], timeout=300)


def chat_request(name: str, user: str, sampling: SamplingParams, max_tokens: int = MAX_TOKENS) -> GenerateRequest:
    return GenerateRequest(model=name, messages=[ChatMessage("system", SYSTEM), ChatMessage("user", user)],
                           max_tokens=max_tokens, sampling=sampling)


def chat_messages(user: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


# ---- OpenAI ------------------------------------------------------------------------------------------------------

def test_openai_chat_and_stream_with_usage_equal_the_engine(oai, model, reference):
    name = model[1]
    text, last = reference(chat_request(name, "What is the capital of France?", OPENAI_GREEDY))
    answer = oai.chat.completions.create(model=name, messages=chat_messages("What is the capital of France?"),
                                         temperature=0, max_tokens=MAX_TOKENS)
    assert answer.choices[0].message.content == text
    assert answer.choices[0].finish_reason == ("length" if last.done_reason == "length" else "stop")
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (last.prompt_tokens,
                                                                             last.completion_tokens)

    stream = oai.chat.completions.create(model=name, messages=chat_messages("What is the capital of France?"),
                                         temperature=0, max_completion_tokens=MAX_TOKENS, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [answer.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == last.completion_tokens
    assert chunks[-1].usage.total_tokens == last.prompt_tokens + last.completion_tokens


def test_openai_completions_keep_the_last_token_on_length(oai, model, reference):
    name, prompt = model[1], "The three primary colors are"
    text, last = reference(GenerateRequest(model=name, prompt=prompt, raw=True, max_tokens=MAX_TOKENS,
                                           sampling=OPENAI_GREEDY))
    assert last.done_reason == "length" and last.text, "the reference should stop on length with a final token"
    answer = oai.completions.create(model=name, prompt=prompt, temperature=0, max_tokens=MAX_TOKENS)
    assert answer.choices[0].text == text and answer.choices[0].finish_reason == "length"
    chunks = list(oai.completions.create(model=name, prompt=prompt, temperature=0, max_tokens=MAX_TOKENS,
                                         stream=True))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == text and streamed.endswith(last.text)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_openai_models(oai, model):
    assert model[1] in [m.id for m in oai.models.list().data]
    assert oai.models.retrieve(model[1]).id == model[1]
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("no-such-model")


def test_openai_bad_requests(oai, model):
    messages = chat_messages("hi")
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model=model[1], messages=messages, n=17)
    assert caught.value.status_code == 400 and caught.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model=model[1], messages=messages, temperature="hot")
    assert caught.value.body["param"] == "temperature" and caught.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as caught:
        oai.chat.completions.create(model="gpt-4o", messages=messages)
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as caught:  # longer than the context: refused before any prefill
        oai.chat.completions.create(model=model[1], messages=chat_messages("hello " * 20000))
    assert caught.value.body["code"] == "context_length_exceeded" and "context" in caught.value.body["message"]


# ---- ollama ------------------------------------------------------------------------------------------------------

def test_ollama_generate_and_chat_equal_the_engine(oll, model, reference):
    name = model[1]
    options = {"temperature": 0, "num_predict": MAX_TOKENS}
    text, last = reference(GenerateRequest(model=name, prompt="Name a fruit.", system=SYSTEM, max_tokens=MAX_TOKENS,
                                           sampling=OLLAMA_GREEDY))
    answer = oll.generate(model=name, prompt="Name a fruit.", system=SYSTEM, options=options)
    assert answer.response == text and answer.done and answer.done_reason == last.done_reason
    assert (answer.prompt_eval_count, answer.eval_count) == (last.prompt_tokens, last.completion_tokens)
    assert answer.total_duration >= answer.eval_duration > 0 and answer.load_duration is not None
    parts = list(oll.generate(model=name, prompt="Name a fruit.", system=SYSTEM, options=options, stream=True))
    assert "".join(p.response for p in parts) == text
    assert parts[-1].done and parts[-1].eval_count == last.completion_tokens and parts[-1].prompt_eval_duration

    text, last = reference(chat_request(name, "Name a color.", OLLAMA_GREEDY))
    answer = oll.chat(model=name, messages=chat_messages("Name a color."), options=options)
    assert answer.message.content == text and answer.message.role == "assistant"
    parts = list(oll.chat(model=name, messages=chat_messages("Name a color."), options=options, stream=True))
    assert "".join(p.message.content for p in parts) == text and parts[-1].done_reason == last.done_reason


def test_greedy_answers_equal_gdsllm_run_prompt(oll, model):
    """The CLI's one-shot answer equals ollama's chat for the same question (ollama's default options, greedy)."""
    store, name = model
    question = "Name a color."
    cli = subprocess.run([sys.executable, "-m", "gdsllm_core", "run", name, "--prompt", question,
                          "--temperature", "0", "--max-tokens", str(MAX_TOKENS)],
                         env={**os.environ, "GDSLLM_MODEL_ROOT": str(store.root), "GDSLLM_DEVICE": "cpu"},
                         capture_output=True, text=True, timeout=300, check=True).stdout
    chat = oll.chat(model=name, messages=[{"role": "user", "content": question}],
                    options={"temperature": 0, "num_predict": MAX_TOKENS})
    assert chat.message.content and cli.rstrip("\n") == chat.message.content


def test_ollama_list_show_ps(oll, model, reference):
    name = model[1]
    store = model[0]
    assert name in [m.model for m in oll.list().models]
    shown = oll.show(name)
    assert shown.template == store.get(name).manifest.tokenizer.chat_template
    assert shown.details.family == "llama" and shown.modelinfo["general.architecture"] == "llama"
    oll.generate(model=name, prompt="Hi", options={"temperature": 0, "num_predict": 1})
    running = oll.ps().models
    assert [m.model for m in running] == [name] and running[0].size > 0 and running[0].context_length


def test_ollama_keep_alive_sets_when_the_model_unloads(oll, model):
    name = model[1]
    oll.generate(model=name, prompt="Hi", options={"temperature": 0, "num_predict": 1}, keep_alive=-1)
    assert [m.model for m in oll.ps().models] == [name]
    before = time.time()
    oll.generate(model=name, prompt="Hi", options={"temperature": 0, "num_predict": 1}, keep_alive="1s")
    expires = oll.ps().models[0].expires_at.timestamp()
    assert before < expires < time.time() + 1.5
    deadline = time.monotonic() + 30
    while oll.ps().models and time.monotonic() < deadline:
        time.sleep(0.2)
    assert oll.ps().models == []
    oll.generate(model=name, prompt="Hi", options={"temperature": 0, "num_predict": 1}, keep_alive="5m")
    assert oll.ps().models[0].expires_at.timestamp() > time.time() + 250


def test_ollama_errors(oll, model):
    with pytest.raises(ollama.ResponseError) as caught:
        oll.generate(model="no-such-model", prompt="x")
    assert caught.value.status_code == 404 and "no-such-model" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        oll.generate(model=model[1], prompt="x", options={"temperature": "hot"})
    assert caught.value.status_code == 400 and "temperature" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        oll.generate(model=model[1], prompt="a b c d e f g h i j k l", raw=True, options={"num_ctx": 8})
    assert caught.value.status_code == 400 and "context window is 8 tokens" in caught.value.error


# ---- auth, disconnects, concurrency ------------------------------------------------------------------------------

def test_auth_with_the_real_clients(model):
    base, uv, thread = serve(create_app(store=model[0], api_token=TOKEN))
    try:
        good = openai.OpenAI(base_url=base + urls.OPENAI_PREFIX, api_key=TOKEN, max_retries=0)
        assert model[1] in [m.id for m in good.models.list().data]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + urls.OPENAI_PREFIX, api_key="wrong", max_retries=0).models.list()
        assert model[1] in [m.model for m in ollama.Client(host=base, headers={
            "Authorization": f"Bearer {TOKEN}"}).list().models]
        with pytest.raises(ollama.ResponseError) as caught:
            ollama.Client(host=base).list()
        assert caught.value.status_code == 401
        assert httpx.get(base + urls.HEALTH).status_code == 200
    finally:
        uv.should_exit = True
        thread.join(timeout=60)


def test_a_closed_stream_frees_the_engine_within_a_token(server, model, reference):
    base, app = server
    _, last = reference(GenerateRequest(model=model[1], prompt="Once upon a time", raw=True, max_tokens=MAX_TOKENS,
                                        sampling=OPENAI_GREEDY))
    token_s = last.eval_ns / max(last.completion_tokens - 1, 1) / 1e9
    engine = app.state.engine
    with httpx.Client(base_url=base, timeout=300) as http:
        body = {"model": model[1], "prompt": "Once upon a time", "max_tokens": 500, "stream": True}
        with http.stream("POST", urls.OPENAI_COMPLETIONS, json=body) as response:
            events = (line for line in response.iter_lines() if line.startswith("data: "))
            next(events), next(events)  # two tokens streamed: the generation is running
            assert engine.running()[0].stats["active_sequences"] == 1
        closed = time.monotonic()
    while engine.running()[0].stats["active_sequences"]:
        assert time.monotonic() - closed < 3 * token_s + 2.0, "the generation went on after the client left"
        time.sleep(0.01)
    freed_s = time.monotonic() - closed
    print(f"engine free {freed_s:.3f} s after the client closed (one token: {token_s:.3f} s)")


@pytest.mark.slow
def test_32_concurrent_mixed_streams_each_equal_their_single_client_text(server, model, reference):
    """Four APIs, eight distinct prompts, 32 streaming clients at once: every text is the request's own greedy text
    (computed alone), so nothing is mixed, dropped or changed by batching."""
    base, name, max_tokens = server[0], model[1], 4
    subjects = ["cats", "rain"]
    jobs = []
    for index in range(32):
        api, subject = ("openai-chat", "openai-completions", "ollama-generate", "ollama-chat")[index % 4], \
            subjects[(index // 4) % 2]
        if api.endswith("chat"):
            sampling = OPENAI_GREEDY if api.startswith("openai") else OLLAMA_GREEDY
            expected = reference(chat_request(name, f"One word about {subject}.", sampling, max_tokens))[0]
        else:
            sampling = OPENAI_GREEDY if api.startswith("openai") else OLLAMA_GREEDY
            expected = reference(GenerateRequest(model=name, prompt=f"A fact about {subject}:", raw=True,
                                                 max_tokens=max_tokens, sampling=sampling))[0]
        jobs.append((api, subject, expected))
    assert all(job[2] for job in jobs) and len({job[2] for job in jobs}) >= 4, "the references must tell apart"

    def run(job) -> str:
        api, subject, _ = job
        if api == "openai-chat":
            client = openai.OpenAI(base_url=base + urls.OPENAI_PREFIX, api_key="x", max_retries=0, timeout=600)
            return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model=name, messages=chat_messages(f"One word about {subject}."), temperature=0,
                max_tokens=max_tokens, stream=True) if c.choices)
        if api == "openai-completions":
            client = openai.OpenAI(base_url=base + urls.OPENAI_PREFIX, api_key="x", max_retries=0, timeout=600)
            return "".join(c.choices[0].text for c in client.completions.create(
                model=name, prompt=f"A fact about {subject}:", temperature=0, max_tokens=max_tokens, stream=True)
                if c.choices)
        client = ollama.Client(host=base, timeout=600)
        options = {"temperature": 0, "num_predict": max_tokens}
        if api == "ollama-generate":
            return "".join(p.response for p in client.generate(model=name, prompt=f"A fact about {subject}:",
                                                               raw=True, options=options, stream=True))
        return "".join(p.message.content for p in client.chat(
            model=name, messages=chat_messages(f"One word about {subject}."), options=options, stream=True))

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=32) as pool:
        texts = list(pool.map(run, jobs))
    print(f"32 concurrent streams of {max_tokens} tokens: {time.monotonic() - started:.1f} s")
    assert [(job[0], job[1], text) for job, text in zip(jobs, texts, strict=True)] == \
        [(job[0], job[1], job[2]) for job in jobs]
