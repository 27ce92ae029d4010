"""ModelStore: the folder of converted models under GDSLLM_MODEL_ROOT."""

import re
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

from gdsllm_core import settings
from gdsllm_core.errors import BadRequestError, CorruptModelError, ModelNotFoundError
from gdsllm_core.layout import manifest as manifest_mod
from gdsllm_core.layout.manifest import Manifest
from gdsllm_core.layout.writer import TEMP_PREFIX

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
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else settings.model_root()

    def path(self, name: str) -> Path:
        return self.root / check_name(name)

    def exists(self, name: str) -> bool:
        return (self.path(name) / manifest_mod.MANIFEST_NAME).is_file()

    def list(self) -> list[ModelEntry]:
        if not self.root.is_dir():
            return []
        entries = []
        for folder in sorted(self.root.iterdir()):
            if folder.name.startswith(TEMP_PREFIX) or not (folder / manifest_mod.MANIFEST_NAME).is_file():
                continue
            try:
                entries.append(ModelEntry(folder.name, folder, self._read_manifest(folder)))
            except CorruptModelError:
                continue
        return entries

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

    @staticmethod
    def _read_manifest(folder: Path) -> Manifest:
        path = folder / manifest_mod.MANIFEST_NAME
        try:
            manifest = manifest_mod.decode(path.read_bytes())
        except Exception as exc:
            raise CorruptModelError(f"cannot read {path}: {exc}", "re-convert the model with `gdsllm pull`") from exc
        if manifest.format_version > manifest_mod.FORMAT_VERSION:
            raise CorruptModelError(f"{path} has format version {manifest.format_version}, newer than this gdsllm",
                                    "upgrade gdsllm-core")
        return manifest


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
