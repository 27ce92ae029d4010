"""The ollama routes that manage models rather than generate: /api/pull (streamed progress, onto `gdsllm pull`),
/api/copy, /api/create (from a stored model, a GGUF file or checkpoint folder on the server, or uploaded blobs,
with a system prompt and parameters), /api/blobs/{digest}, and `GET /` / `HEAD /` ("Ollama is running")."""

import hashlib
import os
import queue
import re
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import msgspec
from litestar import Controller, Request, Response, get, head, post
from litestar.exceptions import NotFoundException
from litestar.params import JSONBody
from litestar.response import Stream

from gdsllm_core import pull as pull_mod
from gdsllm_core.convert import ConvertOptions, convert
from gdsllm_core.errors import BadRequestError, GdsllmError, ModelNotFoundError
from gdsllm_core.layout.defaults import ModelDefaults, copy_model, read_defaults, write_defaults
from gdsllm_core.layout.store import ModelStore, check_name, is_valid_name
from gdsllm_core.server import urls
from gdsllm_core.server.deps import EngineDep, StoreDep
from gdsllm_core.server.errors import OLLAMA_ERRORS, InvalidFieldError, error_body
from gdsllm_core.server.guards import PUBLIC
from gdsllm_core.server.schemas import (
    OllamaCopyRequest,
    OllamaCreateRequest,
    OllamaOptions,
    OllamaProgress,
    OllamaPullRequest,
)
from gdsllm_core.server.streams import find_model, resolve_model

NDJSON = "application/x-ndjson"
RUNNING_TEXT = "Ollama is running"  # what ollama's `GET /` answers (clients probe for it)
BLOBS_FOLDER = ".blobs"  # uploaded files of /api/blobs, inside the model root (not a model: no manifest)
BLOB_DIGEST = re.compile(r"^sha256[:-]([0-9a-f]{64})$")
PROGRESS_INTERVAL_S = 0.1  # at most this often a progress line per file (plus its first and last)
OPTION_NAMES = set(OllamaOptions.__struct_fields__)


class ProgressLines:
    """A PullProgress (and conversion callback) that turns progress into ollama's progress objects on a queue."""

    def __init__(self):
        self.lines: queue.SimpleQueue = queue.SimpleQueue()
        self._last_sent: dict[str, float] = {}

    def put(self, progress: OllamaProgress | Exception | None) -> None:
        self.lines.put(progress)

    def _throttled(self, key: str, final: bool) -> bool:
        now = time.monotonic()
        if not final and now - self._last_sent.get(key, 0.0) < PROGRESS_INTERVAL_S:
            return True
        self._last_sent[key] = now
        return False

    def download_bar(self, filename: str, total: int | None, initial: int) -> "_FileBar":
        return _FileBar(self, filename, total, initial)

    def convert(self, description: str, done: int, total: int) -> None:
        if not self._throttled("convert", done >= total):
            self.put(OllamaProgress(status=f"converting {description}".strip(), total=total, completed=done))

    def message(self, text: str) -> None:
        self.put(OllamaProgress(status=text))


class _FileBar:
    """One downloaded file: `pulling <file>` lines with a digest naming the file, total and completed bytes."""

    def __init__(self, lines: ProgressLines, filename: str, total: int | None, initial: int):
        self.lines, self.filename, self.total, self.completed = lines, filename, total, initial
        self.digest = "sha256:" + hashlib.sha256(filename.encode()).hexdigest()
        self._send(final=False)

    def _send(self, final: bool) -> None:
        if not self.lines._throttled(self.digest, final):
            self.lines.put(OllamaProgress(status=f"pulling {self.filename}", digest=self.digest, total=self.total,
                                          completed=self.completed))

    def update(self, n: int) -> None:
        self.completed += n
        self._send(final=self.total is not None and self.completed >= self.total)

    def close(self) -> None:
        self._send(final=True)


async def progress_stream(work: Callable[[ProgressLines], None], path: str) -> AsyncIterator[bytes]:
    """Run `work` on a thread; yield its progress lines, then `{"status": "success"}` or ollama's error line."""
    lines = ProgressLines()

    def run() -> None:
        try:
            work(lines)
            lines.put(OllamaProgress(status="success"))
        except Exception as exc:
            lines.put(exc)
        finally:
            lines.put(None)

    threading.Thread(target=run, name="gdsllm-model-job", daemon=True).start()
    while True:
        item = await anyio.to_thread.run_sync(lines.lines.get)
        if item is None:
            return
        if isinstance(item, Exception):
            status = item.http_status if isinstance(item, GdsllmError) else 500
            yield error_body(path, status, str(item)) + b"\n"
            continue
        yield msgspec.json.encode(item) + b"\n"


async def run_job(work: Callable[[ProgressLines], None], stream: bool, path: str) -> Response:
    """Progress as NDJSON with `stream`, else the work done first and one `{"status": "success"}` object."""
    if stream:
        return Stream(progress_stream(work, path), media_type=NDJSON)
    await anyio.to_thread.run_sync(work, ProgressLines())
    return Response(OllamaProgress(status="success"))


def check_parameters(parameters: dict | None) -> dict:
    """/api/create's parameters: ollama's option names with values of the right type and range."""
    parameters = parameters or {}
    unknown = sorted(set(parameters) - OPTION_NAMES)
    if unknown:
        raise InvalidFieldError(f"parameters.{unknown[0]}", f"parameter {unknown[0]!r} is not one gdsllm honours",
                                f"use {', '.join(sorted(OPTION_NAMES))}")
    try:
        msgspec.convert(parameters, OllamaOptions)
    except msgspec.ValidationError as exc:
        raise InvalidFieldError("parameters", f"invalid parameters: {exc}") from None
    return dict(parameters)


def blob_path(store: ModelStore, digest: str) -> Path:
    match = BLOB_DIGEST.match(digest)
    if not match:
        raise InvalidFieldError("digest", f"{digest!r} is not a blob digest", "write it as sha256:<64 hex digits>")
    return store.root / BLOBS_FOLDER / f"sha256-{match.group(1)}"


def create_model(store: ModelStore, data: OllamaCreateRequest, lines: ProgressLines) -> None:
    """/api/create's work: convert or copy the source into the store as `data.model`, then write its defaults."""
    name = check_name(data.model or data.name)
    parameters = check_parameters(data.parameters)
    license_text = "\n".join(data.license) if isinstance(data.license, list) else data.license
    base = ModelDefaults()
    options = ConvertOptions(quant=data.quantize, progress=lines.convert)
    if data.files:
        folder = stage_blobs(store, data.files)
        ggufs = [path for path in folder.iterdir() if path.suffix.lower() == ".gguf"]
        lines.message("converting model")
        convert(ggufs[0] if len(ggufs) == 1 and len(data.files) == 1 else folder, store, name=name, options=options,
                overwrite=True)
        shutil.rmtree(folder, ignore_errors=True)
    elif data.from_:
        source = resolve_model(store, data.from_, None)
        if is_valid_name(source) and store.exists(source):
            if data.quantize:
                raise InvalidFieldError("quantize", f"{source} is already converted: it cannot be quantized again",
                                        "create from the original GGUF file or checkpoint with `quantize`")
            base = read_defaults(store.get(source))
            lines.message(f"using existing model {source}")
            if source != name:
                copy_model(store, source, name, base)
        elif Path(data.from_).expanduser().exists():
            lines.message("converting model")
            convert(Path(data.from_).expanduser(), store, name=name, options=options, overwrite=True)
        else:
            raise ModelNotFoundError(f"`from` {data.from_!r} is neither a model in the store nor a file or folder on "
                                     "the server", "see /api/tags, or give the path of a GGUF file or checkpoint")
    else:
        raise InvalidFieldError("from", "the request gives no `from` model and no `files`",
                                "send {\"from\": \"<model or path>\"} or upload a GGUF as a blob and name it in files")
    defaults = ModelDefaults(system=data.system if data.system is not None else base.system,
                             parameters={**base.parameters, **parameters},
                             license=license_text if license_text is not None else base.license)
    lines.message("writing manifest")
    write_defaults(store.get(name), defaults)


def stage_blobs(store: ModelStore, files: dict[str, str]) -> Path:
    """A folder holding the uploaded blobs under their file names (hard links)."""
    folder = store.root / BLOBS_FOLDER / f"staged-{os.getpid()}-{threading.get_ident()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for filename, digest in files.items():
        if "/" in filename or filename.startswith(".") or not filename:
            raise InvalidFieldError("files", f"file name {filename!r} must be a plain file name")
        blob = blob_path(store, digest)
        if not blob.is_file():
            raise InvalidFieldError("files", f"blob {digest} of {filename} was not uploaded",
                                    "POST the file to /api/blobs/<digest> first")
        try:
            os.link(blob, folder / filename)
        except OSError:
            shutil.copy2(blob, folder / filename)
    return folder


class OllamaModelsController(Controller):
    tags = ["ollama"]

    @get(urls.ROOT, opt=PUBLIC, media_type="text/plain", sync_to_thread=False)
    def root(self) -> str:
        """What ollama answers: clients probe it to see that a server is there."""
        return RUNNING_TEXT

    @head(urls.ROOT, opt=PUBLIC, sync_to_thread=False)
    def root_head(self) -> None:
        """ollama's `HEAD /` probe."""

    @post(urls.OLLAMA_PULL, status_code=200, responses=OLLAMA_ERRORS)
    async def pull(self, data: JSONBody[OllamaPullRequest], request: Request, store: StoreDep) -> Response:
        """Fetch and convert a model as `gdsllm pull` does (a hub repo id, optionally `:QUANT`)."""
        source = data.model or data.name
        if not source:
            raise InvalidFieldError("model", "the request names no model", "send {\"model\": \"user/repo:QUANT\"}")
        if data.insecure:
            raise InvalidFieldError("insecure", "insecure pulls are not supported: the hub is reached over HTTPS "
                                    "(HF_ENDPOINT)", "leave `insecure` out")
        pull_mod.parse_source(source)  # a malformed name is a 400 before the stream starts

        def work(lines: ProgressLines) -> None:
            lines.message("pulling manifest")
            try:
                pull_mod.pull(source, store, progress=lines)
            except pull_mod.AlreadyPulled:
                pass

        return await run_job(work, data.stream, request.url.path)

    @post(urls.OLLAMA_COPY, status_code=200, sync_to_thread=True, responses=OLLAMA_ERRORS)
    def copy(self, data: JSONBody[OllamaCopyRequest], store: StoreDep) -> None:
        """A second name for a model (its files hard-linked, its defaults copied)."""
        source = find_model(store, resolve_model(store, data.source, None)).name
        copy_model(store, source, data.destination)

    @post(urls.OLLAMA_CREATE, status_code=200, responses=OLLAMA_ERRORS)
    async def create(self, data: JSONBody[OllamaCreateRequest], request: Request, store: StoreDep,
                     engine: EngineDep) -> Response:
        """A model from a stored model, a GGUF file or checkpoint folder on the server, or uploaded blobs, with
        a system prompt, parameters and a license that later requests use."""
        for field_name in ("template", "adapters", "messages"):
            if getattr(data, field_name):
                raise InvalidFieldError(field_name, f"`{field_name}` is not supported by gdsllm's /api/create",
                                        f"leave `{field_name}` out")
        if data.modelfile:
            raise InvalidFieldError("modelfile", "the Modelfile form of /api/create is not supported",
                                    "send from/files/system/parameters, as ollama clients since 0.5 do")
        name = check_name(data.model or data.name) if (data.model or data.name) else ""
        if not name:
            raise InvalidFieldError("model", "the request names no model", "send {\"model\": \"<new name>\"}")
        check_parameters(data.parameters)
        if any(running.name == name for running in engine.running()):
            await anyio.to_thread.run_sync(engine.unload, name)  # its files are about to be replaced
        return await run_job(lambda lines: create_model(store, data, lines), data.stream, request.url.path)

    @head(urls.OLLAMA_BLOB, sync_to_thread=True, responses=OLLAMA_ERRORS)
    def blob_exists(self, digest: str, store: StoreDep) -> None:
        """200 when the blob was uploaded, else 404."""
        if not blob_path(store, digest).is_file():
            raise NotFoundException(f"blob {digest} not found")

    @post(urls.OLLAMA_BLOB, status_code=201, responses=OLLAMA_ERRORS)
    async def blob_upload(self, digest: str, request: Request, store: StoreDep) -> None:
        """Store an uploaded file under its SHA-256 (checked)."""
        target = blob_path(store, digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.{threading.get_ident()}.part")
        hasher = hashlib.sha256()
        try:
            with open(partial, "wb") as handle:
                async for chunk in request.stream():
                    hasher.update(chunk)
                    await anyio.to_thread.run_sync(handle.write, chunk)
            if "sha256:" + hasher.hexdigest() != digest.replace("sha256-", "sha256:"):
                raise BadRequestError(f"the uploaded data's SHA-256 is {hasher.hexdigest()}, not {digest}",
                                      "upload the file that digest names")
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
