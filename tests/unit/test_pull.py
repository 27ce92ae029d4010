"""`gdsllm pull` end to end against a loopback server speaking the Hugging Face hub protocol, through the real
huggingface_hub client (HF_ENDPOINT): model info with siblings, HEAD/GET /resolve with ETag, X-Repo-Commit,
Content-Length and Range, large files redirected to a "CDN" path with X-Linked-Etag / X-Linked-Size like the hub
does. The pulled models must match converting the same files directly: same tensors (checksums) and the same greedy
tokens from the engine."""

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from _cli_models import assert_one_line_error, assert_same_model, cli_env, convert_into, gdsllm, shared_tiny

from gdsllm_core import pull as pull_mod
from gdsllm_core.errors import DownloadError, UnsupportedQuantError

GOOD_TOKEN = "hf_good_token"


class FakeHub:
    """A hub with a few repos. `crash_after[(repo, path)] = n`: serve n bytes of that file, then die (the listening
    socket closes; later connections are refused) as a killed server would."""

    def __init__(self, ports: tuple[int, int] = (0, 0)):
        self.repos: dict[str, dict] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.cdn_auth: list[bool] = []
        self.crash_after: dict[tuple[str, str], int] = {}
        self.private: set[str] = set()
        self.servers: list[ThreadingHTTPServer] = []
        self.ports = ports
        self._start()

    def add_repo(self, repo_id: str, files: dict[str, bytes]) -> str:
        commit = hashlib.sha1(repo_id.encode() + b"".join(files[name] for name in sorted(files))).hexdigest()
        self.repos[repo_id] = {"commit": commit, "files": files,
                               "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}}
        return commit

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports[0]}"

    @property
    def cdn(self) -> str:
        """Large files live on another host, as on the hub: the client must not send the token there."""
        return f"http://127.0.0.2:{self.ports[1]}"

    def _start(self) -> None:
        self.servers = []
        for host, port in zip(("127.0.0.1", "127.0.0.2"), self.ports, strict=True):
            server = ThreadingHTTPServer((host, port), self._handler())
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self.servers.append(server)
        self.ports = tuple(server.server_address[1] for server in self.servers)

    def restart(self) -> None:
        """Come back on the same ports after a crash."""
        self._start()

    def stop(self) -> None:
        for server in self.servers:
            threading.Thread(target=server.shutdown, daemon=True).start()
            server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._serve(head=True)

            def do_GET(self):
                self._serve(head=False)

            def _error(self, status: int, code: str | None = None, message: str | None = None):
                body = json.dumps({"error": message or code or "error"}).encode()
                self.send_response(status)
                if code:
                    self.send_header("X-Error-Code", code)
                if message:
                    self.send_header("X-Error-Message", message)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _auth_ok(self, repo_id: str) -> bool:
                auth = self.headers.get("Authorization")
                if auth is not None and auth != f"Bearer {GOOD_TOKEN}":
                    self._error(401, message="Invalid credentials in Authorization header")
                    return False
                if repo_id in hub.private and auth is None:
                    self._error(401, code="RepoNotFound", message="Repository not found")
                    return False
                return True

            def _serve(self, head: bool):
                path = self.path.split("?")[0]
                hub.requests.append((self.command, path, self.headers.get("Range")))
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"]:
                    repo_id = "/".join(parts[2:4])
                    if not self._auth_ok(repo_id):
                        return
                    return self._model_info(repo_id)
                if parts[0] == "cdn":
                    hub.cdn_auth.append("Authorization" in self.headers)
                    return self._blob(parts[1], parts[2], "/".join(parts[3:]), head)
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo_id, path_in_repo = "/".join(parts[:2]), "/".join(parts[4:])
                    if not self._auth_ok(repo_id):
                        return
                    return self._resolve(repo_id, parts[3], path_in_repo, head)
                self._error(404, message="no such route")

            def _model_info(self, repo_id: str):
                repo = hub.repos.get(repo_id)
                if repo is None:
                    return self._error(404, code="RepoNotFound", message="Repository not found")
                body = json.dumps({"id": repo_id, "modelId": repo_id, "sha": repo["commit"], "private": False,
                                   "siblings": [{"rfilename": name} for name in repo["files"]]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _resolve(self, repo_id: str, revision: str, name: str, head: bool):
                repo = hub.repos.get(repo_id)
                if repo is None:
                    return self._error(404, code="RepoNotFound", message="Repository not found")
                if revision not in ("main", repo["commit"]):
                    return self._error(404, code="RevisionNotFound")
                if name not in repo["files"]:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("X-Repo-Commit", repo["commit"])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                sha = repo["sha256"][name]
                if name.endswith((".safetensors", ".gguf")):  # LFS files: redirect to the "CDN", like the hub
                    self.send_response(302)
                    self.send_header("Location", f"{hub.cdn}/cdn/{repo_id}/{name}")
                    self.send_header("X-Repo-Commit", repo["commit"])
                    self.send_header("X-Linked-Etag", f'"{sha}"')
                    self.send_header("X-Linked-Size", str(len(repo["files"][name])))
                    self.send_header("ETag", f'"{sha}"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self._send_bytes(repo_id, name, head, commit=repo["commit"])

            def _blob(self, owner: str, repo: str, name: str, head: bool):
                self._send_bytes(f"{owner}/{repo}", name, head, commit=None)

            def _send_bytes(self, repo_id: str, name: str, head: bool, commit: str | None):
                repo = hub.repos[repo_id]
                data = repo["files"][name]
                start, end = 0, len(data)
                range_header = self.headers.get("Range")
                if range_header and not head:
                    first, _, last = range_header.removeprefix("bytes=").partition("-")
                    start, end = int(first), min(len(data), int(last) + 1) if last else len(data)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("ETag", f'"{repo["sha256"][name]}"')
                if commit:
                    self.send_header("X-Repo-Commit", commit)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(end - start))
                self.end_headers()
                if head:
                    return
                crash = hub.crash_after.pop((repo_id, name), None)
                if crash is None:
                    self.wfile.write(data[start:end])
                    return
                self.wfile.write(data[start:start + crash])
                self.wfile.flush()
                hub.stop()  # no new connections from now on …
                self.close_connection = True  # … and this one ends mid-file

        return Handler


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return shared_tiny(tmp_path_factory)[0]


@pytest.fixture
def hub():
    server = FakeHub()
    yield server
    try:
        server.stop()
    except OSError:
        pass


def tiny_repo_files(folder: Path) -> dict[str, bytes]:
    files = {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}
    files["README.md"] = b"# tiny\n"
    files["original/consolidated.00.pth"] = b"\0" * 1000  # must not be fetched
    return files


def greedy_tokens(store_root: Path, name: str, prompt: str, n: int = 6) -> list[int]:
    from gdsllm_core.engine.engine import Engine
    from gdsllm_core.engine.forward import LoadOptions
    from gdsllm_core.layout.store import ModelStore
    from gdsllm_core.types import GenerateRequest, SamplingParams

    with Engine(store=ModelStore(store_root), options=LoadOptions(device="cpu"), keep_alive=None) as engine:
        generation = engine.submit(GenerateRequest(model=name, prompt=prompt, raw=True, max_tokens=n,
                                                   sampling=SamplingParams(temperature=0, repeat_penalty=1.0)))
        return [event.token_id for event in generation if event.token_id is not None]


def transformers_greedy(folder: Path, prompt: str, n: int) -> list[int]:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    ids = AutoTokenizer.from_pretrained(folder)(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = LlamaForCausalLM.from_pretrained(folder).eval().generate(ids, max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def test_pull_safetensors_repo_matches_direct_conversion(tmp_path, hub, tiny_folder):
    hub.add_repo("test-org/Tiny-Llama", tiny_repo_files(tiny_folder))
    env = cli_env(tmp_path, HF_ENDPOINT=hub.endpoint)
    result = gdsllm(["pull", "test-org/Tiny-Llama"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "pulled Tiny-Llama" in result.stdout

    fetched = {path for method, path, _ in hub.requests if method == "GET" and ("/resolve/" in path or "/cdn/" in path)}
    assert not any("README" in p or "original/" in p for p in fetched), fetched
    assert any(p.endswith("model.safetensors") for p in fetched) and any(p.endswith("tokenizer.json") for p in fetched)

    convert_into(tiny_folder, tmp_path / "direct", "tiny")
    assert_same_model(tmp_path / "models", "Tiny-Llama", tmp_path / "direct", "tiny")
    pulled = greedy_tokens(tmp_path / "models", "Tiny-Llama", "hello there")
    assert len(pulled) == 6
    assert pulled == greedy_tokens(tmp_path / "direct", "tiny", "hello there")
    assert pulled == transformers_greedy(tiny_folder, "hello there", 6)  # and both are the source model's tokens

    listing = gdsllm(["list"], env, tmp_path)
    assert "Tiny-Llama" in listing.stdout and "llama" in listing.stdout
    again = gdsllm(["pull", "test-org/Tiny-Llama"], env, tmp_path)  # already there: nothing downloaded
    assert again.returncode == 0 and "already pulled" in again.stdout


@pytest.mark.slow  # ~12 s: huggingface_hub retries the dead server 5 times, 1 s apart, before giving up
def test_interrupted_pull_leaves_nothing_and_resumes(tmp_path, hub, tiny_folder):
    files = tiny_repo_files(tiny_folder)
    hub.add_repo("test-org/Tiny-Llama", files)
    size = len(files["model.safetensors"])
    hub.crash_after[("test-org/Tiny-Llama", "model.safetensors")] = size * 3 // 4  # past pull's 1 MiB write chunk
    env = cli_env(tmp_path, HF_ENDPOINT=hub.endpoint)

    first = gdsllm(["pull", "test-org/Tiny-Llama"], env, tmp_path)
    assert_one_line_error(first, "lost the connection", "run the same pull again")
    assert "Tiny-Llama" not in gdsllm(["list"], env, tmp_path).stdout
    models = tmp_path / "models"
    assert not models.exists() or not any(models.iterdir())  # no model, no partial folder
    parts = list((tmp_path / "hf-cache").rglob("*.part"))
    assert len(parts) == 1 and 0 < parts[0].stat().st_size < size

    hub.restart()
    kept = parts[0].stat().st_size
    second = gdsllm(["pull", "test-org/Tiny-Llama"], env, tmp_path)
    assert second.returncode == 0, second.stderr
    assert ("GET", "/cdn/test-org/Tiny-Llama/model.safetensors", f"bytes={kept}-") in hub.requests
    convert_into(tiny_folder, tmp_path / "direct", "tiny")
    assert_same_model(tmp_path / "models", "Tiny-Llama", tmp_path / "direct", "tiny")


@pytest.mark.slow  # ~20 s: downloads and converts the 98 MB bundled model (plus a direct conversion without the fixture)
def test_pull_one_gguf_by_quant_matches_direct_conversion(tmp_path, hub, request):
    """Byte-identical to converting the GGUF directly, so it generates the same tokens; the token comparison itself
    runs on the tiny safetensors model above (the 135M model needs ~10 s per load on the shared CI cores)."""
    from gdsllm_core.bundled import default_gguf

    gguf = default_gguf().read_bytes()
    hub.add_repo("test-org/SmolLM2-135M-Instruct-GGUF", {
        "SmolLM2-135M-Instruct.Q4_1.gguf": gguf,
        "SmolLM2-135M-Instruct.Q8_0.gguf": b"GGUF-not-this-one" * 100,  # must not be fetched
        "README.md": b"# gguf\n"})
    env = cli_env(tmp_path, HF_ENDPOINT=hub.endpoint)
    result = gdsllm(["pull", "hf.co/test-org/SmolLM2-135M-Instruct-GGUF:q4_1"], env, tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "pulled SmolLM2-135M-Instruct:Q4_1" in result.stdout
    assert not any("Q8_0" in path or "README" in path for _, path, _ in hub.requests)

    try:  # the session's direct conversion of the same file, when the root conftest provides it
        direct = request.getfixturevalue("smollm2")
        direct_root, direct_name = direct.path.parent, direct.name
    except pytest.FixtureLookupError:
        convert_into(default_gguf(), tmp_path / "direct", "smollm2")
        direct_root, direct_name = tmp_path / "direct", "smollm2"
    assert_same_model(tmp_path / "models", "SmolLM2-135M-Instruct:Q4_1", direct_root, direct_name)


def test_bad_token_and_missing_repo_are_one_line_errors(tmp_path, hub, tiny_folder):
    hub.add_repo("test-org/Private", tiny_repo_files(tiny_folder))
    hub.private.add("test-org/Private")
    bad = gdsllm(["pull", "test-org/Private"], cli_env(tmp_path, HF_ENDPOINT=hub.endpoint, HF_TOKEN="hf_wrong"),
                 tmp_path)
    assert_one_line_error(bad, "rejected the Hugging Face token from HF_TOKEN", "401")
    missing = gdsllm(["pull", "test-org/Nope"], cli_env(tmp_path, HF_ENDPOINT=hub.endpoint), tmp_path)
    assert_one_line_error(missing, "repository test-org/Nope not found on", "HF_TOKEN")
    good = gdsllm(["pull", "test-org/Private"],
                  cli_env(tmp_path, HF_ENDPOINT=hub.endpoint, HUGGINGFACE_HUB_TOKEN=GOOD_TOKEN), tmp_path)
    assert good.returncode == 0, good.stderr
    assert hub.cdn_auth and not any(hub.cdn_auth)  # the token went to the hub only, never to the CDN host
    assert not list((tmp_path / "models").glob(".partial-*"))


def test_unsupported_architecture_fails_before_the_weights_download(tmp_path, hub):
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
    hub.add_repo("test-org/gpt2ish", {"config.json": json.dumps(config).encode(), "model.safetensors": b"\0" * 4096})
    result = gdsllm(["pull", "test-org/gpt2ish"], cli_env(tmp_path, HF_ENDPOINT=hub.endpoint), tmp_path)
    assert_one_line_error(result, "no installed plugin converts", "(architecture GPT2LMHeadModel)",
                          "architectures: llama")
    assert not any(path.endswith("model.safetensors") for _, path, _ in hub.requests)


def tiny_llama_gguf(path: Path, arch: str = "llama", split_max_tensors: int = 0) -> list[Path]:
    """A one-layer random llama GGUF (Q8_0 matrices, file type Q8_0) written by gguf-py, split into parts of at most
    `split_max_tensors` tensors if given; returns its files in order."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType
    from gguf.quants import quantize

    rng = np.random.default_rng(5)
    dim, ffn, vocab = 64, 128, 32
    writer = GGUFWriter(str(path), arch=arch, split_max_tensors=split_max_tensors)
    for key, value in (("block_count", 1), ("context_length", 64), ("embedding_length", dim),
                       ("feed_forward_length", ffn), ("head_count", 4), ("head_count_kv", 4)):
        getattr(writer, f"add_{key}")(value)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(LlamaFileType.MOSTLY_Q8_0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list([chr(ord("a") + i) for i in range(26)] + [f"<t{i}>" for i in range(vocab - 26)])
    writer.add_token_merges([])
    shapes = {"token_embd": (vocab, dim), "output": (vocab, dim), "blk.0.attn_q": (dim, dim),
              "blk.0.attn_k": (dim, dim), "blk.0.attn_v": (dim, dim), "blk.0.attn_output": (dim, dim),
              "blk.0.ffn_gate": (ffn, dim), "blk.0.ffn_up": (ffn, dim), "blk.0.ffn_down": (dim, ffn)}
    for name, shape in shapes.items():
        weights = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        writer.add_tensor(f"{name}.weight", quantize(weights, GGMLQuantizationType.Q8_0),
                          raw_dtype=GGMLQuantizationType.Q8_0)
    for norm in ("blk.0.attn_norm", "blk.0.ffn_norm", "output_norm"):
        writer.add_tensor(f"{norm}.weight", rng.uniform(0.5, 1.5, dim).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return sorted(path.parent.glob(f"{path.stem}*.gguf"))


def stored_tensors(root: Path, name: str) -> dict:
    from gdsllm_core.layout.store import ModelStore

    entry = ModelStore(root).get(name)
    return {t.name: (t.qtype, t.shape, t.crc32) for extent in entry.manifest.extents for t in extent.tensors}


def test_pull_split_gguf_fetches_and_converts_every_part(tmp_path, hub):
    (tmp_path / "one").mkdir()
    (tmp_path / "split").mkdir()
    single = tiny_llama_gguf(tmp_path / "one" / "Tiny-Q8_0.gguf")[0]
    parts = tiny_llama_gguf(tmp_path / "split" / "Tiny-Q8_0.gguf", split_max_tensors=5)
    assert len(parts) == 3
    hub.add_repo("test-org/Tiny-GGUF", {**{f"Q8_0/{p.name}": p.read_bytes() for p in parts},
                                        "Tiny-F16.gguf": b"GGUF-not-this-one" * 100})
    env = cli_env(tmp_path, HF_ENDPOINT=hub.endpoint)
    result = gdsllm(["pull", "test-org/Tiny-GGUF:Q8_0"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    fetched = {path for method, path, _ in hub.requests if method == "GET" and "/cdn/" in path}
    assert fetched == {f"/cdn/test-org/Tiny-GGUF/Q8_0/{p.name}" for p in parts}
    convert_into(single, tmp_path / "direct", "tiny")
    assert stored_tensors(tmp_path / "models", "Tiny:Q8_0") == stored_tensors(tmp_path / "direct", "tiny")
    listing = gdsllm(["list"], env, tmp_path)
    assert "Tiny:Q8_0" in listing.stdout and "Q8_0" in listing.stdout


def test_unsupported_gguf_architecture_fails_before_the_weights_download(tmp_path, hub):
    path = tiny_llama_gguf(tmp_path / "Phi-Q8_0.gguf", arch="phi3")[0]
    hub.add_repo("test-org/Phi-GGUF", {path.name: path.read_bytes()})
    result = gdsllm(["pull", "test-org/Phi-GGUF"], cli_env(tmp_path, HF_ENDPOINT=hub.endpoint), tmp_path)
    assert_one_line_error(result, "architecture 'phi3'", "plugins: ", "llama")
    gets = [(path, byte_range) for method, path, byte_range in hub.requests if method == "GET" and "/cdn/" in path]
    assert gets and all(byte_range and byte_range.startswith("bytes=0-") for _, byte_range in gets), gets
    assert not list((tmp_path / "hf-cache").rglob("blobs/*"))  # nothing downloaded but the header


def test_gguf_selection_rules():
    files = ["a/Model-Q4_K_M.gguf", "Model-Q8_0.gguf", "Model.IQ4_XS.gguf", "mmproj-Model-F16.gguf", "README.md"]
    assert pull_mod.select_gguf(files, "Q8_0", "u/r") == ["Model-Q8_0.gguf"]
    assert pull_mod.select_gguf(files, None, "u/r") == ["a/Model-Q4_K_M.gguf"]  # ollama's default pick
    assert pull_mod.select_gguf(["x.safetensors", "config.json"], None, "u/r") == []
    with pytest.raises(UnsupportedQuantError, match="IQ4_XS, Q4_K_M, Q8_0"):
        pull_mod.select_gguf(files, "Q5_K_S", "u/r")
    split = ["Q4_0/M-Q4_0-00002-of-00003.gguf", "Q4_0/M-Q4_0-00001-of-00003.gguf", "Q4_0/M-Q4_0-00003-of-00003.gguf"]
    assert pull_mod.select_gguf([*split, "M-Q8_0.gguf"], "Q4_0", "u/r") == sorted(split)  # every part, in order
    assert pull_mod.select_gguf(split, None, "u/r") == sorted(split)  # one model in three files
    with pytest.raises(DownloadError, match="lacks part Q4_0/M-Q4_0-00002-of-00003.gguf"):
        pull_mod.select_gguf([split[1], split[2]], "Q4_0", "u/r")
    with pytest.raises(UnsupportedQuantError, match="several GGUF models matching Q4_0"):
        pull_mod.select_gguf([*split, "Other-Q4_0.gguf"], "Q4_0", "u/r")
    with pytest.raises(UnsupportedQuantError, match="no GGUF files"):
        pull_mod.select_gguf(["config.json", "model.safetensors"], "Q4_0", "u/r")


def test_source_parsing(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert pull_mod.parse_source(str(gguf)).local_path == gguf
    assert pull_mod.parse_source("hf.co/user/Repo-GGUF:q4_k_m") == pull_mod.PullSource(repo_id="user/Repo-GGUF",
                                                                                        quant="Q4_K_M")
    assert pull_mod.default_model_name("user/Repo-GGUF", "Q4_K_M") == "Repo:Q4_K_M"
    assert pull_mod.parse_source("https://huggingface.co/meta-llama/Llama-2-7b-hf").repo_id == "meta-llama/Llama-2-7b-hf"
    for bad in ("./missing-folder", "missing.gguf", "not a repo", "a/b/c"):
        with pytest.raises(pull_mod.BadRequestError):
            pull_mod.parse_source(bad)
