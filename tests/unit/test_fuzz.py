"""The adversarial suite (issue 20), on a real loopback server with the real engine on test_engine_tiny's tiny model:
schemathesis over both dialects (generation routes included), the numeric-extremes matrix, a deep-nesting body, a
model with a hostile chat template, and the corrupted-manifest matrix. It counts server errors (5xx other than a
damaged model's own, clearly worded 500) and hangs (no answer within HANG_S), and requires 0 of each.

CI runs the short version (about a minute); `nox -s fuzz` runs it with GDSLLM_FUZZ_SCALE=10 and prints the counts."""

import json
import os
import shutil
import threading
import time
from collections import Counter

import httpx
import pytest
import uvicorn
from _cli_models import free_port
from test_engine_hardening import HOSTILE_TEMPLATES, write_hostile_model
from test_engine_tiny import tiny  # noqa: F401 (a fixture)
from test_manifest_hardening import CORRUPTIONS

from gdsllm_core.engine.engine import Engine
from gdsllm_core.engine.forward import LoadOptions
from gdsllm_core.layout import ModelStore
from gdsllm_core.server import create_app, urls

SCALE = int(os.environ.get("GDSLLM_FUZZ_SCALE", "1"))  # examples per operation = 4 x SCALE
HANG_S = 20.0  # no request of this suite may take longer
CHAT = [{"role": "user", "content": "the cat"}]
EXTREMES = [0, -1, 1, 1e-45, 1e-300, 1e300, 2 ** 31, 2 ** 63, 2 ** 64, -(2 ** 63) - 1, 10 ** 30, 0.5, -0.0, True,
            "1e400", "nan", "inf", "-inf", "", None, [], {}]
OLLAMA_OPTIONS = ["temperature", "top_k", "top_p", "min_p", "seed", "num_predict", "num_ctx", "repeat_penalty",
                  "repeat_last_n"]
OPENAI_FIELDS = ["temperature", "top_p", "seed", "max_tokens", "n"]


class Tally:
    """Counts answers by status, server errors and hangs; `report()` prints one line."""

    def __init__(self, name: str):
        self.name, self.statuses, self.server_errors, self.hangs = name, Counter(), [], []

    def check(self, response: httpx.Response | None, what: str, allow_damaged: bool = False) -> None:
        if response is None:
            self.hangs.append(what)
            return
        self.statuses[response.status_code] += 1
        raw = "internal server error" in response.text
        if response.status_code >= 500 and (raw or not allow_damaged) or raw:
            self.server_errors.append(f"{what}: {response.status_code} {response.text[:200]}")

    def report(self) -> None:
        print(f"\nfuzz {self.name}: {sum(self.statuses.values())} requests {dict(sorted(self.statuses.items()))}, "
              f"{len(self.server_errors)} server errors, {len(self.hangs)} hangs")
        assert not self.server_errors, self.server_errors[:5]
        assert not self.hangs, self.hangs[:5]


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):  # noqa: F811
    """A loopback server with the real engine over a copy of the tiny store plus a hostile-template model."""
    root = tmp_path_factory.mktemp("fuzz-store")
    for name in ("tiny-a", "tiny-b"):
        shutil.copytree(tiny["store"].root / name, root / name)
    store = ModelStore(root)
    write_hostile_model(store, "hostile", HOSTILE_TEMPLATES["loops"])
    port = free_port()
    app = create_app(store=store, read_token_from_env=False, bind_host="127.0.0.1",
                     engine_factory=lambda: Engine(store, LoadOptions(device="cpu"), keep_alive=None))
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", root
    uv.should_exit = True
    thread.join(timeout=30)


def send(http: httpx.Client, path: str, body: bytes | dict, method: str = "POST") -> httpx.Response | None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        return http.request(method, path, content=content, headers={"content-type": "application/json"})
    except httpx.TimeoutException:
        return None


def test_schemathesis_over_both_dialects(server):
    hypothesis = pytest.importorskip("hypothesis")
    schemathesis = pytest.importorskip("schemathesis")
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    base, _ = server
    tally = Tally("schemathesis")
    schema = schemathesis.openapi.from_url(base + urls.SCHEMA + "/openapi.json")
    for result in schema.get_all_operations():
        operation = result.ok()

        @hypothesis.given(case=operation.as_strategy())
        @hypothesis.settings(max_examples=4 * SCALE, deadline=None, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck))
        def check(case) -> None:
            if isinstance(case.body, dict) and "model" in case.body and case.operation.path != urls.OLLAMA_DELETE:
                case.body["model"] = "tiny-a"  # reach the generation code, not only the 404
            if isinstance(case.body, dict) and isinstance(case.body.get("options"), dict):
                case.body["options"]["num_predict"] = 4
            for key in ("max_tokens", "max_completion_tokens"):
                if isinstance(case.body, dict) and isinstance(case.body.get(key), int):
                    case.body[key] = min(case.body[key], 4)
            try:
                response = case.call(timeout=HANG_S)
            except Exception:  # a timeout: the server hung
                tally.hangs.append(f"{case.method} {case.path}")
                return
            tally.statuses[response.status_code] += 1
            if response.status_code >= 500:
                tally.server_errors.append(f"{case.method} {case.path}: {response.text[:200]}")
            case.validate_response(response, excluded_checks=[positive_data_acceptance])

        check()
    tally.report()


def test_numeric_extremes_matrix(server):
    base, _ = server
    tally = Tally("numeric extremes")
    with httpx.Client(base_url=base, timeout=HANG_S) as http:
        for value in EXTREMES:
            raw = value if isinstance(value, str) and value[:1] in "1ni-" and value else None
            for field in OLLAMA_OPTIONS:
                for path, body in ((urls.OLLAMA_GENERATE, {"prompt": "the cat"}), (urls.OLLAMA_CHAT, {"messages": CHAT})):
                    request = {"model": "tiny-a", "stream": False, **body, "options": {"num_predict": 4, field: value}}
                    payload = json.dumps(request).encode()
                    if raw is not None:  # a bare JSON number such as 1e400, not a string
                        payload = payload.replace(json.dumps(value).encode(), raw.encode())
                    tally.check(send(http, path, payload), f"{path} options.{field}={value!r}")
            for field in OPENAI_FIELDS:
                request = {"model": "tiny-a", "max_tokens": 4, "messages": CHAT, field: value}
                tally.check(send(http, urls.OPENAI_CHAT, request), f"openai {field}={value!r}")
            for keep_alive in (value, f"{value}h"):
                request = {"model": "tiny-a", "prompt": "x", "stream": False, "keep_alive": keep_alive,
                           "options": {"num_predict": 2}}
                tally.check(send(http, urls.OLLAMA_GENERATE, request), f"keep_alive={keep_alive!r}")
        tally.check(send(http, urls.OLLAMA_PS, b"", "GET"), "ps after the matrix")
        ps = http.get(urls.OLLAMA_PS).json()
        assert all(model["name"] for model in ps["models"])
    tally.report()


def test_deep_nesting_hostile_template_and_corrupted_manifests(server):
    base, root = server
    tally = Tally("nesting, template, manifests")
    with httpx.Client(base_url=base, timeout=HANG_S) as http:
        for depth in (100, 129, 1000, 100_000):
            for path in (urls.OLLAMA_GENERATE, urls.OLLAMA_CHAT, urls.OLLAMA_SHOW, urls.OPENAI_CHAT,
                         urls.OPENAI_COMPLETIONS):
                body = b'{"model": "tiny-a", "x": ' + b"[" * depth + b"]" * depth + b"}"
                tally.check(send(http, path, body), f"{path} depth {depth}")
        response = send(http, urls.OLLAMA_CHAT, {"model": "hostile", "messages": CHAT, "stream": False})
        tally.check(response, "hostile template")
        assert response is not None and response.status_code == 400 and "hostile" in response.text
        for index, kind in enumerate(sorted(CORRUPTIONS)):
            name = f"damaged-{index}"
            shutil.copytree(root / "tiny-a", root / name)
            path = root / name / "manifest.json"
            change, _ = CORRUPTIONS[kind]
            if change is None:
                path.write_bytes(b"{")
            else:
                manifest = json.loads(path.read_bytes())
                manifest["name"] = name
                try:
                    change(manifest)
                except (KeyError, StopIteration, TypeError):  # a corruption for another model's layout
                    continue
                path.write_text(json.dumps(manifest))
            for route, body in ((urls.OLLAMA_GENERATE, {"prompt": "x", "stream": False}),
                                (urls.OLLAMA_CHAT, {"messages": CHAT}), (urls.OPENAI_CHAT, {"messages": CHAT}),
                                (urls.OLLAMA_SHOW, {})):
                tally.check(send(http, route, {"model": name, **body}), f"{kind} via {route}", allow_damaged=True)
        response = send(http, urls.OLLAMA_GENERATE, {"model": "tiny-a", "prompt": "the cat", "stream": False,
                                                     "options": {"num_predict": 3, "temperature": 0}})
        assert response is not None and response.status_code == 200  # still serving
    tally.report()
