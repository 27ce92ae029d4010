"""`gdsllm pull`: fetch a checkpoint from a Hugging Face hub (or take a local one) and convert it into the store.

Downloads are resumable byte by byte: each file is written to `<cache>/<repo>/blobs/<etag>.part` and continued with
an HTTP Range request on the next pull; complete files are checked against their SHA-256 ETag and kept (keyed by
ETag), then hard-linked under `snapshots/<commit>/<path>`. Only what the converter needs is fetched: config,
tokenizer and safetensors files, or one GGUF model picked by its quant name (`user/repo:Q4_K_M`, as ollama does):
one file, or every part of a split one (`-00001-of-0000N`). Before a GGUF's weights are fetched, its header is read
through HTTP range requests so that a model no installed plugin converts is refused first.
"""

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from gdsllm_core import __version__, pidfile, registry, settings
from gdsllm_core.convert import ConvertOptions, convert, unknown_gguf_error
from gdsllm_core.convert.gguf_file import IncompleteHeader, parse_header
from gdsllm_core.errors import (
    BadRequestError,
    DownloadError,
    GdsllmError,
    ModelNotFoundError,
    UnknownArchitectureError,
    UnsupportedQuantError,
)
from gdsllm_core.layout.store import ModelEntry, ModelStore, check_name
from gdsllm_core.layout.writer import TEMP_PREFIX

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
HUB_PREFIXES = ("https://huggingface.co/", "http://huggingface.co/", "huggingface.co/", "hf.co/")
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
              "vocab.json", "merges.txt")
SAFETENSORS_INDEX = "model.safetensors.index.json"
DEFAULT_GGUF_QUANT = "Q4_K_M"  # what ollama picks when a GGUF repo is pulled without a tag
SPLIT_GGUF = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
RESUME_CHUNK_BYTES = 1 << 20
HEADER_PROBE_BYTES = 1 << 20  # first range request for a GGUF header (doubled until the header fits)


class DownloadBar(Protocol):
    def update(self, n: int) -> None: ...

    def close(self) -> None: ...


class PullProgress(Protocol):
    """What the CLI draws: one bar per downloaded file, the conversion's progress, and short status lines."""

    def download_bar(self, filename: str, total: int | None, initial: int) -> DownloadBar: ...

    def convert(self, description: str, done: int, total: int) -> None: ...

    def message(self, text: str) -> None: ...


@dataclass(frozen=True)
class PullSource:
    """A parsed `pull` argument: a local file or folder, or a hub repo with an optional GGUF quant name."""

    local_path: Path | None = None
    repo_id: str | None = None
    quant: str | None = None


def parse_source(text: str) -> PullSource:
    """`./folder`, `model.gguf`, `user/repo`, `user/repo:Q4_K_M`, `hf.co/user/repo:Q4_K_M`."""
    path = Path(text).expanduser()
    if path.exists():
        return PullSource(local_path=path)
    spec = text
    for prefix in HUB_PREFIXES:
        if spec.startswith(prefix):
            spec = spec[len(prefix):]
            break
    repo_id, _, quant = spec.partition(":")
    repo_id = repo_id.rstrip("/")
    if not REPO_ID.match(repo_id) or "/" in quant:
        if text.startswith((".", "/", "~")) or text.endswith(".gguf"):
            raise BadRequestError(f"{text} does not exist", "give an existing GGUF file or checkpoint folder")
        raise BadRequestError(f"{text!r} is neither a local file or folder nor a Hugging Face repo id",
                              "use `user/repo`, `user/repo:Q4_K_M` for one GGUF file, or a path")
    return PullSource(repo_id=repo_id, quant=quant.upper() or None)


def default_model_name(repo_id: str, quant: str | None) -> str:
    """`user/Llama-3.2-1B-Instruct-GGUF:Q4_K_M` → `Llama-3.2-1B-Instruct:Q4_K_M`; `user/Repo` → `Repo`."""
    base = repo_id.split("/")[-1]
    if base.lower().endswith("-gguf") and len(base) > 5:
        base = base[:-5]
    return check_name(f"{base}:{quant}" if quant else base)


# ---- choosing files ------------------------------------------------------------------------------------------------

def _quant_tokens(filename: str) -> set[str]:
    """The upper-cased pieces of a GGUF path that may name its quant: `x/Model.Q4_K_M-00001-of-00002.gguf`."""
    stem = SPLIT_GGUF.sub("", filename)
    stem = re.sub(r"\.gguf$", "", stem, flags=re.IGNORECASE)
    return {token.upper() for token in re.split(r"[-./]", stem) if token}


def gguf_quants(gguf_files: list[str]) -> list[str]:
    """The quant names found in the GGUF file names of a repo (for messages)."""
    known = re.compile(r"^(I?Q\d\w*|F16|F32|BF16|MXFP4\w*|TQ\d_\d)$")
    return sorted({token for name in gguf_files for token in _quant_tokens(name) if known.match(token)})


def select_gguf(files: list[str], quant: str | None, repo_id: str) -> list[str]:
    """The GGUF file to fetch, or every part of a split one in order; [] when the repo has no GGUF (then
    safetensors are used)."""
    ggufs = [name for name in files if name.lower().endswith(".gguf") and "mmproj" not in name.lower()]
    if not ggufs:
        if quant:
            raise UnsupportedQuantError(f"{repo_id} has no GGUF files, so there is no {quant} file to pick",
                                        f"pull `{repo_id}` without `:{quant}`; add `--quant q8_0` to re-quantize")
        return []
    models = {SPLIT_GGUF.sub("", name): name for name in ggufs}  # one entry per model, split or not
    wanted = quant or (None if len(models) == 1 else DEFAULT_GGUF_QUANT)
    matches = [name for name in ggufs if wanted is None or wanted in _quant_tokens(name)]
    if not matches:
        available = ", ".join(gguf_quants(ggufs)) or ", ".join(ggufs)
        hint = f"pick one with `gdsllm pull {repo_id}:<QUANT>`"
        if quant:
            raise UnsupportedQuantError(f"{repo_id} has no GGUF file for {quant} (available: {available})", hint)
        raise UnsupportedQuantError(f"{repo_id} holds several GGUF files (available: {available})", hint)
    stems = sorted({SPLIT_GGUF.sub("", name) for name in matches})
    if len(stems) > 1:
        raise UnsupportedQuantError(f"{repo_id} has several GGUF models matching {wanted}: {', '.join(stems)}",
                                    "give the quant name exactly as it appears in one file name")
    split = SPLIT_GGUF.search(matches[0])
    if split is None:
        return matches
    count = int(split.group(2))
    parts = [f"{stems[0]}-{no:05d}-of-{count:05d}.gguf" for no in range(1, count + 1)]
    by_lower = {name.lower(): name for name in matches}
    missing = [part for part in parts if part.lower() not in by_lower]
    if missing:
        raise DownloadError(f"{repo_id} lacks part{'s' if len(missing) > 1 else ''} {', '.join(missing)} of its "
                            f"split {wanted or 'GGUF'} model", "the upload is incomplete: pick another quant or "
                            "report it to the repo's owner")
    return [by_lower[part.lower()] for part in parts]


def select_safetensors(files: list[str], index: dict | None, repo_id: str) -> list[str]:
    """config, tokenizer and weight files of an HF checkpoint (root level only; `original/` etc. are skipped)."""
    root_files = [name for name in files if "/" not in name]
    if "config.json" not in root_files:
        raise _not_a_checkpoint(repo_id, files)
    if index is not None:
        weights = sorted(set(index.get("weight_map", {}).values()))
        missing = [name for name in weights if name not in files]
        if missing:
            raise DownloadError(f"{repo_id}'s {SAFETENSORS_INDEX} names files the repo does not have: {missing[:3]}",
                                "the repo is incomplete: pull another revision or report it to the repo's owner")
    else:
        weights = sorted(name for name in root_files if name.endswith(".safetensors"))
    if not weights:
        raise _not_a_checkpoint(repo_id, files)
    return [name for name in SIDE_FILES if name in root_files] + weights


def _not_a_checkpoint(repo_id: str, files: list[str]) -> GdsllmError:
    shown = ", ".join(files[:8]) + ("…" if len(files) > 8 else "")
    return ModelNotFoundError(f"{repo_id} holds neither GGUF files nor config.json with *.safetensors (files: {shown})",
                              "pull a repo with a transformers checkpoint or GGUF files")


# ---- downloading ----------------------------------------------------------------------------------------------------

def hub_endpoint() -> str:
    """HF_ENDPOINT, read when asked (huggingface_hub reads it once at import)."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


class HubClient:
    """Resumable downloads from one hub endpoint into the gdsllm HF cache."""

    def __init__(self, endpoint: str | None = None, token: str | None = None, cache_dir: Path | None = None):
        self.endpoint = endpoint or hub_endpoint()
        self.token = token if token is not None else settings.hf_token()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else settings.hf_cache()

    def repo_dir(self, repo_id: str) -> Path:
        return self.cache_dir / ("models--" + repo_id.replace("/", "--"))

    def repo_files(self, repo_id: str, revision: str = "main") -> tuple[str, list[str]]:
        """(commit sha, file names) of a model repo at `revision`."""
        from huggingface_hub import HfApi

        with self._translate_errors(repo_id):
            info = HfApi(endpoint=self.endpoint, token=self._token_arg(), library_name="gdsllm",
                         library_version=__version__).model_info(repo_id, revision=revision)
        if not info.sha:
            raise DownloadError(f"{self.endpoint} returned no commit for {repo_id}@{revision}",
                                "check that HF_ENDPOINT points to a Hugging Face hub")
        return info.sha, [sibling.rfilename for sibling in (info.siblings or [])]

    def fetch(self, repo_id: str, commit: str, filename: str, progress: PullProgress | None = None) -> Path:
        """Download one file (resuming a partial one) and return its path under snapshots/<commit>/."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        repo_dir = self.repo_dir(repo_id)
        target = repo_dir / "snapshots" / commit / filename
        if target.is_file():
            return target
        url = hf_hub_url(repo_id, filename, revision=commit, endpoint=self.endpoint)
        with self._translate_errors(repo_id, filename):
            meta = get_hf_file_metadata(url, token=self._token_arg(), endpoint=self.endpoint,
                                        library_name="gdsllm", library_version=__version__)
            etag = re.sub(r"[^A-Za-z0-9._-]", "_", meta.etag or "")
            if not etag or meta.commit_hash is None:
                raise DownloadError(f"{url} answered without an ETag or X-Repo-Commit header",
                                    "HF_ENDPOINT must point to a Hugging Face hub (or a compatible mirror)")
            blob = repo_dir / "blobs" / etag
            if not (blob.is_file() and (meta.size is None or blob.stat().st_size == meta.size)):
                self._download(meta, blob, filename, progress)
        target.parent.mkdir(parents=True, exist_ok=True)
        _link(blob, target)
        return target

    def fetch_header(self, repo_id: str, commit: str, filename: str) -> Path:
        """A stand-in for a remote GGUF, for the converters' `detect`: its header, fetched with HTTP range requests,
        in a sparse file of the real size (zeros where the weights would be), under `probe/<commit>/`."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.utils import build_hf_headers, http_backoff

        url = hf_hub_url(repo_id, filename, revision=commit, endpoint=self.endpoint)
        probe = self.repo_dir(repo_id) / "probe" / commit / filename
        with self._translate_errors(repo_id, filename):
            meta = get_hf_file_metadata(url, token=self._token_arg(), endpoint=self.endpoint,
                                        library_name="gdsllm", library_version=__version__)
            headers = build_hf_headers(token=self._token_arg(), library_name="gdsllm", library_version=__version__)
            if urlparse(meta.location).netloc != urlparse(self.endpoint).netloc:
                headers.pop("authorization", None)
            wanted = HEADER_PROBE_BYTES
            while True:
                response = http_backoff("GET", meta.location, headers={**headers, "Range": f"bytes=0-{wanted - 1}"})
                response.raise_for_status()
                data = response.content[:wanted]
                try:
                    parse_header(data, filename)
                    break
                except IncompleteHeader as more:
                    if len(data) < wanted or (meta.size is not None and wanted >= meta.size):
                        raise DownloadError(f"{filename} in {repo_id} ends inside its GGUF header",
                                            "the upload is truncated: pick another quant") from None
                    wanted = max(more.needed, 2 * wanted)
        probe.parent.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(data)
            handle.truncate(max(meta.size or 0, len(data)))
        return probe

    def _download(self, meta, blob: Path, filename: str, progress: PullProgress | None) -> None:
        from huggingface_hub import constants as hub_constants
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers

        headers = build_hf_headers(token=self._token_arg(), library_name="gdsllm", library_version=__version__)
        if urlparse(meta.location).netloc != urlparse(self.endpoint).netloc:
            headers.pop("authorization", None)  # a signed CDN url: never send the hub token elsewhere
        part = blob.with_name(blob.name + ".part")
        part.parent.mkdir(parents=True, exist_ok=True)
        # http_get hands the file what it received in chunks of this size: smaller chunks mean an interrupted
        # download keeps all but the last MiB of what arrived (the default, 10 MiB, would lose up to that)
        hub_constants.DOWNLOAD_CHUNK_SIZE = min(hub_constants.DOWNLOAD_CHUNK_SIZE, RESUME_CHUNK_BYTES)
        bar_factory = _bar_factory(progress, filename)
        with open(part, "ab") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the file is closed
            except BlockingIOError:
                raise DownloadError(f"another gdsllm pull is downloading {filename} into {part.parent}",
                                    "wait for it to finish, then pull again") from None
            resume = os.fstat(handle.fileno()).st_size
            if meta.size is not None and resume > meta.size:
                handle.truncate(0)
                resume = 0
            try:
                http_get(meta.location, handle, resume_size=resume, headers=headers, expected_size=meta.size,
                         displayed_filename=filename, tqdm_class=bar_factory)
            finally:
                bar_factory.close()
            handle.flush()
            expected_sha = meta.etag if meta.etag and SHA256_HEX.match(meta.etag) else None
            if expected_sha and _sha256(part) != expected_sha:
                part.unlink()
                raise DownloadError(f"{filename} does not match its SHA-256 ({expected_sha[:12]}…) after download",
                                    "run the pull again to download it afresh")
            os.replace(part, blob)

    def _token_arg(self) -> str | None:
        # None lets huggingface_hub fall back to the token stored by `hf auth login`
        return self.token or None

    def token_source(self) -> str | None:
        """Where the token that is sent comes from (for error messages), or None when none is sent."""
        if self.token:
            return "HF_TOKEN" if os.environ.get("HF_TOKEN") else "HUGGINGFACE_HUB_TOKEN"
        from huggingface_hub import get_token

        return "the token stored by `hf auth login`" if get_token() else None

    def _translate_errors(self, repo_id: str, filename: str | None = None):
        return _HubErrors(self, repo_id, filename)


class _HubErrors:
    """Turns huggingface_hub / network / disk errors into one-line GdsllmErrors."""

    def __init__(self, client: HubClient, repo_id: str, filename: str | None):
        self.client, self.repo_id, self.filename = client, repo_id, filename

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or isinstance(exc, GdsllmError) or not isinstance(exc, Exception):
            return False
        raise self.translate(exc) from exc

    def translate(self, exc: Exception) -> GdsllmError:
        import httpx2
        from huggingface_hub import errors as hub_errors

        endpoint, repo = self.client.endpoint, self.repo_id
        what = f"{repo}/{self.filename}" if self.filename else repo
        token_source = self.client.token_source()
        resume_hint = "run the same pull again: it continues where it stopped"
        response = getattr(exc, "response", None)
        status = getattr(response, "status_code", None)
        if isinstance(exc, hub_errors.GatedRepoError):
            return DownloadError(f"{repo} is gated on {endpoint}: {'the token has' if token_source else 'you have'} "
                                 "no access to it", "accept its licence on the model page, then set HF_TOKEN to a "
                                 "token that may read it")
        if status == 401 and token_source:
            return DownloadError(f"{endpoint} rejected the Hugging Face token from {token_source} (401 Unauthorized)",
                                 "check the token (or unset it for public repos)")
        if isinstance(exc, hub_errors.RepositoryNotFoundError):
            hint = "check the repo id" + ("" if token_source else "; for a private repo set HF_TOKEN")
            return ModelNotFoundError(f"repository {repo} not found on {endpoint}", hint)
        if isinstance(exc, hub_errors.RevisionNotFoundError):
            return ModelNotFoundError(f"revision not found in {repo} on {endpoint}", "check the repo's branches")
        if isinstance(exc, hub_errors.RemoteEntryNotFoundError):
            return DownloadError(f"{what} is listed but cannot be downloaded from {endpoint} (404)", resume_hint)
        if isinstance(exc, hub_errors.HfHubHTTPError):
            return DownloadError(f"{endpoint} answered {status or 'an error'} for {what}", resume_hint)
        if isinstance(exc, hub_errors.OfflineModeIsEnabled):
            return DownloadError(f"cannot download {what}: HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE")
        if isinstance(exc, (httpx2.TransportError, ConnectionError, TimeoutError)):
            return DownloadError(f"lost the connection to {endpoint} while fetching {what}: {_first_line(exc)}",
                                 resume_hint)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return DownloadError(f"no space left in {self.client.cache_dir} while downloading {what}",
                                 "free disk space or set GDSLLM_HF_CACHE to a larger disk")
        if isinstance(exc, OSError):
            return DownloadError(f"downloading {what} failed: {_first_line(exc)}", resume_hint)
        return DownloadError(f"downloading {what} failed: {type(exc).__name__}: {_first_line(exc)}", resume_hint)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _bar_factory:  # noqa: N801 (passed to huggingface_hub as its `tqdm_class`)
    """Called by huggingface_hub's http_get like a tqdm class; draws through the PullProgress instead."""

    def __init__(self, progress: PullProgress | None, filename: str):
        self.progress, self.filename, self.bar = progress, filename, None

    def __call__(self, total: int | None = None, initial: int = 0, **_ignored) -> "_bar_factory":
        if self.progress is not None and self.bar is None:
            self.bar = self.progress.download_bar(self.filename, total, initial)
        return self

    def __enter__(self) -> "_bar_factory":
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _link(blob: Path, target: Path) -> None:
    """Hard-link the blob under its file name (a symlink where the filesystem has no hard links)."""
    temp = target.with_name(f".{target.name}.{os.getpid()}.link")
    temp.unlink(missing_ok=True)
    try:
        os.link(blob, temp)
    except OSError:
        temp.symlink_to(os.path.relpath(blob, target.parent))
    os.replace(temp, target)


# ---- pull -------------------------------------------------------------------------------------------------------------

def remove_stale_partials(store: ModelStore) -> None:
    """Delete `.partial-<name>-<pid>` folders of conversions whose process died (SIGKILL, power loss)."""
    if not store.root.is_dir():
        return
    for folder in store.root.glob(f"{TEMP_PREFIX}*"):
        pid_text = folder.name.rsplit("-", 1)[-1]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not pidfile.pid_alive(int(pid_text)):
            shutil.rmtree(folder, ignore_errors=True)


def pull(source: str, store: ModelStore | None = None, name: str | None = None, quantize: str | None = None,
         group_size: int | None = None, force: bool = False, progress: PullProgress | None = None, client: HubClient | None = None) -> ModelEntry:
    """Fetch (if remote) and convert `source` into the store; returns the new entry. Nothing appears in the store
    until the conversion is complete."""
    store = store or ModelStore()
    parsed = parse_source(source)
    if name is not None:
        check_name(name)
    remove_stale_partials(store)
    options = ConvertOptions(quant=quantize, group_size=group_size, progress=progress.convert if progress else None)
    if parsed.local_path is not None:
        converter = registry.get_converter(registry.detect_converter(parsed.local_path))
        name = name or converter.default_name(parsed.local_path)
        if store.exists(name) and not force:
            raise AlreadyPulled(name)
        return convert(parsed.local_path, store, name=name, options=options, overwrite=force)

    repo_id = parsed.repo_id
    client = client or HubClient()
    commit, files = client.repo_files(repo_id)
    has_checkpoint = "config.json" in files and any("/" not in f and f.endswith(".safetensors") for f in files)
    gguf_parts = select_gguf(files, parsed.quant, repo_id) if parsed.quant or not has_checkpoint else []
    name = name or default_model_name(repo_id, parsed.quant)
    if store.exists(name) and not force:
        raise AlreadyPulled(name)
    if progress:
        progress.message(f"pulling {repo_id} ({commit[:12]}) → {name}")
    if gguf_parts:
        _check_gguf_converter(client, repo_id, commit, gguf_parts[0])  # before any weights are downloaded
        checkpoint = [client.fetch(repo_id, commit, part, progress) for part in gguf_parts][0]
    else:
        index = None
        if SAFETENSORS_INDEX in files:
            index_path = client.fetch(repo_id, commit, SAFETENSORS_INDEX, progress)
            try:
                index = json.loads(index_path.read_text())
            except ValueError as exc:
                raise DownloadError(f"{repo_id}'s {SAFETENSORS_INDEX} is not valid JSON: {exc}") from exc
        wanted = select_safetensors(files, index, repo_id) + ([SAFETENSORS_INDEX] if index is not None else [])
        snapshot, staged = client.repo_dir(repo_id) / "snapshots" / commit, client.repo_dir(repo_id) / "staged" / commit
        small = [filename for filename in wanted if not filename.endswith(".safetensors")]
        for filename in small:
            client.fetch(repo_id, commit, filename, progress)
        registry.detect_converter(_stage(staged, snapshot, small))  # an unsupported model fails before the big files
        for filename in wanted:
            client.fetch(repo_id, commit, filename, progress)
        checkpoint = _stage(staged, snapshot, wanted)
    return convert(checkpoint, store, name=name, options=options, overwrite=force)


def _check_gguf_converter(client: HubClient, repo_id: str, commit: str, filename: str) -> None:
    """Refuse a remote GGUF that no installed plugin converts, from its header alone."""
    probe = client.fetch_header(repo_id, commit, filename)
    try:
        registry.detect_converter(probe)
    except UnknownArchitectureError as exc:
        raise unknown_gguf_error(probe, f"{repo_id}/{filename}") from exc
    finally:
        shutil.rmtree(probe.parents[len(Path(filename).parts) - 1], ignore_errors=True)


def _stage(folder: Path, snapshot: Path, files: list[str]) -> Path:
    """A folder holding exactly the selected files (links), so the converter sees nothing else of the repo."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for filename in files:
        (folder / filename).parent.mkdir(parents=True, exist_ok=True)
        _link(snapshot / filename, folder / filename)
    return folder


class AlreadyPulled(GdsllmError):
    """Not a failure: the CLI reports it and exits 0."""

    def __init__(self, name: str):
        super().__init__(f"{name} is already in the store", "pass --force to download and convert it again")
        self.name = name

