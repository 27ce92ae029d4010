"""What `/api/create` keeps beside a model (`defaults.json`): a system prompt, sampling parameters (ollama's option
names) and a license. Requests for the model use them where they set nothing themselves."""

import os
import shutil
from typing import Any

import msgspec

from gdsllm_core.errors import BadRequestError, ConversionError
from gdsllm_core.layout import manifest as manifest_mod
from gdsllm_core.layout.store import ModelEntry, ModelStore, check_name
from gdsllm_core.layout.writer import TEMP_PREFIX

DEFAULTS_NAME = "defaults.json"


class ModelDefaults(msgspec.Struct, omit_defaults=True):
    system: str | None = None
    parameters: dict[str, Any] = {}
    license: str | None = None


def read_defaults(entry: ModelEntry) -> ModelDefaults:
    path = entry.path / DEFAULTS_NAME
    if not path.is_file():
        return ModelDefaults()
    return msgspec.json.decode(path.read_bytes(), type=ModelDefaults)


def copy_model(store: ModelStore, source: str, destination: str, defaults: ModelDefaults | None = None,
               overwrite: bool = True) -> ModelEntry:
    """`destination` as a copy of `source` (weight files hard-linked where the file system allows, else copied),
    with `defaults` (or the source's). Built in a temporary folder and renamed into place, like a conversion."""
    check_name(destination)
    entry = store.get(source)
    if source == destination:
        raise BadRequestError(f"cannot copy {source!r} onto itself", "give another destination name")
    if store.exists(destination) and not overwrite:
        raise ConversionError(f"model {destination!r} already exists", "remove it first")
    temp = store.root / f"{TEMP_PREFIX}{destination}-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    try:
        for path in entry.path.iterdir():
            if path.name in (manifest_mod.MANIFEST_NAME, DEFAULTS_NAME) or not path.is_file():
                continue
            try:
                os.link(path, temp / path.name)
            except OSError:
                shutil.copy2(path, temp / path.name)
        kept = defaults if defaults is not None else read_defaults(entry)
        if kept != ModelDefaults():
            (temp / DEFAULTS_NAME).write_bytes(msgspec.json.encode(kept))
        manifest = msgspec.structs.replace(entry.manifest, name=destination)
        (temp / manifest_mod.MANIFEST_NAME).write_bytes(manifest_mod.encode(manifest))
        final = store.path(destination)
        if final.exists():
            shutil.rmtree(final)
        os.rename(temp, final)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return store.get(destination)


def write_defaults(entry: ModelEntry, defaults: ModelDefaults) -> None:
    """Replace the model's defaults (atomically: written beside, then renamed); empty ones leave no file."""
    if defaults == ModelDefaults():
        (entry.path / DEFAULTS_NAME).unlink(missing_ok=True)
        return
    temp = entry.path / f".{DEFAULTS_NAME}.{os.getpid()}"
    temp.write_bytes(msgspec.json.encode(defaults))
    os.replace(temp, entry.path / DEFAULTS_NAME)


def parameters_text(parameters: dict[str, Any]) -> str:
    """ollama's `parameters` string in /api/show: one `name value` line per value (lists: one line each)."""
    lines = []
    for name, value in parameters.items():
        for item in value if isinstance(value, list) else [value]:
            lines.append(f"{name:<30} {msgspec.json.encode(item).decode() if isinstance(item, str) else item}")
    return "\n".join(lines)
