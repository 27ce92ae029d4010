"""Issue 20: a weight read that fails (EIO) or comes back short in the middle of decoding ends that request with a
clear error, and the server goes on serving the next ones. Faults are injected at the storage reader's backend
(`storage.backends.choose_backend`, which every ExtentReader uses), so the test does not depend on which runtime
module streams the weights. On the CPU the streaming forward below reads its output head through an ExtentReader at
every decode step (as the streamed tiers read layers); tests/gpu/test_fault_injection_gpu.py does the same with the
LLaMA GPU forward and layers streamed from storage."""

import errno
import json
import os
import threading

import pytest
import torch
from litestar.testing import TestClient
from test_engine_tiny import TinyForward, tiny  # noqa: F401 (tiny is a fixture)

from gdsllm_core import hookimpl, plugins
from gdsllm_core.engine.engine import Engine
from gdsllm_core.engine.forward import LoadOptions
from gdsllm_core.layout import ModelStore
from gdsllm_core.server import create_app, urls
from gdsllm_core.storage import backends
from gdsllm_core.storage.reader import ExtentReader, extent_views

STREAMED_ARCH = "tiny-streamed"


class Faults:
    """Wraps the backend every new ExtentReader chooses; `arm(kind, after)` makes the read `after` reads from now
    fail: "eio" raises OSError(EIO), "short" makes the file end early (pread returns fewer bytes, then none)."""

    def __init__(self, monkeypatch):
        self.kind, self.countdown, self.fired = None, 0, 0
        self.lock = threading.Lock()
        real_choose = backends.choose_backend
        monkeypatch.setattr(backends, "choose_backend", lambda *a, **k: FaultyBackend(real_choose(*a, **k), self))
        real_preadv = os.preadv
        monkeypatch.setattr(os, "preadv", lambda fd, buffers, offset: self._preadv(real_preadv, fd, buffers, offset))
        self._short = threading.local()

    def arm(self, kind: str, after: int = 0) -> None:
        with self.lock:
            self.kind, self.countdown = kind, after

    def take(self) -> str | None:
        with self.lock:
            if self.kind is None:
                return None
            if self.countdown > 0:
                self.countdown -= 1
                return None
            kind, self.kind = self.kind, None
            self.fired += 1
            return kind

    def _preadv(self, real, fd, buffers, offset):
        if getattr(self._short, "on", False):
            self._short.on = False
            return 0  # end of file: the CPU backend must report the read as short
        return real(fd, buffers, offset)


class FaultyBackend:
    def __init__(self, inner, faults: Faults):
        self.inner, self.faults = inner, faults
        self.name, self.reason = inner.name, getattr(inner, "reason", "")

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def read_into(self, handle, file_offset, nbytes, dest, dest_offset):
        kind = self.faults.take()
        if kind == "eio":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        if kind == "short":
            self.faults._short.on = True
        self.inner.read_into(handle, file_offset, nbytes, dest, dest_offset)


class StreamedTinyForward(TinyForward):
    """TinyForward whose output head is re-read from storage at every step (a streamed tier in miniature)."""

    def __init__(self, entry, options):
        super().__init__(entry, options)
        self.reader = ExtentReader(entry.path, entry.manifest)
        self.head = entry.manifest.extent("output")
        self.buffer = torch.empty(self.head.nbytes, dtype=torch.uint8)

    def decode(self, tokens, caches):
        self.reader.read([self.head], [self.buffer])
        self.out = extent_views(self.head, self.buffer)["output.weight"]
        return super().decode(tokens, caches)

    def close(self):
        self.reader.close()
        super().close()


class StreamedPlugin:
    @hookimpl
    def register_forward_passes(self, register):
        register(STREAMED_ARCH, StreamedTinyForward)


@pytest.fixture
def streamed_store(tiny, tmp_path):  # noqa: F811
    """tiny-a under the streamed architecture."""
    source = tiny["store"].get("tiny-a")
    folder = tmp_path / "tiny-streamed"
    folder.mkdir()
    for path in source.path.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(name="tiny-streamed", architecture=STREAMED_ARCH)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    plugin = StreamedPlugin()
    plugins.pm.register(plugin, name="streamed-test-plugin")
    try:
        yield ModelStore(tmp_path)
    finally:
        plugins.pm.unregister(plugin)


def generate(client, prompt: str) -> list[dict]:
    response = client.post(urls.OLLAMA_GENERATE, json={
        "model": "tiny-streamed", "prompt": prompt, "raw": True, "options": {"temperature": 0, "num_predict": 12}})
    assert response.status_code == 200
    return [json.loads(line) for line in response.text.splitlines() if line.strip()]


@pytest.mark.parametrize("kind, fragment", [("eio", "Input/output error"), ("short", "ends early")])
def test_a_failed_read_mid_decode_ends_that_request_and_the_server_goes_on(streamed_store, monkeypatch, kind,
                                                                          fragment):
    faults = Faults(monkeypatch)
    engine_holder = {}

    def make_engine():
        engine_holder["engine"] = Engine(streamed_store, LoadOptions(device="cpu"), keep_alive=None)
        return engine_holder["engine"]

    app = create_app(store=streamed_store, engine_factory=make_engine, read_token_from_env=False)
    with TestClient(app) as client:
        clean = generate(client, "the cat sat")
        assert clean[-1]["done"] and clean[-1]["eval_count"] == 12
        faults.arm(kind, after=5)  # the sixth read from now: in the middle of the next answer's decode
        broken = generate(client, "the cat sat")
        assert faults.fired == 1
        assert "error" in broken[-1] and fragment in broken[-1]["error"], broken[-1]
        assert "internal server error" not in broken[-1]["error"]
        assert 0 < len(broken) - 1 < 12 and not any(line.get("done") for line in broken)  # it was mid-answer
        again = generate(client, "the cat sat")  # the server and its engine go on serving
        assert [line["response"] for line in again] == [line["response"] for line in clean]
