"""Converting a checkpoint (GGUF file, HF folder, MLX folder) into the model store, by the plugin that claims it."""

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from gdsllm_core import plugins, registry
from gdsllm_core.errors import ConversionError, GdsllmError, UnknownArchitectureError
from gdsllm_core.layout.manifest import ExtentRole
from gdsllm_core.layout.store import ModelEntry, ModelStore, check_name, safe_name
from gdsllm_core.layout.writer import ModelWriter


@dataclass
class ConvertOptions:
    """`quant`: re-quantize at conversion (e.g. "q8_0", "q4_0", "q4_k", "affine4"); None keeps the source types.
    `progress(description, done, total)` is called as tensors are written (the CLI draws a rich bar from it)."""

    quant: str | None = None
    group_size: int | None = None
    progress: Callable[[str, int, int], None] | None = None
    extra: dict = field(default_factory=dict)


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file (config.json, tokenizer_config.json…); ConversionError naming it if unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConversionError(f"cannot read {path}: {exc}", "the checkpoint is incomplete: re-download it") from exc


def write_extents(writer: ModelWriter, groups: dict[str, list[str]], entry_of: Callable[[str], tuple],
                  role_of: Callable[[str], tuple[ExtentRole, int]], options: ConvertOptions) -> None:
    """Write each extent of `groups` (extent name -> tensor names, in write order); `entry_of(name)` gives the
    writer's (name, qtype, shape, data) of a tensor, `role_of(extent name)` the extent's (role, layer index).
    Reports progress per tensor."""
    total, done = sum(len(members) for members in groups.values()), 0
    for extent_name, members in groups.items():
        entries = []
        for name in members:
            entries.append(entry_of(name))
            done += 1
            if options.progress:
                options.progress(name, done, total)
        writer.add_extent(extent_name, entries, *role_of(extent_name))


class Converter(Protocol):
    name: str

    @staticmethod
    def detect(path: Path) -> bool:
        """True if this converter understands the checkpoint at `path`."""

    @staticmethod
    def default_name(path: Path) -> str:
        """The model name to use when the user gives none (the core makes it a safe name)."""

    def convert(self, source: Path, writer: ModelWriter, options: ConvertOptions) -> None:
        """Write every extent through `writer` and end with `writer.finish(...)`."""


def convert(source: Path, store: ModelStore, name: str | None = None, options: ConvertOptions | None = None,
            overwrite: bool = False) -> ModelEntry:
    """Convert `source` into `store` under `name`; nothing is left in the store if anything fails."""
    source = Path(source)
    if not source.exists():
        raise ConversionError(f"{source} does not exist", "give a GGUF file or a folder with config.json")
    try:
        converter_cls = registry.get_converter(registry.detect_converter(source))
    except UnknownArchitectureError as exc:
        if source.is_file() and _is_gguf(source):
            raise unknown_gguf_error(source, source.name) from exc
        raise
    name = check_name(name or safe_name(converter_cls.default_name(source)))
    with ModelWriter(store.root, name, overwrite=overwrite) as writer:
        converter_cls().convert(source, writer, options or ConvertOptions())
    return store.get(name)


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"GGUF"


def unknown_gguf_error(path: Path, what: str) -> UnknownArchitectureError:
    """The error for a GGUF no installed converter claims: its architecture and the installed plugins."""
    from gdsllm_core.convert.gguf_file import read_header

    try:
        architecture = read_header(path).architecture
    except (OSError, GdsllmError):
        architecture = None
    plugins.load_plugins()
    installed = sorted(name for plugin in plugins.pm.get_plugins()
                       if (name := plugins.pm.get_name(plugin)) and not name.startswith("gdsllm_core"))
    archs = ", ".join(sorted(registry.collect("forward_passes"))) or "none"
    return UnknownArchitectureError(
        f"{what} is a GGUF of architecture {architecture!r}, which no installed plugin converts "
        f"(plugins: {', '.join(installed) or 'none'}; architectures: {archs})",
        "install the plugin for this architecture (`gdsllm plugins` lists what is installed)")
