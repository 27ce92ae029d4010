"""ModelWriter: writes extents into a temporary folder and renames it into place only when complete."""

import datetime
import errno
import os
import shutil
import zlib
from pathlib import Path

import numpy as np
import torch

from gdsllm_core.errors import ConversionError
from gdsllm_core.layout import manifest as manifest_mod
from gdsllm_core.layout.manifest import ExtentInfo, ExtentRole, Manifest, TensorInfo, TokenizerInfo
from gdsllm_core.layout.qtypes import ALIGNMENT, align_up, tensor_nbytes

WEIGHTS_FILE = "weights.bin"
TEMP_PREFIX = ".partial-"
ASIDE_PREFIX = ".partial-replaced-"  # `.partial-replaced-NAME-PID`: the model a replacement moved aside


def as_bytes(data) -> memoryview:
    """A read-only byte view of a numpy array, torch tensor or bytes-like object (copied only if not contiguous)."""
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().contiguous()
        if data.dtype == torch.bfloat16:
            data = data.view(torch.int16)
        data = data.numpy()
    if isinstance(data, np.ndarray):
        return memoryview(np.ascontiguousarray(data)).cast("B")
    return memoryview(data).cast("B")


class ModelWriter:
    """Collects extents for one model. Use as a context manager: an exception (or Ctrl-C) removes the partial folder.

    >>> with ModelWriter(root, "smollm2") as w:
    ...     w.add_extent("blk.0", [("blk.0.attn_q.weight", "Q4_0", [576, 576], raw_blocks), ...])
    ...     w.finish(architecture="llama", config={...}, tokenizer=TokenizerInfo(...), files={"tokenizer.json": b"..."})
    """

    def __init__(self, root: Path, name: str, overwrite: bool = False):
        self.root = Path(root)
        self.name = name
        self.final_path = self.root / name
        if self.final_path.exists() and not overwrite:
            raise ConversionError(f"model {name!r} already exists in {self.root}",
                                  "remove it with `gdsllm rm` or pass --force to replace it")
        self.overwrite = overwrite
        self.root.mkdir(parents=True, exist_ok=True)
        self.temp_path = self.root / f"{TEMP_PREFIX}{name}-{os.getpid()}"
        shutil.rmtree(self.temp_path, ignore_errors=True)
        self.temp_path.mkdir()
        self._file = open(self.temp_path / WEIGHTS_FILE, "wb")
        self._offset = 0
        self.extents: list[ExtentInfo] = []

    def __enter__(self) -> "ModelWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def _write(self, data: memoryview) -> None:
        try:
            self._file.write(data)
        except OSError as exc:
            self.abort()
            if exc.errno == errno.ENOSPC:
                raise ConversionError(f"no space left on the device holding {self.root} while writing {self.name!r}",
                                      "free disk space or set GDSLLM_MODEL_ROOT to a larger disk") from exc
            raise ConversionError(f"cannot write {self.temp_path / WEIGHTS_FILE}: {exc}") from exc
        self._offset += len(data)

    def _pad(self) -> None:
        padding = align_up(self._offset) - self._offset
        if padding:
            self._write(memoryview(bytes(padding)))

    def add_extent(self, name: str, tensors: list[tuple], role: ExtentRole = ExtentRole.OTHER,
                   index: int = -1) -> ExtentInfo:
        """Append one extent. Each tensor is (name, qtype, shape, data[, extra]); each starts on a 4 KiB boundary.
        `role` says what the extent is to the runtime, `index` its layer (for LAYER and EXPERT extents)."""
        if role in (ExtentRole.LAYER, ExtentRole.EXPERT) and index < 0:
            raise ConversionError(f"extent {name!r}: a {role} extent needs its layer index")
        if any(extent.name == name for extent in self.extents):
            raise ConversionError(f"extent {name!r} written twice")
        self._pad()
        start = self._offset
        infos = []
        for entry in tensors:
            tensor_name, qtype, shape, data = entry[:4]
            extra = entry[4] if len(entry) > 4 else {}
            view = as_bytes(data)
            expected = tensor_nbytes(qtype, shape)
            if len(view) != expected:
                raise ConversionError(f"tensor {tensor_name}: {qtype} {list(shape)} needs {expected} bytes, got {len(view)}")
            self._pad()
            infos.append(TensorInfo(name=tensor_name, qtype=qtype, shape=[int(d) for d in shape],
                                    offset=self._offset - start, nbytes=len(view), crc32=zlib.crc32(view), extra=extra))
            self._write(view)
        self._pad()
        extent = ExtentInfo(name=name, file=WEIGHTS_FILE, offset=start, nbytes=self._offset - start, tensors=infos,
                            role=ExtentRole(role), index=index)
        self.extents.append(extent)
        return extent

    def finish(self, architecture: str, config: dict, tokenizer: TokenizerInfo, files: dict[str, bytes] | None = None,
               quant: str = "", source: dict | None = None) -> Manifest:
        """Write the side files and manifest, fsync, and rename the folder into place."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        for file_name, data in (files or {}).items():
            (self.temp_path / file_name).write_bytes(data)
        manifest = Manifest(
            name=self.name, architecture=architecture, config=config, tokenizer=tokenizer, extents=self.extents,
            files={WEIGHTS_FILE: self._offset}, quant=quant, source=source or {},
            created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
        (self.temp_path / manifest_mod.MANIFEST_NAME).write_bytes(manifest_mod.encode(manifest))
        if self.final_path.exists():
            if not self.overwrite:
                self.abort()
                raise ConversionError(f"model {self.name!r} appeared in {self.root} during conversion")
            aside = self.root / f"{ASIDE_PREFIX}{self.name}-{os.getpid()}"
            os.rename(self.final_path, aside)  # a crash from here on leaves the old model aside, recovered later
            os.rename(self.temp_path, self.final_path)
            shutil.rmtree(aside)
        else:
            os.rename(self.temp_path, self.final_path)
        return manifest

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        shutil.rmtree(self.temp_path, ignore_errors=True)


def recover_replaced(root: Path) -> list[str]:
    """Undo replacements that a crashed process left half done: a model it moved aside comes back unless its new
    version is in place (then the old one is deleted). Folders of running processes are left alone. Returns the
    names of the models brought back."""
    recovered = []
    for aside in Path(root).glob(f"{ASIDE_PREFIX}*"):
        name, _, pid = aside.name[len(ASIDE_PREFIX):].rpartition("-")
        if not name or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if (Path(root) / name / manifest_mod.MANIFEST_NAME).is_file():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            shutil.rmtree(Path(root) / name, ignore_errors=True)
            os.rename(aside, Path(root) / name)
            recovered.append(name)
    return recovered


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = ["ALIGNMENT", "ExtentRole", "ModelWriter", "WEIGHTS_FILE", "as_bytes"]
