"""Issue 20 on the server (over the echo engine of test_server_api): numeric ranges refused in the dialect's shape,
browser safety (CORS with GDSLLM_ORIGINS, Origin and Host checks, JSON content type, nesting depth), a busy port,
/api/ps after another process deleted the model, and what 404s tell."""

import socket

import pytest
from _cli_models import free_port
from litestar.testing import TestClient
from test_server_api import MODEL, EchoEngine, write_tiny_model

from gdsllm_core.errors import GdsllmError
from gdsllm_core.layout import ModelStore
from gdsllm_core.server import create_app, urls
from gdsllm_core.server.app import listen_socket

TOKEN = "s3cret-token"
CHAT = [{"role": "user", "content": "hi there"}]
# (route, body with one out-of-range value, the field the 400 must name)
OUT_OF_RANGE = [
    (urls.OLLAMA_GENERATE, {"prompt": "x", "options": {"seed": 2 ** 64}}, "options.seed"),
    (urls.OLLAMA_CHAT, {"messages": CHAT, "options": {"seed": -(2 ** 63) - 1}}, "options.seed"),
    (urls.OPENAI_CHAT, {"messages": CHAT, "seed": 2 ** 64}, "seed"),
    (urls.OPENAI_COMPLETIONS, {"prompt": "x", "seed": 2 ** 70}, "seed"),
    (urls.OPENAI_CHAT, {"messages": CHAT, "stream": True, "seed": 2 ** 64}, "seed"),
    (urls.OLLAMA_GENERATE, {"prompt": "x", "options": {"temperature": 1e-45}}, "options.temperature"),
    (urls.OPENAI_CHAT, {"messages": CHAT, "temperature": 1e-9}, "temperature"),
    (urls.OLLAMA_GENERATE, {"prompt": "x", "options": {"repeat_penalty": 1e-45}}, "options.repeat_penalty"),
    (urls.OLLAMA_CHAT, {"messages": CHAT, "options": {"top_k": 2 ** 40}}, "options.top_k"),
    (urls.OLLAMA_CHAT, {"messages": CHAT, "options": {"num_ctx": 2 ** 40}}, "options.num_ctx"),
    (urls.OLLAMA_CHAT, {"messages": CHAT, "options": {"num_predict": 2 ** 40}}, "options.num_predict"),
    (urls.OLLAMA_GENERATE, {"prompt": "x", "keep_alive": 10_000_000_000}, "keep_alive"),
    (urls.OLLAMA_GENERATE, {"prompt": "x", "keep_alive": "inf"}, "keep_alive"),
    (urls.OLLAMA_GENERATE, {"prompt": "x", "keep_alive": "1e400"}, "keep_alive"),
    (urls.OLLAMA_CHAT, {"messages": CHAT, "keep_alive": "2562048h"}, "keep_alive"),
    (urls.OLLAMA_GENERATE, {"prompt": "", "keep_alive": 1e10}, "keep_alive"),
]


@pytest.fixture
def store(tmp_path):
    write_tiny_model(tmp_path)
    return ModelStore(tmp_path)


def app_for(store, engine=None, **kwargs):
    engine = engine or EchoEngine()
    return create_app(store=store, engine_factory=lambda: engine, read_token_from_env=False, **kwargs)


@pytest.fixture
def client(store):
    with TestClient(app_for(store)) as test:
        yield test


@pytest.mark.parametrize("path, body, field", OUT_OF_RANGE)
def test_out_of_range_values_are_400_naming_the_field_and_range(client, path, body, field):
    response = client.post(path, json={"model": MODEL, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    message = error if isinstance(error, str) else error["message"]
    assert message.startswith(f"{field} ") and "must be" in message
    if not isinstance(error, str):
        assert error["param"] == field


def test_values_at_the_edges_of_their_ranges_are_accepted(client):
    options = {"seed": 2 ** 64 - 1, "temperature": 1e-3, "repeat_penalty": 1e-3, "top_k": 0, "top_p": 0.0}
    response = client.post(urls.OLLAMA_GENERATE, json={"model": MODEL, "prompt": "a b", "stream": False,
                                                       "options": options, "keep_alive": "-1"})
    assert response.status_code == 200 and response.json()["response"] == "a b"
    response = client.post(urls.OPENAI_CHAT, json={"model": MODEL, "messages": CHAT, "seed": -(2 ** 63)})
    assert response.status_code == 200


# ---- browsers ----------------------------------------------------------------------------------------------------

def loopback_client(store, **kwargs) -> TestClient:
    return TestClient(app_for(store, bind_host="127.0.0.1", **kwargs), base_url="http://127.0.0.1:11434")


def test_cors_preflight_needs_no_token_and_answers_loopback_origins(store):
    preflight = {"Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    with loopback_client(store, api_token=TOKEN) as client:
        response = client.options(urls.OPENAI_CHAT, headers=preflight)
        assert response.status_code == 204
        assert response.headers["access-control-allow-origin"] == "http://localhost:5173"
        assert "POST" in response.headers["access-control-allow-methods"]
        response = client.post(urls.OPENAI_CHAT, json={"model": MODEL, "messages": CHAT},
                               headers={"Origin": "http://localhost:5173", "Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "http://localhost:5173"
        refused = client.options(urls.OPENAI_CHAT, headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in refused.headers


def test_a_foreign_origin_is_refused_unless_gdsllm_origins_lists_it(store, monkeypatch):
    body = {"model": MODEL, "prompt": "a", "stream": False}
    with loopback_client(store) as client:
        response = client.post(urls.OLLAMA_GENERATE, json=body, headers={"Origin": "https://evil.example"})
        assert response.status_code == 403 and "evil.example" in response.json()["error"]
        response = client.request("DELETE", urls.OLLAMA_DELETE, json={"model": MODEL},
                                  headers={"Origin": "https://evil.example"})
        assert response.status_code == 403
        assert client.post(urls.OLLAMA_GENERATE, json=body, headers={"Origin": "null"}).status_code == 403
    monkeypatch.setenv("GDSLLM_ORIGINS", "https://*.example.org, https://app.example")
    with loopback_client(store) as client:
        for origin in ("https://chat.example.org", "https://app.example", "http://127.0.0.1:3000", "app://x"):
            response = client.post(urls.OLLAMA_GENERATE, json=body, headers={"Origin": origin})
            assert response.status_code == 200 and response.headers["access-control-allow-origin"] == origin
        assert client.post(urls.OLLAMA_GENERATE, json=body,
                           headers={"Origin": "https://evil.example"}).status_code == 403


@pytest.mark.parametrize("host, allowed", [("127.0.0.1:11434", True), ("localhost:11434", True), ("[::1]:11434", True),
                                           ("localhost", True), ("app.localhost:1", True), ("127.0.0.2", True),
                                           ("attacker.example:11434", False), ("10.0.0.5:11434", False)])
def test_bound_to_loopback_the_host_header_must_be_loopback(store, host, allowed):
    """DNS rebinding: a page on attacker.example resolving to 127.0.0.1 sends Host: attacker.example."""
    with loopback_client(store) as client:
        response = client.get(urls.OLLAMA_TAGS, headers={"Host": host})
        assert response.status_code == (200 if allowed else 403), response.text


def test_bound_elsewhere_any_host_is_accepted(store):
    with TestClient(app_for(store, bind_host="0.0.0.0"), base_url="http://192.0.2.7:8000") as client:
        assert client.get(urls.OLLAMA_TAGS).status_code == 200


@pytest.mark.parametrize("content_type, status", [("text/plain", 415), ("multipart/form-data; boundary=x", 415),
                                                  ("application/json", 200), ("application/json; charset=utf-8", 200),
                                                  (None, 200)])
def test_json_bodies_need_a_json_content_type_or_none(client, content_type, status):
    headers = {"content-type": content_type} if content_type else {}
    body = b'{"model": "%s", "prompt": "a b", "stream": false}' % MODEL.encode()
    request = client.build_request("POST", urls.OLLAMA_GENERATE, content=body, headers=headers)
    assert "content-type" not in request.headers or content_type
    response = client.send(request)
    assert response.status_code == status, response.text


def test_curl_default_form_type_is_accepted_only_without_an_origin(client):
    body = b'{"model": "%s", "prompt": "a b", "stream": false}' % MODEL.encode()
    form = {"content-type": "application/x-www-form-urlencoded"}
    assert client.post(urls.OLLAMA_GENERATE, content=body, headers=form).status_code == 200
    response = client.post(urls.OLLAMA_GENERATE, content=body, headers={**form, "Origin": "http://localhost:1"})
    assert response.status_code == 415


@pytest.mark.parametrize("path", [urls.OLLAMA_GENERATE, urls.OLLAMA_CHAT, urls.OLLAMA_SHOW, urls.OPENAI_CHAT,
                                  urls.OPENAI_COMPLETIONS])
def test_deeply_nested_json_is_400_not_a_recursion_error(client, path):
    deep = b'{"model": "' + MODEL.encode() + b'", "options": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    response = client.post(path, content=deep, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "nested" in response.text
    brackets_in_a_string = {"model": MODEL, "prompt": "[" * 5000, "stream": False}
    if path == urls.OLLAMA_GENERATE:
        assert client.post(path, json=brackets_in_a_string).status_code == 200


# ---- serving -----------------------------------------------------------------------------------------------------

def test_a_busy_port_fails_before_anything_loads():
    port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        with pytest.raises(GdsllmError, match=f"cannot listen on 127.0.0.1:{port}"):
            listen_socket("127.0.0.1", port)


def test_a_non_loopback_host_without_token_warns_loudly(caplog, monkeypatch):
    from gdsllm_core.server.app import warn_if_exposed

    warn_if_exposed("0.0.0.0", None)
    assert "WITHOUT A TOKEN" in caplog.text
    caplog.clear()
    warn_if_exposed("0.0.0.0", TOKEN)
    warn_if_exposed("127.0.0.1", None)
    assert "WITHOUT A TOKEN" not in caplog.text


def test_ps_after_another_process_deleted_the_loaded_model(store, tmp_path):
    engine = EchoEngine()
    with TestClient(app_for(store, engine)) as client:
        client.post(urls.OLLAMA_GENERATE, json={"model": MODEL, "prompt": "a", "stream": False})
        ModelStore(tmp_path).remove(MODEL)  # as `gdsllm rm` in another process would
        response = client.get(urls.OLLAMA_PS)
        assert response.status_code == 200
        assert [model["name"] for model in response.json()["models"]] == [MODEL]


def test_404s_name_neither_the_store_path_nor_other_models(store, tmp_path):
    write_tiny_model(tmp_path, "private-model")
    with TestClient(app_for(store)) as client:
        for response in (client.post(urls.OLLAMA_SHOW, json={"model": "missing"}),
                         client.get("/v1/models/missing"),
                         client.post(urls.OLLAMA_CHAT, json={"model": "missing", "messages": CHAT})):
            assert response.status_code == 404
            assert str(tmp_path) not in response.text and "private-model" not in response.text
            assert "missing" in response.text

