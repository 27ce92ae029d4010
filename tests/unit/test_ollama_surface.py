"""The ollama surface a front-end calls, through the real `ollama` and `openai` clients on a loopback server over a
tiny LLaMA made with transformers: embeddings (checked against transformers' own final hidden states of the same
checkpoint, pooled and normalised the same way), pull (from a loopback hub), copy, create (from a model, from a
folder on the server, from uploaded blobs) with a system prompt and parameters, show's GGUF keys (against the
checkpoint's config.json), version, `GET /`, and generate's `context`."""

import base64
import json
import threading
import time

import httpx
import numpy as np
import ollama
import openai
import pytest
import torch
import uvicorn
from _cli_models import assert_same_model, convert_into, shared_tiny
from test_pull import FakeHub, tiny_repo_files

from gdsllm_core.engine.engine import Engine
from gdsllm_core.layout.store import ModelStore
from gdsllm_core.server import create_app

PORT = 18210  # this file's loopback server
HUB_PORTS = (18211, 18212)  # the fake hub (and its "CDN")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint folder, a private store holding it as "tiny")."""
    folder, _ = shared_tiny(tmp_path_factory)
    root = tmp_path_factory.mktemp("surface-store")
    convert_into(folder, root, "tiny")
    return folder, root


@pytest.fixture(scope="module")
def server(tiny):
    store = ModelStore(tiny[1])
    app = create_app(store=store, read_token_from_env=False,
                     engine_factory=lambda: Engine(store=store, keep_alive=None))
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=PORT, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{PORT}", store
    uv.should_exit = True
    thread.join(timeout=60)


@pytest.fixture
def client(server):
    return ollama.Client(host=server[0], timeout=300)


def reference_states(folder, texts: list[str]) -> list[torch.Tensor]:
    """transformers' final hidden states (after the last norm) of each text, [T, D] fp32."""
    from transformers import AutoTokenizer, LlamaModel

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = LlamaModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([tokenizer(text).input_ids])).last_hidden_state[0] for text in texts]


def normalised(vector: torch.Tensor) -> np.ndarray:
    return (vector / vector.norm()).numpy()


TEXTS = ["the cat sat on the mat.", "hello there, how are you today? i am fine, thank you."]


def test_embed_equals_transformers_last_token_state_normalised(client, tiny):
    reference = reference_states(tiny[0], TEXTS)
    answer = client.embed(model="tiny", input=TEXTS)
    assert len(answer.embeddings) == 2
    for got, states in zip(answer.embeddings, reference, strict=True):
        np.testing.assert_allclose(got, normalised(states[-1]), atol=2e-5)
        assert abs(np.linalg.norm(got) - 1) < 1e-5
    assert answer.prompt_eval_count == sum(len(states) for states in reference)

    legacy = client.embeddings(model="tiny", prompt=TEXTS[0])  # /api/embeddings: not normalised, as ollama
    np.testing.assert_allclose(legacy.embedding, reference[0][-1].numpy(), rtol=1e-4, atol=1e-4)

    cut = client.embed(model="tiny", input=TEXTS[1], dimensions=16)
    np.testing.assert_allclose(cut.embeddings[0], normalised(reference[1][-1][:16]), atol=2e-5)


def test_embed_truncates_the_end_or_refuses(client, tiny):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny[0])(TEXTS[1]).input_ids
    short = AutoTokenizer.from_pretrained(tiny[0]).decode(ids[:8])
    reference = reference_states(tiny[0], [short])[0]
    answer = client.embed(model="tiny", input=TEXTS[1], options={"num_ctx": 8})
    np.testing.assert_allclose(answer.embeddings[0], normalised(reference[-1]), atol=2e-5)
    with pytest.raises(ollama.ResponseError) as failure:
        client.embed(model="tiny", input=TEXTS[1], truncate=False, options={"num_ctx": 8})
    assert failure.value.status_code == 400 and "context window is 8 tokens" in failure.value.error
    with pytest.raises(ollama.ResponseError) as failure:
        client.embed(model="tiny", input=TEXTS[0], options={"temperature": 0.5})
    assert failure.value.status_code == 400 and "options.temperature" in failure.value.error


def test_mean_pooling_when_the_model_says_so(server, tiny, tmp_path):
    """A model whose config names mean pooling (GGUF's pooling_type 1) gets the mean of its states."""
    store = server[1]
    manifest_path = store.path("tiny") / "manifest.json"
    copy = ollama.Client(host=server[0])
    copy.copy("tiny", "tiny-mean")
    path = store.path("tiny-mean") / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["config"]["pooling_type"] = 1
    path.write_text(json.dumps(manifest))
    reference = reference_states(tiny[0], TEXTS[:1])[0]
    answer = copy.embed(model="tiny-mean", input=TEXTS[0])
    np.testing.assert_allclose(answer.embeddings[0], normalised(reference.mean(dim=0)), atol=2e-5)
    assert json.loads(manifest_path.read_text())["config"].get("pooling_type") is None  # the source is untouched


def test_openai_embeddings_float_and_base64(server, tiny):
    reference = reference_states(tiny[0], TEXTS)
    oai = openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)
    answer = oai.embeddings.create(model="tiny", input=TEXTS)  # the client asks for base64 and decodes it
    for item, states in zip(answer.data, reference, strict=True):
        np.testing.assert_allclose(item.embedding, normalised(states[-1]), atol=2e-5)
    assert answer.usage.prompt_tokens == sum(len(states) for states in reference)
    raw = httpx.post(server[0] + "/v1/embeddings", json={"model": "tiny", "input": TEXTS[0],
                                                          "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, normalised(reference[0][-1]), atol=2e-5)


def test_show_reports_gguf_keys_from_the_checkpoint_and_capabilities(client, tiny):
    config = json.loads((tiny[0] / "config.json").read_text())
    info = client.show("tiny").modelinfo
    assert info["general.architecture"] == "llama"
    assert info["llama.block_count"] == config["num_hidden_layers"]
    assert info["llama.embedding_length"] == config["hidden_size"]
    assert info["llama.attention.head_count"] == config["num_attention_heads"]
    assert info["llama.attention.head_count_kv"] == config["num_key_value_heads"]
    assert info["llama.feed_forward_length"] == config["intermediate_size"]
    assert info["llama.context_length"] == config["max_position_embeddings"]
    assert info["llama.rope.freq_base"] == config.get("rope_theta", config.get("rope_parameters", {}).get("rope_theta"))
    from safetensors import safe_open

    with safe_open(str(tiny[0] / "model.safetensors"), "pt") as weights:
        count = sum(int(np.prod(weights.get_slice(name).get_shape())) for name in weights.keys())  # noqa: SIM118
    assert info["general.parameter_count"] == count
    assert info["general.file_type"] == 0  # stored as F32, GGUF's ALL_F32
    assert client.show("tiny").capabilities == ["completion", "embedding"]


def test_version_root_and_head(server):
    version = httpx.get(server[0] + "/api/version").json()
    assert tuple(int(part) for part in version["version"].split(".")) >= (0, 5, 0)  # structured-output era
    assert version["gdsllm_version"]
    root = httpx.get(server[0] + "/")
    assert root.status_code == 200 and root.text == "Ollama is running"
    assert httpx.head(server[0] + "/").status_code == 200


def test_copy_and_create_with_system_and_parameters(client, server, tiny):
    client.copy("tiny", "tiny-copy")
    assert_same_model(tiny[1], "tiny", tiny[1], "tiny-copy")
    answer = client.create(model="tiny-brief", from_="tiny", system="be brief.",
                           parameters={"num_predict": 3, "temperature": 0, "stop": ["zzz"]})
    assert answer.status == "success"
    shown = client.show("tiny-brief")
    assert 'SYSTEM """be brief."""' in shown.modelfile and "num_predict" in shown.parameters
    # the stored parameters and system prompt apply: 3 tokens, and the prompt has the system turn
    plain = client.chat(model="tiny", messages=[{"role": "user", "content": "hello"}],
                        options={"num_predict": 3, "temperature": 0})
    brief = client.chat(model="tiny-brief", messages=[{"role": "user", "content": "hello"}])
    assert brief.eval_count == 3
    from tokenizers import Tokenizer

    system_turn = len(Tokenizer.from_file(str(tiny[0] / "tokenizer.json"))
                      .encode("<|im_start|>system\nbe brief.<|im_end|>\n").ids)
    assert brief.prompt_eval_count == plain.prompt_eval_count + system_turn  # both cold: another model each
    with pytest.raises(ollama.ResponseError) as failure:
        client.create(model="bad", from_="tiny", parameters={"mirostat": 2})
    assert failure.value.status_code == 400 and "mirostat" in failure.value.error


def test_create_from_a_folder_and_from_uploaded_blobs(client, server, tiny, tmp_path):
    client.create(model="from-folder", from_=str(tiny[0]))
    assert_same_model(tiny[1], "tiny", tiny[1], "from-folder")
    files = {}
    for path in sorted(tiny[0].iterdir()):
        if path.is_file():
            files[path.name] = client.create_blob(path)
    progress = list(client.create(model="from-blobs", files=files, stream=True))
    assert progress[-1].status == "success"
    assert_same_model(tiny[1], "tiny", tiny[1], "from-blobs")
    assert httpx.head(server[0] + f"/api/blobs/{files['config.json']}").status_code == 200
    assert httpx.head(server[0] + "/api/blobs/sha256:" + "0" * 64).status_code == 404
    bad = httpx.post(server[0] + "/api/blobs/sha256:" + "0" * 64, content=b"not that")
    assert bad.status_code == 400


def test_pull_streams_ollama_progress_and_matches_a_direct_conversion(client, server, tiny, tmp_path, monkeypatch):
    hub = FakeHub(HUB_PORTS)
    try:
        hub.add_repo("user/tiny-chat", tiny_repo_files(tiny[0]))
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("GDSLLM_HF_CACHE", str(tmp_path / "hf"))
        progress = list(client.pull("user/tiny-chat", stream=True))
    finally:
        hub.stop()
    assert progress[0].status == "pulling manifest" and progress[-1].status == "success"
    weights = [p for p in progress if p.status == "pulling model.safetensors"]
    size = (tiny[0] / "model.safetensors").stat().st_size
    assert weights and weights[-1].completed == weights[-1].total == size and weights[-1].digest.startswith("sha256:")
    assert [p.completed for p in weights] == sorted(p.completed for p in weights)
    assert_same_model(tiny[1], "tiny", tiny[1], "tiny-chat")
    again = client.pull("user/tiny-chat")  # already there: success without the hub
    assert again.status == "success"
    answer = client.chat(model="hf.co/user/tiny-chat", messages=[{"role": "user", "content": "hi"}],
                         options={"num_predict": 1})
    assert answer.done


def test_generate_context_is_returned_and_continued(client, tiny):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny[0] / "tokenizer.json"))
    first = client.generate(model="tiny", prompt="hello there", options={"num_predict": 4, "temperature": 0})
    prompt = "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    assert first.context[:len(prompt_ids)] == prompt_ids and len(first.context) == len(prompt_ids) + 4
    assert tokenizer.decode(first.context[len(prompt_ids):]) == first.response
    second = client.generate(model="tiny", prompt="my name is ada.", context=first.context,
                             options={"num_predict": 2, "temperature": 0})
    turn = tokenizer.encode("<|im_start|>user\nmy name is ada.<|im_end|>\n<|im_start|>assistant\n",
                            add_special_tokens=False).ids
    assert second.context[:len(first.context) + len(turn)] == first.context + turn
    with pytest.raises(ollama.ResponseError) as failure:
        client.generate(model="tiny", prompt="x", context=[10 ** 6])
    assert failure.value.status_code == 400 and "context" in failure.value.error
