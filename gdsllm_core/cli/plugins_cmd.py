"""`gdsllm plugins`: what is installed, its version, what it registers, and which plugins failed to load."""

import importlib.metadata

import click
from rich.markup import escape

from gdsllm_core import plugins
from gdsllm_core.cli.main import cli, console

KIND_LABELS = {"converters": "converters", "residencies": "residencies",
               "forward_passes": "architectures"}


def entry_point_distributions() -> dict[str, tuple[str, str]]:
    """entry-point name -> (distribution, version) for group "gdsllm"."""
    found = {}
    for entry_point in importlib.metadata.entry_points(group=plugins.ENTRY_POINT_GROUP):
        dist = entry_point.dist
        if dist is not None:
            found[entry_point.name] = (dist.name, dist.version)
    return found


def registrations(plugin) -> dict[str, list[str]]:
    """label -> names this one plugin registers (each hook called on its own, as `registry.collect` does)."""
    provided: dict[str, list[str]] = {}
    for kind, label in KIND_LABELS.items():
        hook_impl = getattr(plugin, f"register_{kind}", None)
        if hook_impl is None:
            continue
        names: list[str] = []
        hook_impl(register=lambda name, _target, _names=names: _names.append(name))
        if names:
            provided[label] = names
    if getattr(plugin, "register_commands", None) is not None:
        group = click.Group()
        plugin.register_commands(cli=group)
        if group.commands:
            provided["commands"] = sorted(group.commands)
    if getattr(plugin, "detect_format", None) is not None:
        provided.setdefault("hooks", []).append("detect_format")
    return provided


@cli.command(name="plugins")
def list_plugins() -> None:
    """List installed plugins and what each provides.

    Shows each plugin's package and version, what it registers, and the plugins that failed to load."""
    plugins.load_plugins()
    dists = entry_point_distributions()
    for plugin in plugins.pm.get_plugins():
        name = plugins.pm.get_name(plugin) or getattr(plugin, "__name__", "?")
        dist = dists.get(name) or plugins.distribution_of(plugin)
        package = f"{dist[0]} {dist[1]}" if dist else "(no package metadata)"
        console.print(f"[bold]{escape(name)}[/]  {escape(package)}", highlight=False)
        try:
            provided = registrations(plugin)
        except Exception as exc:  # a plugin whose hooks raise is reported, not fatal
            console.print(f"  [red]its hooks raised {type(exc).__name__}: {escape(str(exc))}[/]", highlight=False)
            continue
        for label, names in provided.items():
            console.print(f"  {label}: {escape(', '.join(names))}", highlight=False)
        if not provided:
            console.print("  (registers nothing)")
    for failure in plugins.failures:
        dist = dists.get(failure.name)
        package = f"  {dist[0]} {dist[1]}" if dist else ""
        console.print(f"[bold red]{escape(failure.name)}[/]{escape(package)}  [red]failed to load: "
                      f"{escape(failure.error)}[/]", highlight=False, soft_wrap=True)
