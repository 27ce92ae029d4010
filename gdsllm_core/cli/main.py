"""The `gdsllm` click group: each sub-module adds its commands; plugins add theirs through `register_commands`."""

import sys

import click
from rich.console import Console

from gdsllm_core import __version__, cpu_threads, plugins, settings
from gdsllm_core.errors import GdsllmError

console = Console()
err_console = Console(stderr=True)


class GdsllmGroup(click.Group):
    """Prints a GdsllmError (or an OSError) as one line and exits 1; the traceback only with --debug."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except GdsllmError as exc:
            if ctx.params.get("debug"):
                raise
            err_console.print(f"[bold red]error:[/] {exc.message}", highlight=False, soft_wrap=True)
            if exc.hint:
                err_console.print(f"[dim]hint: {exc.hint}[/]", highlight=False, soft_wrap=True)
            sys.exit(1)
        except OSError as exc:  # the system refused (permissions, a file where a folder should be, …): one line too
            if ctx.params.get("debug"):
                raise
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            err_console.print("[dim]hint: --debug shows where it happened[/]", highlight=False, soft_wrap=True)
            sys.exit(1)


@click.group(cls=GdsllmGroup)
@click.version_option(__version__, prog_name="gdsllm")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def cli(debug: bool) -> None:
    """Run LLMs larger than VRAM by streaming weights from NVMe into the GPU."""


def _add_commands() -> None:
    from gdsllm_core.cli import commands  # noqa: F401  (registers the built-in commands on `cli`)

    plugins.load_plugins()
    plugins.pm.hook.register_commands(cli=cli)


def main() -> None:
    settings.load_env_files()
    cpu_threads.choose_wait_policy(sys.argv[1:])  # before any plugin loads torch
    _add_commands()
    cli(prog_name="gdsllm")
