"""The one plugin manager: entry points of group "gdsllm" plus the core's own defaults."""

import importlib
import importlib.metadata
import sys
import traceback
from dataclasses import dataclass, field

import pluggy

from gdsllm_core import hookspecs, settings

ENTRY_POINT_GROUP = "gdsllm"
DEFAULT_PLUGINS = ("gdsllm_core.default_plugin",)


@dataclass
class PluginFailure:
    """An installed plugin that could not be imported; the rest keep working."""

    name: str
    error: str
    detail: str = field(repr=False, default="")


pm = pluggy.PluginManager("gdsllm")
pm.add_hookspecs(hookspecs)
failures: list[PluginFailure] = []
_loaded = False


def load_plugins() -> None:
    """Load entry-point plugins (narrowed by GDSLLM_LOAD_PLUGINS) and the defaults, once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    wanted = settings.load_plugins()
    for entry_point in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name):
        if wanted is not None and entry_point.name not in wanted:
            continue
        if pm.get_plugin(entry_point.name) is not None:
            continue
        try:
            module = entry_point.load()
        except Exception as exc:  # a broken plugin must not take the others down
            failures.append(PluginFailure(entry_point.name, f"{type(exc).__name__}: {exc}", traceback.format_exc()))
            continue
        pm.register(module, name=entry_point.name)
    for module_name in DEFAULT_PLUGINS:
        if pm.get_plugin(module_name) is None:
            pm.register(importlib.import_module(module_name), name=module_name)
    pm.check_pending()


def ensure_registered(module, name: str) -> bool:
    """Register a plugin module (after the entry points) unless it already is; True if this call added it."""
    load_plugins()
    if pm.is_registered(module) or pm.get_plugin(name) is not None:
        return False
    pm.register(module, name=name)
    return True


def distribution_of(plugin) -> tuple[str, str] | None:
    """(distribution name, version) that provides a loaded plugin module, when known."""
    module_name = getattr(plugin, "__name__", "")
    top = module_name.split(".")[0]
    for dist_name in importlib.metadata.packages_distributions().get(top, []):
        try:
            return dist_name, importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            continue
    if top in sys.modules and hasattr(sys.modules[top], "__version__"):
        return top, sys.modules[top].__version__
    return None
