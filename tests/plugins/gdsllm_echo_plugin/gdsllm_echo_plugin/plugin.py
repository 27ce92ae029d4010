"""Registrations: an `echo` architecture (its forward pass as a lazy "module:Class" string, which `gdsllm plugins`
lists without importing) and an `echo-hello` command."""

import click

from gdsllm_core.api import hookimpl


@hookimpl
def register_forward_passes(register):
    register("echo", "gdsllm_echo_plugin.forward:EchoForward")


@hookimpl
def register_commands(cli):
    @cli.command(name="echo-hello")
    @click.argument("words", nargs=-1)
    def echo_hello(words):
        """Print the words back (proves a plugin can add a command)."""
        click.echo("echo: " + " ".join(words))
