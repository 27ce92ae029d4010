"""The server's routes over an echo engine (no weights): it answers each request with the words of its prompt, one
word per event, from a worker thread, so every test can compute the text it must see. The real model and the real
clients are in tests/reference/test_server_clients.py."""

import asyncio
import json
import logging
import queue
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn
from _cli_models import free_port
from litestar.testing import TestClient

from gdsllm_core.errors import ContextOverflowError, CorruptModelError, ModelNotFoundError
from gdsllm_core.layout import ModelStore, ModelWriter, TokenizerInfo
from gdsllm_core.server import create_app, urls
from gdsllm_core.types import GenerateRequest, TokenEvent

MODEL = "echo-model"
TOKEN = "s3cret-token"


class EchoGeneration:
    """Yields the words of `words` (the first bare, the others with a leading space); `endless` repeats them until
    cancelled. Events are produced by a thread, like the real engine's worker."""

    def __init__(self, engine: "EchoEngine", words: list[str], max_tokens: int | None, stop: list[str],
                 truncated: bool, endless: bool):
        self.engine, self.words, self.max_tokens, self.stop = engine, words, max_tokens, stop
        self.truncated, self.endless = truncated, endless
        self.cancelled = threading.Event()
        self.finished = threading.Event()

    def _produce(self, emit) -> None:
        started = time.perf_counter_ns()
        count, index = 0, 0
        while True:
            if self.cancelled.is_set():
                self.engine.cancelled.append(self)
                emit(TokenEvent("", done=True, done_reason="cancelled", completion_tokens=count))
                break
            time.sleep(self.engine.delay)
            word = self.words[index % len(self.words)]
            if word == "FAIL":  # the engine failing mid-generation: its error reaches the consumer
                emit(CorruptModelError("tensor blk.0.attn_q.weight does not match its checksum", "re-convert"))
                break
            if word in self.stop:
                emit(self._last("", "stop", count, started))
                break
            index += 1
            count += 1
            text = word if count == 1 else " " + word
            if self.max_tokens is not None and count >= self.max_tokens:
                emit(self._last(text, "length", count, started))
                break
            if not self.endless and index == len(self.words):
                emit(self._last(text, "stop", count, started))
                break
            emit(TokenEvent(text, token_id=count))
        self.finished.set()

    def _last(self, text: str, reason: str, count: int, started: int) -> TokenEvent:
        total = time.perf_counter_ns() - started
        return TokenEvent(text, token_id=count, done=True, done_reason=reason, prompt_tokens=len(self.words),
                          completion_tokens=count, prompt_truncated=self.truncated, load_ns=1, prompt_eval_ns=2,
                          eval_ns=max(total - 3, 1), total_ns=total)

    def __iter__(self):
        events: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._produce, args=(events.put,), daemon=True).start()
        while True:
            event = events.get()
            if isinstance(event, Exception):
                raise event
            yield event
            if event.done:
                return

    async def __aiter__(self):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        threading.Thread(target=self._produce, args=(lambda e: loop.call_soon_threadsafe(events.put_nowait, e),),
                         daemon=True).start()
        while True:
            event = await events.get()
            if isinstance(event, Exception):
                raise event
            yield event
            if event.done:
                return

    def cancel(self) -> None:
        self.cancelled.set()


class EchoEngine:
    """The Engine contract's surface: submit, load, unload, running, close."""

    def __init__(self, models: tuple[str, ...] = (MODEL,), delay: float = 0.0, endless: bool = False):
        self.models, self.delay, self.endless = set(models), delay, endless
        self.requests: list[GenerateRequest] = []
        self.cancelled: list[EchoGeneration] = []
        self.loaded: str | None = None
        self.closed = False

    @staticmethod
    def prompt_words(request: GenerateRequest) -> list[str]:
        if request.messages is not None:
            return " ".join(message.content for message in request.messages).split()
        return ((request.system or "") + " " + (request.prompt or "")).split()

    def submit(self, request: GenerateRequest) -> EchoGeneration:
        name = request.model or self.loaded
        if name not in self.models:
            raise ModelNotFoundError(f"model {name!r} not found", "pull it first")
        words = self.prompt_words(request)
        truncated = False
        if request.num_ctx is not None and len(words) >= request.num_ctx:
            if not request.truncate:
                raise ContextOverflowError(f"the prompt is {len(words)} tokens but the context window is "
                                           f"{request.num_ctx} tokens", "shorten the prompt")
            words, truncated = words[-(request.num_ctx - 1):], True
        self.requests.append(request)
        self.loaded = name
        return EchoGeneration(self, words, request.max_tokens, request.stop, truncated, self.endless)

    def embed(self, model: str, texts: list, truncate: bool = True, num_ctx: int | None = None,
              normalize: bool = True, dimensions: int | None = None):
        """One vector per input: [word count, 1.0] (the routes' shapes, not the math: test_ollama_surface)."""
        from gdsllm_core.engine.embeddings import Embeddings

        if (model or self.loaded) not in self.models:
            raise ModelNotFoundError(f"model {model!r} not found", "pull it first")
        counts = [len(text) if isinstance(text, list) else len(text.split()) for text in texts]
        return Embeddings([[float(count), 1.0][:dimensions] for count in counts], sum(counts), 0, 0)

    def load(self, model: str) -> None:
        self.loaded = model

    def unload(self, model: str | None = None) -> None:
        self.loaded = None

    def set_keep_alive(self, seconds: float | None) -> None:
        self.keep_alive = seconds

    def running(self) -> list:
        from gdsllm_core.engine.engine import RunningModel

        if self.loaded is None:
            return []
        return [RunningModel(name=self.loaded, size_bytes=123, vram_bytes=0, expires_at=None,
                             stats={"hits": 1}, context_length=64)]

    def close(self) -> None:
        self.closed = True


def echo(text: str) -> str:
    """What the echo engine answers: the prompt's words, single-spaced."""
    return " ".join(text.split())


def write_tiny_model(root, name: str = MODEL) -> None:
    """A real converted-model folder (manifest + one aligned extent) for the listing routes."""
    with ModelWriter(root, name) as writer:
        writer.add_extent("token_embd", [("token_embd.weight", "F32", [4, 8], np.arange(32, dtype=np.float32))])
        writer.finish("llama", {"max_position_embeddings": 64, "hidden_size": 8},
                      tokenizer=TokenizerInfo(kind="hf", file="tokenizer.json", chat_template="{{ messages }}"),
                      files={"tokenizer.json": b"{}"}, quant="F32")


@pytest.fixture
def store(tmp_path):
    write_tiny_model(tmp_path)
    return ModelStore(tmp_path)


@pytest.fixture
def engine():
    return EchoEngine()


@pytest.fixture
def client(store, engine):
    with TestClient(create_app(store=store, engine_factory=lambda: engine, read_token_from_env=False)) as test:
        yield test


def ndjson(response: httpx.Response) -> list[dict]:
    return [json.loads(line) for line in response.text.splitlines() if line.strip()]


def sse_payloads(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


DONE_FIELDS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
               "eval_duration")


# ---- ollama ------------------------------------------------------------------------------------------------------

def test_ollama_generate_streams_ndjson_with_counters_on_the_last_object(client, engine):
    prompt = "the quick brown fox jumps"
    response = client.post(urls.OLLAMA_GENERATE, json={"model": MODEL, "prompt": prompt, "system": "be brief"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-ndjson")
    objects = ndjson(response)
    assert "".join(o["response"] for o in objects) == echo("be brief " + prompt)
    assert all(not o["done"] for o in objects[:-1]) and objects[-1]["done"]
    last = objects[-1]
    assert last["done_reason"] == "stop"
    assert all(isinstance(last[field], int) for field in DONE_FIELDS)
    assert last["prompt_eval_count"] == 7 and last["eval_count"] == 7
    assert last["total_duration"] >= last["eval_duration"] > 0
    assert all(o["model"] == MODEL and o["created_at"].endswith("Z") for o in objects)


def test_ollama_generate_without_stream_is_one_object(client, engine):
    response = client.post(urls.OLLAMA_GENERATE, json={"model": MODEL, "prompt": "one two three", "stream": False,
                                                       "raw": True})
    assert response.status_code == 200
    body = response.json()
    assert body["response"] == "one two three" and body["done"] and body["done_reason"] == "stop"
    assert engine.requests[-1].raw is True and engine.requests[-1].prompt == "one two three"


def test_ollama_options_reach_the_engine(client, engine):
    options = {"temperature": 0, "top_k": 7, "top_p": 0.5, "min_p": 0.1, "seed": 42, "num_predict": 3,
               "stop": ["never"], "num_ctx": 64, "repeat_penalty": 1.3, "repeat_last_n": -1, "presence_penalty": 0.5,
               "frequency_penalty": -0.25}
    response = client.post(urls.OLLAMA_GENERATE, json={"model": MODEL, "prompt": "a b c d e f", "stream": False,
                                                       "options": options})
    body = response.json()
    assert body["response"] == "a b c" and body["done_reason"] == "length" and body["eval_count"] == 3
    request = engine.requests[-1]
    sampling = request.sampling
    assert (sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p, sampling.seed) == (0, 7, 0.5, 0.1, 42)
    assert (sampling.repeat_penalty, sampling.repeat_last_n) == (1.3, -1)
    assert (sampling.presence_penalty, sampling.frequency_penalty) == (0.5, -0.25)
    assert (request.max_tokens, request.stop, request.num_ctx) == (3, ["never"], 64)


def test_ollama_chat_streams_messages(client, engine):
    messages = [{"role": "system", "content": "sys words"}, {"role": "user", "content": "hello there"},
                {"role": "assistant", "content": "hi"}, {"role": "user", "content": "again"}]
    response = client.post(urls.OLLAMA_CHAT, json={"model": MODEL, "messages": messages, "options": {"num_predict": 4}})
    objects = ndjson(response)
    assert "".join(o["message"]["content"] for o in objects) == "sys words hello there"
    assert all(o["message"]["role"] == "assistant" for o in objects)
    assert objects[-1]["done"] and objects[-1]["done_reason"] == "length"
    assert [m.role for m in engine.requests[-1].messages] == ["system", "user", "assistant", "user"]


def test_ollama_chat_without_stream(client):
    response = client.post(urls.OLLAMA_CHAT, json={"model": MODEL, "stream": False,
                                                   "messages": [{"role": "user", "content": "x y"}]})
    body = response.json()
    assert body["message"] == {"role": "assistant", "content": "x y"} and body["done"]
    assert all(field in body for field in DONE_FIELDS)


def test_ollama_model_latest_tag_maps_to_the_stored_name(client, engine):
    response = client.post(urls.OLLAMA_GENERATE, json={"model": MODEL + ":latest", "prompt": "p", "stream": False})
    assert response.status_code == 200 and engine.requests[-1].model == MODEL


def test_ollama_empty_prompt_loads_and_keep_alive_zero_unloads(client, engine):
    body = client.post(urls.OLLAMA_GENERATE, json={"model": MODEL}).json()
    assert body["done_reason"] == "load" and engine.loaded == MODEL
    body = client.post(urls.OLLAMA_GENERATE, json={"model": MODEL, "keep_alive": 0}).json()
    assert body["done_reason"] == "unload" and engine.loaded is None
    client.post(urls.OLLAMA_CHAT, json={"model": MODEL, "keep_alive": "0s", "stream": False,
                                        "messages": [{"role": "user", "content": "w"}]})
    assert engine.loaded is None


def test_ollama_tags_show_ps_version(client, store):
    entry = store.get(MODEL)
    tags = client.get(urls.OLLAMA_TAGS).json()["models"]
    assert [m["name"] for m in tags] == [MODEL]
    assert tags[0]["size"] == entry.size_bytes and len(tags[0]["digest"]) == 64
    assert tags[0]["details"]["family"] == "llama" and tags[0]["details"]["parameter_size"] == "0.00M"
    show = client.post(urls.OLLAMA_SHOW, json={"model": MODEL}).json()
    assert show["template"] == "{{ messages }}" and show["model_info"]["llama.context_length"] == 64
    assert client.get(urls.OLLAMA_PS).json() == {"models": []}
    client.post(urls.OLLAMA_GENERATE, json={"model": MODEL})
    running = client.get(urls.OLLAMA_PS).json()["models"]
    assert [(m["name"], m["size"], m["context_length"], m["expires_at"]) for m in running] == [(MODEL, 123, 64, None)]
    assert client.get(urls.OLLAMA_VERSION).json()["version"]


def test_ollama_delete_removes_the_model(client, store):
    assert client.request("DELETE", urls.OLLAMA_DELETE, json={"model": "missing"}).status_code == 404
    assert client.request("DELETE", urls.OLLAMA_DELETE, json={"model": MODEL}).status_code == 200
    assert store.list() == []


@pytest.mark.parametrize("body, fragment", [
    ({"model": MODEL, "prompt": "x", "options": {"temperature": "hot"}}, "temperature"),
    ({"model": MODEL, "prompt": "x", "options": {"top_p": 2}}, "top_p"),
    ({"model": MODEL, "prompt": 5}, "prompt"),
    ({"prompt": "x"}, "model"),
    ({"model": MODEL, "prompt": "x", "format": "yaml"}, "format"),
    ({"model": MODEL, "prompt": "x", "suffix": "y"}, "suffix"),
    ({"model": MODEL, "prompt": "x", "think": True}, "think"),
    ({"model": MODEL, "prompt": "x", "options": {"mirostat": 1}}, "mirostat"),
    ({"model": MODEL, "prompt": "x", "top_logprobs": 3}, "top_logprobs"),
    ({"model": MODEL, "prompt": "x", "keep_alive": "soon"}, "keep_alive"),
    ({"model": MODEL, "prompt": "x", "images": ["aGk="]}, "images"),
    ({"model": MODEL, "prompt": "x", "options": {"num_predict": 0}}, "num_predict"),
])
def test_ollama_bad_generate_requests_are_400_with_ollama_error(client, body, fragment):
    response = client.post(urls.OLLAMA_GENERATE, json=body)
    assert response.status_code == 400
    assert list(response.json()) == ["error"] and fragment in response.json()["error"]


def test_ollama_bad_chat_role_and_unknown_model(client):
    response = client.post(urls.OLLAMA_CHAT, json={"model": MODEL, "messages": [{"role": "robot", "content": "x"}]})
    assert response.status_code == 400 and "robot" in response.json()["error"]
    response = client.post(urls.OLLAMA_CHAT, json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 404 and "nope" in response.json()["error"]


def test_context_overflow_is_400_unless_truncate(client):
    body = {"model": MODEL, "prompt": "a b c d e f g h", "stream": False, "options": {"num_ctx": 4}}
    response = client.post(urls.OLLAMA_GENERATE, json=body)
    assert response.status_code == 400 and "context window" in response.json()["error"]
    response = client.post(urls.OLLAMA_GENERATE, json={**body, "truncate": True})
    assert response.status_code == 200
    assert response.json()["response"] == "f g h" and response.json()["prompt_truncated"] is True
    response = client.post(urls.OPENAI_CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 200


# ---- OpenAI ------------------------------------------------------------------------------------------------------

def test_openai_chat_completion(client, engine):
    response = client.post(urls.OPENAI_CHAT, json={
        "model": MODEL, "temperature": 0, "seed": 3, "stop": "zzz", "max_completion_tokens": 50, "max_tokens": 9,
        "messages": [{"role": "developer", "content": "dev"},
                     {"role": "user", "content": [{"type": "text", "text": "hello "},
                                                  {"type": "text", "text": "world"}]}]})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == MODEL
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "dev hello world"},
                                "finish_reason": "stop", "logprobs": None}]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    request = engine.requests[-1]
    assert [m.role for m in request.messages] == ["system", "user"]
    assert (request.max_tokens, request.stop) == (50, ["zzz"])
    assert (request.sampling.temperature, request.sampling.seed) == (0, 3)


def test_openai_chat_stream_with_usage_keeps_the_last_token_on_length(client):
    response = client.post(urls.OPENAI_CHAT, json={
        "model": MODEL, "stream": True, "max_tokens": 3, "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "one two three four five"}]})
    assert response.headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "one two three"
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert [c["choices"][0]["finish_reason"] for c in finish] == ["length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 3,
                                                                    "total_tokens": 8}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)


def test_openai_stream_without_usage_has_no_usage_chunk(client):
    response = client.post(urls.OPENAI_CHAT, json={"model": MODEL, "stream": True,
                                                   "messages": [{"role": "user", "content": "a b"}]})
    chunks = [json.loads(p) for p in sse_payloads(response.text)[:-1]]
    assert all(c["choices"] and c["usage"] is None for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_openai_completions(client, engine):
    body = client.post(urls.OPENAI_COMPLETIONS, json={"model": MODEL, "prompt": "alpha beta gamma delta",
                                                      "max_tokens": 2}).json()
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "alpha beta"
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 2
    assert engine.requests[-1].raw is True
    body = client.post(urls.OPENAI_COMPLETIONS, json={"model": MODEL, "prompt": ["x y"], "echo": True}).json()
    assert body["choices"][0]["text"] == "x yx y"
    response = client.post(urls.OPENAI_COMPLETIONS, json={"model": MODEL, "prompt": "p q r", "stream": True,
                                                          "stream_options": {"include_usage": True}})
    chunks = [json.loads(p) for p in sse_payloads(response.text)[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "p q r"
    assert chunks[-1]["usage"]["total_tokens"] == 6


def test_openai_models(client):
    models = client.get(urls.OPENAI_MODELS).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
    assert client.get(f"{urls.OPENAI_MODELS}/{MODEL}").json()["id"] == MODEL
    missing = client.get(f"{urls.OPENAI_MODELS}/gpt-4").json()
    assert missing["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("body, status, param", [
    ({"n": 17}, 400, "n"),
    ({"user": "u1"}, 400, "user"),
    ({"audio": {"voice": "x"}}, 400, "audio"),
    ({"top_logprobs": 2}, 400, "top_logprobs"),
    ({"logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ({"presence_penalty": 3}, 400, "presence_penalty"),
    ({"response_format": {"type": "json_schema"}}, 400, "response_format"),
    ({"messages": [{"role": "user", "content": "x", "refusal": None}]}, 400, "messages[0].refusal"),
    ({"temperature": "warm"}, 400, "temperature"),
    ({"temperature": 3}, 400, "temperature"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"messages": "hello"}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages[0].content[0].type"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ({"model": "gpt-4o"}, 404, "model"),
])
def test_openai_bad_requests_use_the_openai_error_shape(client, body, status, param):
    request = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **body}
    response = client.post(urls.OPENAI_CHAT, json=request)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param and error["message"]


def test_malformed_json_and_unknown_route_use_the_dialect(client):
    response = client.post(urls.OPENAI_CHAT, content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    response = client.post(urls.OLLAMA_CHAT, content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and isinstance(response.json()["error"], str)
    assert client.get("/v1/nothing").json()["error"]["type"] == "not_found_error"


def test_health_and_openapi_schema(client):
    assert client.get(urls.HEALTH).json() == {"status": "ok"}
    schema = client.get(urls.SCHEMA + "/openapi.json").json()
    for path in (urls.OLLAMA_GENERATE, urls.OLLAMA_CHAT, urls.OLLAMA_TAGS, urls.OPENAI_CHAT, urls.OPENAI_COMPLETIONS,
                 urls.OPENAI_MODELS, urls.HEALTH):
        assert path in schema["paths"]
    assert "OpenAIChatRequest" in json.dumps(schema["components"])


def test_an_engine_error_mid_generation_reaches_the_client_in_its_dialect(client):
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "fine so far FAIL"}]}
    response = client.post(urls.OPENAI_CHAT, json=chat)
    assert response.status_code == 500 and "checksum" in response.json()["error"]["message"]
    response = client.post(urls.OLLAMA_CHAT, json={**chat, "stream": False})
    assert response.status_code == 500 and "checksum" in response.json()["error"]
    objects = ndjson(client.post(urls.OLLAMA_CHAT, json=chat))  # streamed: the status line was already sent
    assert "".join(o.get("message", {}).get("content", "") for o in objects) == "fine so far"
    assert "checksum" in objects[-1]["error"] and not any(o.get("done") for o in objects)
    payloads = sse_payloads(client.post(urls.OPENAI_CHAT, json={**chat, "stream": True}).text)
    assert payloads[-1] == "[DONE]" and "checksum" in json.loads(payloads[-2])["error"]["message"]


# ---- auth, lifespan ----------------------------------------------------------------------------------------------

USER_A = [{"role": "user", "content": "a"}]
PROTECTED = [("POST", urls.OLLAMA_GENERATE, {"model": MODEL, "prompt": "a", "stream": False}),
             ("POST", urls.OLLAMA_CHAT, {"model": MODEL, "messages": USER_A, "stream": False}),
             ("GET", urls.OLLAMA_TAGS, None), ("POST", urls.OLLAMA_SHOW, {"model": MODEL}),
             ("GET", urls.OLLAMA_PS, None),
             ("GET", urls.OLLAMA_VERSION, None), ("DELETE", urls.OLLAMA_DELETE, {"model": "other"}),
             ("POST", urls.OPENAI_CHAT, {"model": MODEL, "messages": USER_A}),
             ("POST", urls.OPENAI_COMPLETIONS, {"model": MODEL, "prompt": "a"}), ("GET", urls.OPENAI_MODELS, None),
             ("GET", f"{urls.OPENAI_MODELS}/{MODEL}", None), ("GET", urls.SCHEMA + "/openapi.json", None)]


def test_every_route_but_health_needs_the_token(store, engine, monkeypatch):
    monkeypatch.setenv("GDSLLM_API_TOKEN", TOKEN)
    with TestClient(create_app(store=store, engine_factory=lambda: engine)) as client:
        assert client.get(urls.HEALTH).status_code == 200
        for method, path, body in PROTECTED:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                            {"Authorization": f"Basic {TOKEN}"}, {"Authorization": f"Bearer {TOKEN}x"}):
                response = client.request(method, path, json=body, headers=headers)
                assert response.status_code == 401, (method, path, headers)
                error = response.json()["error"]
                if path.startswith("/v1"):
                    assert error["code"] == "invalid_api_key" and error["type"] == "authentication_error"
                else:
                    assert "token" in error
            response = client.request(method, path, json=body, headers={"Authorization": f"Bearer {TOKEN}"})
            assert response.status_code in (200, 404), (method, path, response.text)


def test_without_token_routes_are_open_and_startup_says_so(store, engine, monkeypatch, caplog):
    monkeypatch.delenv("GDSLLM_API_TOKEN", raising=False)
    with caplog.at_level(logging.INFO, logger="gdsllm.server"):
        with TestClient(create_app(store=store, engine_factory=lambda: engine)) as client:
            assert client.get(urls.OLLAMA_TAGS).status_code == 200
    assert "auth OFF" in caplog.text
    assert engine.closed


def test_startup_logs_auth_on(store, engine, caplog):
    with caplog.at_level(logging.INFO, logger="gdsllm.server"):
        with TestClient(create_app(store=store, engine_factory=lambda: engine, api_token=TOKEN)):
            pass
    assert "auth ON" in caplog.text


def test_preload_loads_the_default_model_which_empty_requests_use(store, engine):
    app = create_app(store=store, engine_factory=lambda: engine, default_model=MODEL, preload=True,
                     read_token_from_env=False)
    with TestClient(app) as client:
        assert engine.loaded == MODEL
        body = client.post(urls.OPENAI_CHAT, json={"model": "", "messages": [{"role": "user", "content": "q"}]}).json()
        assert body["choices"][0]["message"]["content"] == "q" and engine.requests[-1].model == MODEL


# ---- a real server: disconnects, concurrency ---------------------------------------------------------------------

@pytest.fixture
def live_server(store):
    """Starts uvicorn on a free loopback port in a thread; yields (base_url, engine_holder)."""
    servers = []

    def start(engine: EchoEngine) -> str:
        port = free_port()
        app = create_app(store=store, engine_factory=lambda: engine, read_token_from_env=False)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
            time.sleep(0.02)
        servers.append((server, thread))
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=20)


def wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


@pytest.mark.parametrize("path, body", [
    (urls.OLLAMA_GENERATE, {"model": MODEL, "prompt": "tick tock"}),
    (urls.OLLAMA_CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "tick tock"}]}),
    (urls.OPENAI_CHAT, {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "tick tock"}]}),
    (urls.OPENAI_COMPLETIONS, {"model": MODEL, "stream": True, "prompt": "tick tock", "max_tokens": None}),
])
def test_closing_a_stream_cancels_its_generation(live_server, path, body):
    engine = EchoEngine(delay=0.005, endless=True)
    base = live_server(engine)
    with httpx.Client(base_url=base, timeout=10) as http:
        with http.stream("POST", path, json=body) as response:
            assert next(line for line in response.iter_lines() if line)  # streaming has begun
        assert wait_for(lambda: len(engine.cancelled) == 1), "the engine never saw the cancel"
        generation = engine.cancelled[0]
        assert wait_for(generation.finished.is_set)


def test_a_disconnected_non_streaming_request_is_cancelled(live_server):
    engine = EchoEngine(delay=0.005, endless=True)
    base = live_server(engine)
    with httpx.Client(base_url=base, timeout=0.3) as http, pytest.raises(httpx.ReadTimeout):
        http.post(urls.OPENAI_CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": "w"}]})
    assert wait_for(lambda: len(engine.cancelled) == 1)


def test_concurrent_streams_are_never_mixed(live_server):
    engine = EchoEngine(delay=0.001)
    base = live_server(engine)

    def run(index: int) -> tuple[str, str]:
        words = " ".join(f"w{index}x{k}" for k in range(6))
        with httpx.Client(base_url=base, timeout=30) as http:
            if index % 2:
                response = http.post(urls.OLLAMA_CHAT, json={"model": MODEL,
                                                              "messages": [{"role": "user", "content": words}]})
                return words, "".join(o["message"]["content"] for o in ndjson(response))
            response = http.post(urls.OPENAI_CHAT, json={"model": MODEL, "stream": True,
                                                         "messages": [{"role": "user", "content": words}]})
            chunks = [json.loads(p) for p in sse_payloads(response.text)[:-1]]
            return words, "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])

    results: list = [None] * 16
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, run(i))) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(result is not None and result[0] == result[1] for result in results), results


# ---- schemathesis: generated requests against the OpenAPI schema -------------------------------------------------

def test_generated_requests_get_no_5xx_and_match_the_schema(live_server, monkeypatch):
    """Every operation of the served schema, with bounded generated bodies: no 5xx, statuses, content types and
    bodies as documented. Schema-valid requests may still be refused with a documented 400 (unsupported `format`,
    n=2, a context overflow…), so `positive_data_acceptance` is left out. (Driven through hypothesis directly:
    schemathesis' pytest plugin fails on pytest 9.)"""
    hypothesis = pytest.importorskip("hypothesis")
    schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the `test` extra")
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:18299")  # /api/pull's hub: nothing listens there
    schema = schemathesis.openapi.from_url(live_server(EchoEngine()) + urls.SCHEMA + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 22
    for operation in operations:
        @hypothesis.given(case=operation.as_strategy())
        @hypothesis.settings(max_examples=15, deadline=None, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck))
        def check(case) -> None:
            case.call_and_validate(excluded_checks=[positive_data_acceptance])

        check()
