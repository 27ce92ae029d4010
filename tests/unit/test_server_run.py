"""`run_server`, as `gdsllm serve` calls it: a real uvicorn process that answers and exits cleanly on SIGTERM."""

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from _cli_models import free_port

from gdsllm_core.errors import ModelNotFoundError
from gdsllm_core.layout import ModelStore
from gdsllm_core.server import run_server, urls


def test_run_server_refuses_a_missing_model_before_binding(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        run_server("no-such-model", port=free_port(), store=ModelStore(tmp_path))


def test_run_server_serves_then_exits_on_sigterm(tmp_path):
    """The token case (the open case's startup line is checked in test_server_api)."""
    token = "t0ken"
    port = free_port()
    code = ("from gdsllm_core.layout import ModelStore; from gdsllm_core.server import run_server; "
            f"run_server(None, port={port}, store=ModelStore({str(tmp_path)!r}))")
    env = {**os.environ, "GDSLLM_API_TOKEN": token}
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(base + urls.HEALTH, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        headers = {"Authorization": f"Bearer {token}"}
        assert httpx.get(base + urls.OLLAMA_TAGS, headers=headers).json() == {"models": []}
        assert httpx.get(base + urls.OLLAMA_TAGS).status_code == 401
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, output
    assert "auth ON" in output
    assert "Finished server process" in output
