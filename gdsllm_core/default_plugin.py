"""The core's own registrations: the default residency."""

from gdsllm_core.hookspecs import hookimpl


@hookimpl
def register_residencies(register):
    register("tiered", "gdsllm_core.runtime.residency:TieredResidency")
