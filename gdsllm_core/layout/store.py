"""ModelStore: the folder of converted models under GDSLLM_MODEL_ROOT."""

import re
import shutil
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import msgspec

from gdsllm_core import settings
from gdsllm_core.errors import BadRequestError, CorruptModelError, GdsllmError, ModelNotFoundError
from gdsllm_core.layout import manifest as manifest_mod
from gdsllm_core.layout.manifest import Manifest
from gdsllm_core.layout.qtypes import tensor_nbytes
from gdsllm_core.layout.writer import TEMP_PREFIX, recover_replaced

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,199}$")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path
    manifest: Manifest

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())

    @property
    def modified(self) -> float:
        return (self.path / manifest_mod.MANIFEST_NAME).stat().st_mtime


@dataclass(frozen=True)
class DamagedModel:
    """A model folder whose manifest or weight files cannot be used; `problem` says why (for `gdsllm list`)."""

    name: str
    path: Path
    problem: str


def is_valid_name(name: str) -> bool:
    """A model name is one path component of safe characters: no '/', no '..', not absolute."""
    return bool(NAME_PATTERN.match(name)) and ".." not in name


def safe_name(text: str, fallback: str = "model") -> str:
    """`text` (a file or folder name) made into a valid model name: lower case, other characters as '-'."""
    name = re.sub(r"[^a-z0-9._:+-]", "-", text.lower()).lstrip("._:+-")
    return name if is_valid_name(name) else fallback


def check_name(name: str) -> str:
    """`name` if it is a valid model name (see `is_valid_name`), else BadRequestError."""
    if not is_valid_name(name):
        raise BadRequestError(f"invalid model name {name!r}",
                              "use letters, digits and . _ : + - (no slashes, no '..')")
    return name


class ModelStore:
    """The models under `root`. A model's manifest is decoded once and kept, until the file's mtime or size
    changes (another process may re-pull or delete it)."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else settings.model_root()
        if self.root.is_dir():
            recover_replaced(self.root)  # a `pull --force` that crashed between its two renames
        self._manifests: dict[Path, tuple[tuple[int, int], Manifest]] = {}  # folder -> ((mtime_ns, size), manifest)
        self._lock = threading.Lock()

    def path(self, name: str) -> Path:
        return self.root / check_name(name)

    def exists(self, name: str) -> bool:
        return (self.path(name) / manifest_mod.MANIFEST_NAME).is_file()

    def scan(self) -> list[ModelEntry | DamagedModel]:
        """Every model folder, by name: usable ones as ModelEntry, the others as DamagedModel saying why."""
        if not self.root.is_dir():
            return []
        entries: list[ModelEntry | DamagedModel] = []
        for folder in sorted(self.root.iterdir()):
            if folder.name.startswith(TEMP_PREFIX) or not folder.is_dir() or not is_valid_name(folder.name):
                continue
            if not (folder / manifest_mod.MANIFEST_NAME).is_file():
                entries.append(DamagedModel(folder.name, folder, f"no {manifest_mod.MANIFEST_NAME}"))
                continue
            try:
                entry = ModelEntry(folder.name, folder, self._read_manifest(folder))
                check_sizes(entry)
            except CorruptModelError as exc:
                entries.append(DamagedModel(folder.name, folder, exc.message))
            except OSError as exc:
                entries.append(DamagedModel(folder.name, folder, f"unreadable: {exc.strerror or exc}"))
            else:
                entries.append(entry)
        return entries

    def list(self) -> list[ModelEntry]:
        """The usable models (`scan` also gives the damaged ones)."""
        return [entry for entry in self.scan() if isinstance(entry, ModelEntry)]

    def get(self, name: str) -> ModelEntry:
        folder = self.path(name)
        if not (folder / manifest_mod.MANIFEST_NAME).is_file():
            raise ModelNotFoundError(f"model {name!r} not found",  # no store path or other names: servers show it
                                     "pull it first with `gdsllm pull`, or see `gdsllm list`")
        entry = ModelEntry(name, folder, self._read_manifest(folder))
        check_sizes(entry)
        return entry

    def remove(self, name: str) -> None:
        folder = self.path(name)
        if not folder.is_dir():
            raise ModelNotFoundError(f"model {name!r} not found", "see `gdsllm list`")
        if folder.resolve().parent != self.root.resolve():
            raise BadRequestError(f"refusing to delete {folder}: it is not directly inside {self.root}")
        shutil.rmtree(folder)

    def _read_manifest(self, folder: Path) -> Manifest:
        """The folder's manifest, decoded and validated once per version of the file."""
        path = folder / manifest_mod.MANIFEST_NAME
        try:
            stat = path.stat()
        except OSError as exc:
            raise CorruptModelError(f"cannot read {path}: {exc.strerror or exc}",
                                    "check the folder's permissions, or re-convert it with `gdsllm pull`") from exc
        version = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            cached = self._manifests.get(folder)
        if cached is not None and cached[0] == version:
            return cached[1]
        manifest = decode_manifest(path)
        validate_manifest(manifest, folder)
        with self._lock:
            self._manifests[folder] = (version, manifest)
        return manifest


def decode_manifest(path: Path) -> Manifest:
    """The manifest at `path`, or CorruptModelError naming the field that is wrong."""
    try:
        manifest = manifest_mod.decode(path.read_bytes())
    except msgspec.ValidationError as exc:
        raise CorruptModelError(f"{path} is invalid: {exc}", "re-convert the model with `gdsllm pull`") from None
    except (msgspec.DecodeError, OSError, RecursionError) as exc:
        raise CorruptModelError(f"cannot read {path}: {exc}", "re-convert the model with `gdsllm pull`") from None
    if manifest.format_version > manifest_mod.FORMAT_VERSION:
        raise CorruptModelError(f"{path} has format version {manifest.format_version}, newer than this gdsllm",
                                "upgrade gdsllm-core")
    return manifest


def confined(folder: Path, relative: str, field: str) -> Path:
    """`folder / relative`, refused unless it stays inside `folder` (no absolute path, no '..', no symlink out)."""
    parts = PurePosixPath(relative).parts
    inside = folder.resolve()
    path = folder / relative
    if not parts or PurePosixPath(relative).is_absolute() or ".." in parts or "\\" in relative or \
            not path.resolve().is_relative_to(inside):
        raise CorruptModelError(f"manifest field {field} = {relative!r} points outside the model folder {folder}",
                                "the manifest was tampered with: re-convert the model with `gdsllm pull`")
    return path


def validate_manifest(manifest: Manifest, folder: Path) -> None:
    """Every path inside `folder`; every extent inside its file, every tensor inside its extent and as long as its
    shape and type make it. CorruptModelError names the first field that is wrong."""
    def corrupt(field: str, problem: str) -> CorruptModelError:
        return CorruptModelError(f"{folder / manifest_mod.MANIFEST_NAME}: {field} {problem}",
                                 "the manifest is damaged: re-convert the model with `gdsllm pull`")

    for file_name in manifest.files:
        confined(folder, file_name, f"files[{file_name!r}]")
    if manifest.tokenizer.file:
        confined(folder, manifest.tokenizer.file, "tokenizer.file")
    for index, extent in enumerate(manifest.extents):
        where = f"extents[{index}] ({extent.name})"
        confined(folder, extent.file, f"{where}.file")
        if extent.file not in manifest.files:
            raise corrupt(f"{where}.file", f"= {extent.file!r} is not listed in `files`")
        if extent.offset + extent.nbytes > manifest.files[extent.file]:
            raise corrupt(where, f"(bytes {extent.offset}..{extent.offset + extent.nbytes}) lies past the end of "
                                 f"{extent.file} ({manifest.files[extent.file]} bytes)")
        for position, tensor in enumerate(extent.tensors):
            tensor_where = f"{where}.tensors[{position}] ({tensor.name})"
            if tensor.offset + tensor.nbytes > extent.nbytes:
                raise corrupt(tensor_where, f"(bytes {tensor.offset}..{tensor.offset + tensor.nbytes}) lies past the "
                                            f"end of its extent ({extent.nbytes} bytes)")
            try:
                expected = tensor_nbytes(tensor.qtype, tensor.shape)
            except GdsllmError:
                continue  # a type of a plugin's own: its loader checks it
            if expected != tensor.nbytes:
                raise corrupt(f"{tensor_where}.nbytes", f"= {tensor.nbytes}, but a {tensor.qtype} tensor of shape "
                                                         f"{tensor.shape} takes {expected}")


def check_sizes(entry: ModelEntry) -> None:
    """Every weight file exists and is as long as the manifest says; else name the file and first missing tensor."""
    for file_name, expected in entry.manifest.files.items():
        path = entry.path / file_name
        actual = path.stat().st_size if path.is_file() else -1
        if actual == expected:
            continue
        if actual < 0:
            raise CorruptModelError(f"weight file {path} is missing", "re-convert the model with `gdsllm pull`")
        first_bad = next((f"{t.name} (bytes {e.offset + t.offset}..{e.offset + t.offset + t.nbytes})"
                          for e in entry.manifest.extents if e.file == file_name
                          for t in e.tensors if e.offset + t.offset + t.nbytes > actual), None)
        raise CorruptModelError(
            f"weight file {path} is {actual} bytes, the manifest says {expected}"
            + (f"; tensor {first_bad} lies past its end" if first_bad else ""),
            "the file is truncated or was modified: re-convert the model with `gdsllm pull`")


def verify(entry: ModelEntry, progress=None) -> int:
    """Check every tensor's CRC32; returns the number of bytes checked. `progress(n_bytes)` is called per tensor."""
    check_sizes(entry)
    checked = 0
    handles = {}
    try:
        for extent in entry.manifest.extents:
            handle = handles.get(extent.file) or handles.setdefault(extent.file, open(entry.path / extent.file, "rb"))
            for tensor in extent.tensors:
                handle.seek(extent.offset + tensor.offset)
                data = handle.read(tensor.nbytes)
                if zlib.crc32(data) != tensor.crc32:
                    raise CorruptModelError(
                        f"tensor {tensor.name} in {entry.path / extent.file} (offset {extent.offset + tensor.offset}) "
                        "does not match its checksum", "the file is corrupt: re-convert the model with `gdsllm pull`")
                checked += tensor.nbytes
                if progress:
                    progress(tensor.nbytes)
    finally:
        for handle in handles.values():
            handle.close()
    return checked
