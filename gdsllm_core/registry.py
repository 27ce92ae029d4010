"""Look-ups over what plugins registered: converters, layouts, residencies, forward passes."""

import importlib
from collections.abc import Callable
from pathlib import Path

from gdsllm_core import plugins
from gdsllm_core.errors import PluginError, UnknownArchitectureError


def collect(kind: str) -> dict[str, tuple[object, str]]:
    """name -> (target, plugin name) for one kind of registration, through pluggy's hook `register_<kind>`. The
    order is deterministic: plugins in registration order (entry points sorted by name, then core's defaults), and
    the first registration of a name wins."""
    plugins.load_plugins()
    found: dict[str, tuple[object, str]] = {}
    caller = getattr(plugins.pm.hook, f"register_{kind}")
    # pluggy calls the most recently registered implementation first: walk them oldest first instead
    for impl in caller.get_hookimpls():
        plugin_name = impl.plugin_name

        def register(name: str, target: object, _plugin=plugin_name) -> None:
            found.setdefault(name, (target, _plugin))

        impl.function(register=register)
    return found


def resolve(target: object) -> object:
    """Import a lazy "module:Attr" target; objects pass through."""
    if not isinstance(target, str):
        return target
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PluginError(f"cannot import {module_name!r} registered by a plugin: {exc}",
                          "reinstall the plugin or run `gdsllm plugins` to see which ones failed") from exc
    return getattr(module, attr) if attr else module


def _lookup(kind: str, name: str, what: str) -> object:
    registered = collect(kind)
    if name not in registered:
        known = ", ".join(sorted(registered)) or "none"
        raise UnknownArchitectureError(
            f"no installed plugin provides the {what} {name!r} (installed: {known})",
            "install the plugin for this architecture, e.g. `pip install gdsllm-llama`; `gdsllm plugins` lists them",
        )
    return resolve(registered[name][0])


def get_forward_pass(architecture: str) -> Callable:
    return _lookup("forward_passes", architecture, "forward pass for architecture")


def get_residency(name: str) -> Callable:
    return _lookup("residencies", name, "residency")


def get_converter(name: str) -> Callable:
    return _lookup("converters", name, "converter")


def detect_converter(path: Path) -> str:
    """Name of the converter that claims `path`: the detect_format hook first, then each converter's `detect`."""
    plugins.load_plugins()
    name = plugins.pm.hook.detect_format(path=Path(path))
    if name:
        return name
    for candidate, (target, _plugin) in collect("converters").items():
        converter = resolve(target)
        if getattr(converter, "detect", None) and converter.detect(Path(path)):
            return candidate
    path = Path(path)
    config = path / "config.json"
    if config.is_file():
        from gdsllm_core.convert import read_json

        read_json(config)  # an unreadable config.json is why nothing recognised the folder: say so
    found = _architecture_of(path)
    what = f"{path} (architecture {found})" if found else str(path)
    installed = ", ".join(name for name, _plugin in plugins.pm.list_name_plugin()) or "none"
    known = ", ".join(sorted(collect("converters"))) or "none"
    archs = ", ".join(sorted(collect("forward_passes"))) or "none"
    raise UnknownArchitectureError(
        f"no installed plugin converts {what} (installed plugins: {installed}; converters: {known}; "
        f"architectures: {archs})",
        "point at a GGUF file or a folder with config.json and *.safetensors, or install the plugin for this model",
    )



def _architecture_of(path: Path) -> str | None:
    """The architecture a GGUF's header or a folder's config.json names, for the error when no plugin claims it."""
    from gdsllm_core.convert.gguf_file import gguf_architecture
    from gdsllm_core.convert.hf_folder import config_architectures

    return gguf_architecture(path) if path.is_file() else ", ".join(config_architectures(path)) or None
