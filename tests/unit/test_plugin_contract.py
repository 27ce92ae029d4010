"""The plugin contract: plugins import core only through `gdsllm_core.api`; every name the API lists resolves;
registrations are collected through pluggy in a deterministic order (the first registered plugin wins a name)."""

import ast
from pathlib import Path

import pytest

import gdsllm_core.api as api
from gdsllm_core import plugins, registry
from gdsllm_core.hookspecs import hookimpl

ROOT = Path(__file__).resolve().parents[2]
PLUGIN_PACKAGES = [p for p in (*ROOT.glob("plugins/*/*"), *ROOT.glob("tests/plugins/*/*"))
                   if (p / "__init__.py").is_file()]


def core_imports(path: Path) -> list[str]:
    """Modules of core a source file imports (`import gdsllm_core.x`, `from gdsllm_core.x import y`)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "gdsllm_core":
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.split(".")[0] == "gdsllm_core"]
    return found


def test_the_plugin_packages_are_found():
    names = {p.name for p in PLUGIN_PACKAGES}
    assert {"gdsllm_llama", "gdsllm_qwen_moe", "gdsllm_echo_plugin"} <= names


@pytest.mark.parametrize("package", PLUGIN_PACKAGES, ids=lambda p: p.name)
def test_plugins_import_core_only_through_the_api(package):
    wrong = [f"{source.relative_to(ROOT)}: {module}" for source in sorted(package.rglob("*.py"))
             for module in core_imports(source) if module != "gdsllm_core.api"]
    assert not wrong, "plugins may import only gdsllm_core.api:\n" + "\n".join(wrong)


def test_every_api_name_resolves_and_others_are_refused():
    for name in api.__all__:
        assert getattr(api, name) is not None, name
    with pytest.raises(AttributeError, match="plugins may use only"):
        api.Engine  # noqa: B018  (not part of the API)


class _Registers:
    def __init__(self, target: str):
        self.target = target

    @hookimpl
    def register_residencies(self, register):
        register("contract-test", self.target)


def test_the_first_registered_plugin_wins_a_name_whatever_the_call_order():
    first, second = _Registers("first:Residency"), _Registers("second:Residency")
    plugins.load_plugins()
    plugins.pm.register(first, name="contract-first")
    plugins.pm.register(second, name="contract-second")
    try:
        for _ in range(3):
            assert registry.collect("residencies")["contract-test"] == ("first:Residency", "contract-first")
        assert registry.collect("residencies")["tiered"][1] == "gdsllm_core.default_plugin"
    finally:
        plugins.pm.unregister(first)
        plugins.pm.unregister(second)
