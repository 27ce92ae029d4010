"""Third-party plugins: two throw-away packages from tests/plugins/ are pip-installed into a temporary folder (with
their dist-info, so importlib.metadata finds their entry points in group "gdsllm") and `gdsllm` runs with that folder
on PYTHONPATH: the working one is listed with its version and what it registers, its command runs and its forward
pass resolves; the broken one (raises on import) is reported by name with its error while the rest keep working."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _cli_models import cli_env, gdsllm

PLUGIN_SOURCES = Path(__file__).resolve().parents[1] / "plugins"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """`pip install --no-deps --target` of both packages (copied first, so builds leave nothing in the tree)."""
    work = tmp_path_factory.mktemp("plugins")
    site = work / "site"
    sources = [shutil.copytree(PLUGIN_SOURCES / name, work / name)
               for name in ("gdsllm_echo_plugin", "gdsllm_broken_plugin")]
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), *map(str, sources)], check=True, timeout=300)
    return site


def plugin_env(tmp_path: Path, site: Path) -> dict[str, str]:
    env = cli_env(tmp_path)
    del env["GDSLLM_LOAD_PLUGINS"]  # load every installed entry point
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return env


def block_of(output: str, name: str) -> str:
    """The lines `gdsllm plugins` prints for one plugin: its header line and the indented lines under it."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split() and line.split()[0] == name)
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith("  ")), len(lines))
    return "\n".join(lines[start:end])


def test_installed_plugin_is_listed_with_version_and_registrations(tmp_path, plugin_site):
    result = gdsllm(["plugins"], plugin_env(tmp_path, plugin_site), tmp_path)
    assert result.returncode == 0, result.stderr
    echo = block_of(result.stdout, "echo")
    assert "gdsllm-echo-plugin 0.3.1" in echo
    assert "architectures: echo" in echo and "commands: echo-hello" in echo
    llama = block_of(result.stdout, "llama")  # the other plugins keep working beside a broken one
    assert "gdsllm-llama" in llama and "architectures: llama" in llama
    broken = block_of(result.stdout, "broken")
    assert "gdsllm-broken-plugin 0.0.2" in broken
    assert "failed to load: RuntimeError: gdsllm-broken-plugin cannot start: needs gdsllm-core 99" in broken


def test_installed_plugin_command_and_forward_pass_work(tmp_path, plugin_site):
    env = plugin_env(tmp_path, plugin_site)
    result = gdsllm(["echo-hello", "a", "b"], env, tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "echo: a b", result.stderr
    resolved = subprocess.run(
        [sys.executable, "-c", "from gdsllm_core import registry, plugins; cls = registry.get_forward_pass('echo'); "
         "print(cls.__module__, cls.__name__, [f.name for f in plugins.failures])"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert resolved.stdout.split() == ["gdsllm_echo_plugin.forward", "EchoForward", "['broken']"], resolved.stderr


def test_without_the_plugins_nothing_of_them_shows(tmp_path):
    env = cli_env(tmp_path)
    del env["GDSLLM_LOAD_PLUGINS"]
    result = gdsllm(["plugins"], env, tmp_path)
    assert result.returncode == 0
    assert "echo" not in result.stdout and "broken" not in result.stdout
    assert "architectures: llama" in block_of(result.stdout, "llama")
