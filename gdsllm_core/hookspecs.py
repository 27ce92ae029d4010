"""What a plugin can provide. Each hook gets a `register(name, target)` callback; targets are lazy "module:Attr"
strings (or objects), so listing plugins imports no model or GPU code."""

import pluggy

hookspec = pluggy.HookspecMarker("gdsllm")
hookimpl = pluggy.HookimplMarker("gdsllm")


@hookspec
def register_converters(register):
    """Register checkpoint converters: register(name, "module:Class"); the class follows `convert.Converter`."""


@hookspec(firstresult=True)
def detect_format(path):
    """Return the name of the converter that claims the checkpoint at `path`, or None."""


@hookspec
def register_residencies(register):
    """Register residencies: register(name, "module:Class"); see `runtime.protocols.Residency`."""


@hookspec
def register_forward_passes(register):
    """Register forward passes: register(architecture, "module:Class"); see `engine.forward.ForwardPass`."""


@hookspec
def register_commands(cli):
    """Add click commands to the `gdsllm` command group."""
