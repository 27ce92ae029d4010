"""Issue 20's fault injection on the GPU machine: the bundled SmolLM2 served with 4 layers in VRAM and the rest read
from storage through the ring at every step; a read that fails (EIO) or comes back short in the middle of decoding
ends that request with a clear error, and the next request gets the same answer as before the fault. Faults are
injected at `storage.backends.choose_backend`, as in tests/unit/test_fault_injection.py (which this reuses)."""

import json
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))
from test_fault_injection import Faults  # noqa: E402

from gdsllm_core.engine.engine import Engine  # noqa: E402
from gdsllm_core.engine.forward import LoadOptions  # noqa: E402
from gdsllm_core.server import create_app, urls  # noqa: E402


@pytest.mark.parametrize("kind, fragment", [("eio", "Input/output error"), ("short", "ends early")])
def test_a_failed_storage_read_mid_decode_on_the_gpu(smollm2_store, monkeypatch, kind, fragment):
    from litestar.testing import TestClient

    import gdsllm_llama.plugin
    from gdsllm_core import plugins
    from gdsllm_core.bundled import DEFAULT_MODEL

    plugins.ensure_registered(gdsllm_llama.plugin, "llama")
    monkeypatch.setenv("GDSLLM_IO", "posix")  # short reads are injected at pread; "eio" also covers cuFile
    faults = Faults(monkeypatch)
    options = LoadOptions(device="cuda", host_cache=0, extra={"max_vram_layers": 4})
    app = create_app(store=smollm2_store, engine_factory=lambda: Engine(smollm2_store, options, keep_alive=None),
                     read_token_from_env=False)

    def generate(client) -> list[dict]:
        response = client.post(urls.OLLAMA_GENERATE, json={
            "model": DEFAULT_MODEL, "prompt": "The capital of France is", "raw": True,
            "options": {"temperature": 0, "repeat_penalty": 1, "num_predict": 16}})
        assert response.status_code == 200
        return [json.loads(line) for line in response.text.splitlines() if line.strip()]

    with TestClient(app) as client:
        clean = generate(client)
        assert clean[-1]["done"] and clean[-1]["eval_count"] == 16
        faults.arm(kind, after=26 * 4)  # about four decode steps in (26 streamed layers a step)
        broken = generate(client)
        assert faults.fired == 1 and "error" in broken[-1] and fragment in broken[-1]["error"], broken[-1]
        assert "internal server error" not in broken[-1]["error"]
        again = generate(client)
        assert [line["response"] for line in again] == [line["response"] for line in clean]
