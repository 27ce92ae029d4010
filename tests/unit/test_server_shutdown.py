"""Issue 20 item 9 / issue 19 item 7: SIGTERM while streams are open ends every stream with its final chunk (ollama's
done object, OpenAI's finish chunk then [DONE]) and logs no traceback. The server runs in its own process (the
echo engine of test_server_api, endless, so only the shutdown can end the streams), served by `serve` as
`gdsllm serve` is."""

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from _cli_models import free_port

from gdsllm_core.server import urls

MODEL = "echo-model"
SERVER = """
import sys
sys.path.insert(0, {tests!r})
from test_server_api import EchoEngine, write_tiny_model
from gdsllm_core.layout import ModelStore
from gdsllm_core.server import create_app
from gdsllm_core.server.app import listen_socket, serve
write_tiny_model({root!r})
engine = EchoEngine(delay=0.01, endless=True)
app = create_app(store=ModelStore({root!r}), engine_factory=lambda: engine, read_token_from_env=False,
                 bind_host="127.0.0.1")
serve(app, listen_socket("127.0.0.1", {port}))
"""
STREAMS = [(urls.OLLAMA_GENERATE, {"model": MODEL, "prompt": "tick tock"}),
           (urls.OLLAMA_CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "tick tock"}]}),
           (urls.OPENAI_CHAT, {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "tick"}]}),
           (urls.OPENAI_COMPLETIONS, {"model": MODEL, "stream": True, "prompt": "tick", "max_tokens": None})]


def test_stop_during_streams_ends_each_with_its_final_chunk_and_no_traceback(tmp_path):
    port = free_port()
    code = SERVER.format(tests=str(Path(__file__).parent), root=str(tmp_path), port=port)
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(base + urls.HEALTH, timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and server.poll() is None, "the server did not start"
                time.sleep(0.1)
        lines: dict[str, list[str]] = {path: [] for path, _ in STREAMS}
        started = threading.Barrier(len(STREAMS) + 1)

        def read(path: str, body: dict) -> None:
            with httpx.Client(base_url=base, timeout=30) as http, http.stream("POST", path, json=body) as response:
                for line in response.iter_lines():
                    if line:
                        lines[path].append(line)
                        if len(lines[path]) == 3:
                            started.wait()

        readers = [threading.Thread(target=read, args=stream, daemon=True) for stream in STREAMS]
        for reader in readers:
            reader.start()
        started.wait(timeout=30)
        server.send_signal(signal.SIGTERM)
        for reader in readers:
            reader.join(timeout=30)
            assert not reader.is_alive(), "a stream did not end"
        output, _ = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
    assert server.returncode == 0, output
    assert "Traceback" not in output and "CancelledError" not in output, output
    for path in (urls.OLLAMA_GENERATE, urls.OLLAMA_CHAT):
        last = json.loads(lines[path][-1])
        assert last["done"] is True and last["done_reason"] == "cancelled", lines[path][-2:]
    for path in (urls.OPENAI_CHAT, urls.OPENAI_COMPLETIONS):
        assert lines[path][-1] == "data: [DONE]", lines[path][-2:]
        finish = json.loads(lines[path][-2][len("data: "):])
        assert finish["choices"][0]["finish_reason"] is not None, lines[path][-2:]
